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


def build_tiny_reward_model(folder: Path, num_labels: int = 1, hidden_size: int = 32,
                            heads: int = 4) -> Path:
    """Write a 2-layer Llama sequence classifier and a word-level tokenizer to ``folder``.

    vLLM's attention kernels take only some head sizes (32 and up on the CPU): a model for
    the ``vllm`` reward backend needs ``hidden_size / heads`` among them.
    """
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
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=256, num_labels=num_labels,
                         pad_token_id=vocab["<pad>"])
    if num_labels > 1:
        config.id2label = {i: f"aspect{i}" for i in range(num_labels)}
        config.label2id = {f"aspect{i}": i for i in range(num_labels)}
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


STEP_TAG = "\u043a\u0438"  # math-shepherd's step tag
PRM_SEPARATOR = "<extra_0>"
PRM_CHAT_TEMPLATE = CHAT_TEMPLATE + "{% if add_generation_prompt %}<|assistant|> {% endif %}"


def build_tiny_prm(folder: Path, head: str = "causal", hidden_size: int = 32,
                   heads: int = 4) -> Path:
    """Write a 2-layer Llama process reward model and a word-level tokenizer to ``folder``.

    ``head="causal"`` is a ``LlamaForCausalLM`` (the step-tag and chat formats: the step tag
    and the labels "+" / "-" are single tokens, and the chat template can open the
    assistant's turn); ``head="token_classification"`` a ``LlamaForTokenClassification`` with
    2 labels, whose tokenizer splits the separator ``<extra_0>`` out of the words around it.
    """
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        LlamaForTokenClassification,
        PreTrainedTokenizerFast,
    )

    specials = ["<pad>", "<unk>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>",
                PRM_SEPARATOR]
    vocab = {token: i for i, token in enumerate(
        specials + WORDS + [STEP_TAG, "+", "-", "one", "two", "three", "=", "so"])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens([PRM_SEPARATOR])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>",
                                        unk_token="<unk>", bos_token="<s>", eos_token="<|end|>")
    tokenizer.chat_template = PRM_CHAT_TEMPLATE
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden_size,
                         intermediate_size=2 * hidden_size, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=512, num_labels=2,
                         pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"],
                         eos_token_id=vocab["<|end|>"])
    model = (LlamaForCausalLM(config) if head == "causal"
             else LlamaForTokenClassification(config))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_generator(folder: Path, tokenizer_folder: Path, heads: int = 4,
                         kv_heads: int = 2, head_dim: int = 64, layers: int = 2) -> Path:
    """Write a ``LlamaForCausalLM`` with ``heads`` attention heads of ``head_dim`` (the CPU
    attention kernel refuses 16; 64 works) and the tokenizer and chat template of
    ``tokenizer_folder`` (the embedded model's), so tensor parallelism has heads to split.
    The weights are random but fixed (seed 0), so seeded outputs can be compared."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    hidden = heads * head_dim
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
