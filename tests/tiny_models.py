"""Tiny Hugging Face models built from a config in a folder: the real loading code runs on
them, only the weights are random (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

WORDS = [
    "the", "sea", "is", "blue", "and", "calm", "waves", "crash", "on", "rocks", "a", "haiku",
    "about", "write", "please",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
)


def build_tiny_reward_model(folder: Path, num_labels: int = 1) -> Path:
    """Write a 2-layer Llama sequence classifier and a word-level tokenizer to ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                        unk_token="<unk>", bos_token="<s>", eos_token="<|end|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, num_labels=num_labels,
                         pad_token_id=vocab["<pad>"])
    if num_labels > 1:
        config.id2label = {i: f"aspect{i}" for i in range(num_labels)}
        config.label2id = {f"aspect{i}": i for i in range(num_labels)}
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
