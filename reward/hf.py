"""Hugging Face sequence-classification reward models, in the serving process.

The standard format of real reward models (Skywork-Reward, ArmoRM, OpenAssistant's DeBERTa
models): ``AutoModelForSequenceClassification`` with one output logit, or a chosen label.
(prompt, response) pairs are formatted with the reward model's own chat template when it has
one. Concurrent requests are gathered into shared batches, split by a token budget, and run
on one worker thread so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from reward.base import Prompt, RewardError, check_lengths, conversation, prompt_as_text
from reward.config import RewardConfig

logger = logging.getLogger(__name__)


@dataclass
class _Pending:
    texts: list[str]
    future: asyncio.Future[list[float]]


def token_budget_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Group indices (sorted by length) so that batch_size * longest <= max_batch_tokens.

    Sorting by length keeps padding small; a single sequence over the budget is a batch of
    its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = max([lengths[i] for i in current] + [lengths[index]])
        if current and longest * (len(current) + 1) > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


class HFRewardScorer:
    """A sequence-classification reward model with cross-request micro-batching."""

    def __init__(self, config: RewardConfig) -> None:
        self.name = config.name
        self._config = config
        self._model: Any = None
        self._tokenizer: Any = None
        self._label_index = 0
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"reward-{config.name}"
        )
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._serve(), name=f"reward-{self.name}")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        cfg = self._config
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        source = str(cfg.model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source, trust_remote_code=cfg.trust_remote_code
            )
            model = AutoModelForSequenceClassification.from_pretrained(
                source, dtype=dtype, trust_remote_code=cfg.trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise RewardError(f"reward '{self.name}': cannot load '{cfg.model}': {exc}") from exc
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        tokenizer.padding_side = "right"
        self._label_index = self._resolve_label(model.config)
        model.to(cfg.device)
        model.eval()
        self._model, self._tokenizer = model, tokenizer
        logger.info("reward model loaded", extra={"reward": self.name, "device": cfg.device})

    def _resolve_label(self, model_config: Any) -> int:
        label = self._config.label
        num_labels = int(getattr(model_config, "num_labels", 1))
        if label is None:
            if num_labels != 1:
                raise RewardError(
                    f"reward '{self.name}' has {num_labels} labels; set 'label' to choose one"
                )
            return 0
        if isinstance(label, int):
            index = label
        else:
            mapping = {str(k): int(v) for k, v in (model_config.label2id or {}).items()}
            if label not in mapping:
                raise RewardError(f"reward '{self.name}': unknown label '{label}'")
            index = mapping[label]
        if not 0 <= index < num_labels:
            raise RewardError(f"reward '{self.name}': label index {index} out of range")
        return index

    def format(self, prompt: Prompt, response: str) -> str:
        """The text the reward model reads for one pair."""
        tokenizer = self._tokenizer
        if self._config.use_chat_template and getattr(tokenizer, "chat_template", None):
            messages = conversation(prompt, response)
            return str(tokenizer.apply_chat_template(messages, tokenize=False))
        sep = tokenizer.sep_token or "\n"
        return f"{prompt_as_text(prompt)}{sep}{response}"

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        if self._queue is None:
            raise RewardError(f"reward '{self.name}' is not loaded")
        if not prompts:
            return []
        texts = [self.format(p, r) for p, r in zip(prompts, responses, strict=True)]
        future: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(texts, future))
        return await future

    async def _serve(self) -> None:
        """Gather what arrives within ``batch_wait_ms`` into one forward pass series."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self._queue.get()]
            if self._config.batch_wait_ms > 0:
                await asyncio.sleep(self._config.batch_wait_ms / 1000.0)
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            pending = [p for p in pending if not p.future.cancelled()]
            if not pending:
                continue
            texts = [t for p in pending for t in p.texts]
            try:
                values = await loop.run_in_executor(self._executor, self._score_texts, texts)
            except Exception as exc:  # delivered to every waiting request
                error = exc if isinstance(exc, RewardError) else RewardError(
                    f"reward '{self.name}' failed: {type(exc).__name__}")
                for p in pending:
                    if not p.future.done():
                        p.future.set_exception(error)
                logger.exception("reward scoring failed", extra={"reward": self.name})
                continue
            offset = 0
            for p in pending:
                if not p.future.done():
                    p.future.set_result(values[offset : offset + len(p.texts)])
                offset += len(p.texts)

    def _score_texts(self, texts: list[str]) -> list[float]:
        import torch

        tokenizer, model = self._tokenizer, self._model
        # A chat template already writes the special tokens the model was trained with.
        templated = self._config.use_chat_template and bool(
            getattr(tokenizer, "chat_template", None)
        )
        encoded = [
            tokenizer(t, add_special_tokens=not templated, truncation=True,
                      max_length=self._config.max_length)["input_ids"]
            for t in texts
        ]
        results = [0.0] * len(texts)
        budget = self._config.max_batch_tokens
        for batch in token_budget_batches([len(e) for e in encoded], budget):
            padded = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt")
            padded = {k: v.to(self._config.device) for k, v in padded.items()}
            with torch.inference_mode():
                logits = model(**padded).logits
            column = logits[:, self._label_index].float().cpu().tolist()
            for i, value in zip(batch, column, strict=True):
                if math.isnan(value):
                    raise RewardError(f"reward '{self.name}' produced NaN")
                results[i] = float(value)
        return results
