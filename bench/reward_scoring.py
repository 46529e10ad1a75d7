"""Benchmark of reward scoring: full recomputation against a shared prompt KV cache.

``python -m bench.reward_scoring --model FOLDER_OR_ID`` scores n responses to one prompt
both ways on the same inputs and prints seconds per call and the speed-up. Without
``--model`` it builds a randomly initialised classifier shaped like the policy in
``--shape-from``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from common.config import HFRewardConfig
from reward.hf import HFRewardScorer


def build_classifier(shape_from: str, out: Path, layers: int | None = None,
                     hidden: int | None = None) -> Path:
    """A randomly initialised sequence classifier with the architecture and tokenizer of
    ``shape_from``, optionally shrunk to ``layers`` layers of width ``hidden`` (heads of 32
    dimensions, which every attention kernel takes)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(shape_from)
    config.num_labels = 1
    if layers is not None:
        config.num_hidden_layers = layers
    if hidden is not None:
        config.hidden_size, config.intermediate_size = hidden, 2 * hidden
        config.num_attention_heads = config.num_key_value_heads = max(1, hidden // 32)
        config.head_dim = hidden // config.num_attention_heads
    tokenizer = AutoTokenizer.from_pretrained(shape_from)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    AutoModelForSequenceClassification.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_inputs(prompt_words: int, response_words: int, n: int) -> tuple[list[str], list[str]]:
    prompt = " ".join(f"word{i % 97}" for i in range(prompt_words))
    responses = [" ".join(f"answer{(i * 7 + k) % 89}" for i in range(response_words))
                 for k in range(n)]
    return [prompt] * n, responses


async def time_scorer(model: str, share: bool, prompts: list[str], responses: list[str],
                      repeats: int, device: str,
                      dtype: str = "float32") -> tuple[float, list[float]]:
    scorer = HFRewardScorer(HFRewardConfig.model_validate(
        {"name": "bench", "type": "hf", "model": model, "device": device, "dtype": dtype,
         "share_prompt_kv": share, "max_batch_tokens": 65536}))
    await scorer.start()
    try:
        values = await scorer.score(prompts, responses)  # warm-up
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            await scorer.score(prompts, responses)
            times.append(time.perf_counter() - started)
        return statistics.median(times), values
    finally:
        await scorer.close()


async def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_classifier(args.shape_from, Path(tmp)))
        prompts, responses = make_inputs(args.prompt_words, args.response_words, args.n)
        full_s, full_values = await time_scorer(model, False, prompts, responses, args.repeats,
                                                args.device, args.dtype)
        shared_s, shared_values = await time_scorer(model, True, prompts, responses,
                                                    args.repeats, args.device, args.dtype)
    drift = max(abs(a - b) for a, b in zip(full_values, shared_values, strict=True))
    print(f"n={args.n} prompt~{args.prompt_words} words response~{args.response_words} words")
    print(f"{'method':<22}{'s/call':>10}")
    print(f"{'full recomputation':<22}{full_s:>10.3f}")
    print(f"{'shared prompt KV':<22}{shared_s:>10.3f}")
    print(f"speed-up {full_s / shared_s:.2f}x   max |reward difference| {drift:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a reward model (folder or hub id)")
    parser.add_argument("--shape-from", help="a causal LM folder whose shape to copy")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=256)
    parser.add_argument("--response-words", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32",
                        choices=["float32", "float16", "bfloat16", "auto"])
    parser.add_argument("--save-to", help="only write a classifier shaped from --shape-from "
                        "into this folder (for `sbon bench --reward` with a model reward)")
    parser.add_argument("--layers", type=int, help="with --save-to: number of layers")
    parser.add_argument("--hidden", type=int, help="with --save-to: hidden size")
    args = parser.parse_args()
    if not args.model and not args.shape_from:
        parser.error("give --model or --shape-from")
    if args.save_to:
        print(build_classifier(args.shape_from, Path(args.save_to), args.layers, args.hidden))
        return
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
