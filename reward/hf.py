"""Hugging Face sequence-classification reward models, in the serving process.

The standard format of real reward models (Skywork-Reward, ArmoRM, OpenAssistant's DeBERTa
models): ``AutoModelForSequenceClassification`` with one output logit, or a chosen label.
(prompt, response) pairs are formatted with the reward model's own chat template when it has
one. Concurrent requests are gathered into shared batches, split by a token budget, and run
on one worker thread so the event loop never blocks (chat templates and tokenising run there
too); a batch that fails is retried request by request (reward/batching.py), and the
reward's ``timeout_s`` bounds every call (engine/guarded.py). Inputs longer than
``max_length`` lose their oldest prompt tokens, never the response (reward/truncation.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.config import HFRewardConfig
from common.prompts import Prompt, conversation, prompt_as_text
from reward.base import BlockQuery, RewardError, Scores, check_lengths
from reward.batching import BatchedModelScorer, BatchWorker
from reward.cost import forward_tokens
from reward.truncation import fit_group, leading_special

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Item:
    """One pair as the model reads it: prompt plus response, and the prompt part alone
    (fitted to ``max_length`` alike, so pairs of one prompt share it)."""

    prefix: tuple[int, ...]
    full: list[int]


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
        self._room: int | None = None  # response tokens that fit whole (set at load)
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
        self._room = cfg.max_length - len(self._encode(self.format("", "")))
        self._share_kv = cfg.share_prompt_kv and self._kv_sharing_matches()
        logger.info("reward model loaded", extra={"reward": self.name, "device": cfg.device})

    def _kv_sharing_matches(self) -> bool:
        """Whether scoring on a shared prompt KV gives the full computation's values.

        Causal models with a KV cache do (the prompt's KV is computed once for all n
        responses); bidirectional encoders do not, and fall back to full recomputation.
        """
        probe = "Say something kind."
        items, _ = self._encode_pairs([probe] * 2,
                                      ["Hello there, friend.", "You are doing well today."])
        full = [item.full for item in items]
        try:
            shared = self._score_group(list(items[0].prefix), [0, 1], full)
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

    def response_room(self) -> int | None:
        """Response tokens that fit ``max_length`` whole, beside the template's own."""
        return self._room

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        return (await self._score_pairs(prompts, responses)).rewards

    async def score_block(self, query: BlockQuery) -> Scores:
        responses = query.responses()
        return await self._score_pairs([query.prompt] * len(responses), responses)

    async def _score_pairs(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> Scores:
        check_lengths(prompts, responses)
        self._batcher.check_open()
        if not prompts:
            return Scores([])
        # Templates and tokenising on the scoring thread: off the event loop, and never
        # concurrent with the model's own use of the tokenizer.
        try:
            items, truncated = await self._batcher.run(
                lambda: self._encode_pairs(list(prompts), list(responses)))
        except Exception as exc:  # a chat template that refuses the conversation
            raise RewardError(f"reward '{self.name}' cannot build its input: "
                              f"{type(exc).__name__}") from exc
        # The tokens this request's inputs need (reward/cost.py): the cost axis of ``hf``.
        computed, reused = forward_tokens([(i.prefix, i.full) for i in items], self._share_kv)
        return Scores(await self._batcher.submit(items), computed_tokens=computed,
                      cached_tokens=reused, truncated=truncated)

    def _encode_pairs(self, prompts: list[Prompt],
                      responses: list[str]) -> tuple[list[_Item], bool]:
        """Each pair's input, fitted to ``max_length`` per prompt (reward/truncation.py)."""
        groups: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault(self.format_prefix(prompt), []).append(index)
        full = [self._encode(self.format(p, r)) for p, r in zip(prompts, responses, strict=True)]
        items: dict[int, _Item] = {}
        truncated = False
        for prefix_text, members in groups.items():
            prefix = self._encode(prefix_text)
            fitted, cut = fit_group([full[i] for i in members] + [prefix],
                                    self._config.max_length,
                                    leading_special(prefix, self._tokenizer.bos_token_id))
            truncated = truncated or cut
            for index, ids in zip(members, fitted, strict=False):
                items[index] = _Item(tuple(fitted[-1]), ids)
        return [items[i] for i in range(len(prompts))], truncated

    def _encode(self, text: str) -> list[int]:
        # A chat template already writes the special tokens the model was trained with.
        return list(self._tokenizer(text, add_special_tokens=not self._templated)["input_ids"])

    def _score_items(self, items: list[_Item]) -> list[float]:
        """Score pairs; responses to the same prompt share the prompt's KV when possible."""
        full = [item.full for item in items]
        results: dict[int, float] = {}
        if self._share_kv:
            groups: dict[tuple[int, ...], list[int]] = {}
            for index, item in enumerate(items):
                groups.setdefault(item.prefix, []).append(index)
            for prefix, members in groups.items():
                if len(members) > 1:
                    results.update(self._score_group(list(prefix), members, full))
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
