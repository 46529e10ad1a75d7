"""Hugging Face sequence-classification reward models, in the serving process.

The standard format of real reward models (Skywork-Reward, ArmoRM, OpenAssistant's DeBERTa
models): ``AutoModelForSequenceClassification`` with one output logit, or a chosen label.
(prompt, response) pairs are formatted with the reward model's own chat template when it has
one. Concurrent requests are gathered into shared batches, split by a token budget, and run
on one worker thread so the event loop never blocks; a batch that fails is retried request by
request (reward/batching.py), and the reward's ``timeout_s`` bounds every call
(engine/guarded.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.config import HFRewardConfig
from common.prompts import Prompt, conversation, prompt_as_text
from reward.base import RewardError, check_lengths
from reward.batching import BatchedModelScorer, BatchWorker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Item:
    """One pair as text: the prompt part alone, and prompt plus response."""

    prefix: str
    full: str


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


class HFRewardScorer(BatchedModelScorer[_Item]):
    """A sequence-classification reward model with cross-request micro-batching."""

    def __init__(self, config: HFRewardConfig) -> None:
        self.name = config.name
        self.timeout_s = config.timeout_s  # applied by engine/guarded.py to every call
        self._config = config
        self._model: Any = None
        self._tokenizer: Any = None
        self._label_index = 0
        self._share_kv = False
        # _score_items is looked up at every batch, so a replaced method is the one used.
        self._batcher: BatchWorker[_Item] = BatchWorker(
            config.name, config.batch_wait_ms, lambda items: self._score_items(items), logger)

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        cfg = self._config
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        source = str(cfg.model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code
            )
            model = AutoModelForSequenceClassification.from_pretrained(
                source, revision=cfg.revision, dtype=dtype,
                trust_remote_code=cfg.trust_remote_code,
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
        self._share_kv = cfg.share_prompt_kv and self._kv_sharing_matches()
        logger.info("reward model loaded", extra={"reward": self.name, "device": cfg.device})

    def _kv_sharing_matches(self) -> bool:
        """Whether scoring on a shared prompt KV gives the full computation's values.

        Causal models with a KV cache do (the prompt's KV is computed once for all n
        responses); bidirectional encoders do not, and fall back to full recomputation.
        """
        probe = "Say something kind."
        items = [_Item(self.format_prefix(probe), self.format(probe, r))
                 for r in ("Hello there, friend.", "You are doing well today.")]
        full = [self._encode(item.full) for item in items]
        try:
            shared = self._score_group(self._encode(items[0].prefix), [0, 1], full)
        except Exception:  # a model without a usable cache: no sharing
            logger.info("prompt KV sharing unavailable", extra={"reward": self.name})
            return False
        reference = self._score_full(full)
        return len(shared) == 2 and all(
            abs(shared[i] - reference[i]) <= 1e-3 * max(1.0, abs(reference[i])) for i in (0, 1)
        )

    @property
    def shares_prompt_kv(self) -> bool:
        return self._share_kv

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

    @property
    def _templated(self) -> bool:
        return self._config.use_chat_template and bool(
            getattr(self._tokenizer, "chat_template", None)
        )

    def format(self, prompt: Prompt, response: str) -> str:
        """The text the reward model reads for one pair."""
        if self._templated:
            messages = conversation(prompt, response)
            return str(self._tokenizer.apply_chat_template(messages, tokenize=False))
        sep = self._tokenizer.sep_token or "\n"
        return f"{prompt_as_text(prompt)}{sep}{response}"

    def format_prefix(self, prompt: Prompt) -> str:
        """The prompt part of :meth:`format`, whose KV can be shared by all responses."""
        if self._templated:
            messages = conversation(prompt, "")[:-1]
            return str(self._tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True))
        sep = self._tokenizer.sep_token or "\n"
        return f"{prompt_as_text(prompt)}{sep}"

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        self._batcher.check_open()
        if not prompts:
            return []
        items = [_Item(self.format_prefix(p), self.format(p, r))
                 for p, r in zip(prompts, responses, strict=True)]
        return await self._batcher.submit(items)

    def _encode(self, text: str) -> list[int]:
        # A chat template already writes the special tokens the model was trained with.
        ids = self._tokenizer(text, add_special_tokens=not self._templated)["input_ids"]
        return list(ids[: self._config.max_length])

    def _score_items(self, items: list[_Item]) -> list[float]:
        """Score pairs; responses to the same prompt share the prompt's KV when possible."""
        full = [self._encode(item.full) for item in items]
        results: dict[int, float] = {}
        if self._share_kv:
            groups: dict[str, list[int]] = {}
            for index, item in enumerate(items):
                groups.setdefault(item.prefix, []).append(index)
            for prefix, members in groups.items():
                if len(members) > 1:
                    results.update(self._score_group(self._encode(prefix), members, full))
        rest = [i for i in range(len(items)) if i not in results]
        for index, value in zip(rest, self._score_full([full[i] for i in rest]), strict=True):
            results[index] = value
        return [results[i] for i in range(len(items))]

    def _score_group(self, prefix: list[int], members: list[int],
                     full: list[list[int]]) -> dict[int, float]:
        """Score the members whose tokens extend ``prefix`` on top of its KV cache."""
        usable = [i for i in members
                  if len(full[i]) > len(prefix) and full[i][: len(prefix)] == prefix]
        if len(usable) < 2:
            return {}
        suffixes = [full[i][len(prefix):] for i in usable]
        values = self._score_on_prefix(prefix, suffixes)
        return dict(zip(usable, values, strict=True))

    def _score_on_prefix(self, prefix: list[int], suffixes: list[list[int]]) -> list[float]:
        import copy

        import torch

        device, pad = self._config.device, self._tokenizer.pad_token_id
        with torch.inference_mode():
            prompt_out = self._model(input_ids=torch.tensor([prefix], device=device),
                                     use_cache=True)
        results = [0.0] * len(suffixes)
        budget = self._config.max_batch_tokens
        lengths = [len(prefix) + len(s) for s in suffixes]
        for batch in token_budget_batches(lengths, budget):
            longest = max(len(suffixes[i]) for i in batch)
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), len(prefix) + longest), dtype=torch.long)
            mask[:, : len(prefix)] = 1
            for row, i in enumerate(batch):
                ids[row, : len(suffixes[i])] = torch.tensor(suffixes[i])
                mask[row, len(prefix) : len(prefix) + len(suffixes[i])] = 1
            cache = copy.deepcopy(prompt_out.past_key_values)
            cache.batch_repeat_interleave(len(batch))
            with torch.inference_mode():
                logits = self._model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     past_key_values=cache, use_cache=True).logits
            self._collect(logits, batch, results)
        return results

    def _score_full(self, encoded: list[list[int]]) -> list[float]:
        import torch

        results = [0.0] * len(encoded)
        budget = self._config.max_batch_tokens
        for batch in token_budget_batches([len(e) for e in encoded], budget):
            padded = self._tokenizer.pad({"input_ids": [encoded[i] for i in batch]},
                                         return_tensors="pt")
            padded = {k: v.to(self._config.device) for k, v in padded.items()}
            with torch.inference_mode():
                logits = self._model(**padded).logits
            self._collect(logits, batch, results)
        return results

    def _collect(self, logits: Any, batch: list[int], results: list[float]) -> None:
        column = logits[:, self._label_index].float().cpu().tolist()
        for i, value in zip(batch, column, strict=True):
            results[i] = float(value)  # non-finite values are the guard's to refuse
