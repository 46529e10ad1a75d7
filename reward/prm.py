"""Process reward models (PRMs), in the serving process: a score for each reasoning step.

A response is split into steps at ``step_delimiter``; the model reads the question and the
steps in the format it was trained on, and each step gets the model's probability that the
step is good, in [0, 1]. Three formats cover the public PRMs:

- ``step_tag`` (math-shepherd): ``question step1 <tag>\\nstep2 <tag>``, a causal LM; a step's
  score is p(good) / (p(good) + p(bad)) of the label tokens in the next-token distribution
  at its tag's position.
- ``chat`` (RLHFlow): the steps as user turns (the first one prefixed by the question), each
  answered by an assistant turn holding the good label; a step's score is the same ratio in
  the next-token distribution where the assistant's label for that step is generated.
- ``token_classification`` (Qwen2.5-Math-PRM): the conversation with ``separator`` after
  every step of the assistant's answer, a two-class token head; softmax(logits)[1] at each
  separator.

The reward aggregates the step scores: ``last`` (the newest step, for blockwise decoding
with a block delimiter, where prefix + block holds every step so far), ``min`` or ``prod``.
Candidates of one block share the question and the earlier steps: their KV is computed once
and each candidate's newest step runs on top of it. Concurrent requests are gathered into
shared batches on one worker thread (reward/batching.py, as in reward/hf.py); a batch that
fails is retried request by request.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from common.config import PRMRewardConfig
from common.prompts import Prompt, chat_messages, prompt_as_text
from reward.base import BlockQuery, RewardError, Scores, check_lengths
from reward.batching import BatchedModelScorer, BatchWorker
from reward.cost import forward_tokens
from reward.hf import token_budget_batches

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Query:
    prompt: Prompt
    response: str


@dataclass(frozen=True)
class Rendered:
    """The text a PRM reads for one response: ``reads`` are the character offsets (exclusive
    ends) after which each step is scored; ``newest`` is where the newest step starts (the
    text before it is shared by every candidate of a block), None when unknown."""

    text: str
    reads: list[int]
    newest: int | None


@dataclass(frozen=True)
class _Encoded:
    ids: list[int]
    reads: list[int]  # token positions whose output scores each step, in step order
    prefix: tuple[int, ...] | None  # leading ids shared with the block's other candidates


def split_steps(response: str, delimiter: str) -> list[str]:
    """The response's steps: split at ``delimiter``, stripped, empty ones dropped (a response
    without any text is one empty step)."""
    steps = [part.strip() for part in response.split(delimiter)]
    return [s for s in steps if s] or [response.strip()]


def question_text(prompt: Prompt) -> str:
    """What a step-tag or chat PRM reads as the question: a plain prompt as it is, a chat
    prompt's last user message (system messages and earlier turns are not read)."""
    if isinstance(prompt, str):
        return prompt
    users = [m.content for m in prompt if m.role == "user"]
    return users[-1] if users else prompt_as_text(prompt)


def aggregate(values: Sequence[float], how: str) -> float:
    """The reward of a response from its step scores: ``last``, ``min`` or ``prod``."""
    if not values:
        raise RewardError("no step was scored")
    if how == "last":
        return float(values[-1])
    if how == "min":
        return float(min(values))
    return float(math.prod(values))


def _newest_start(text: str, step: str, reads: list[int]) -> int | None:
    if not step:
        return None
    low = reads[-2] if len(reads) > 1 else 0
    index = text.rfind(step, low, reads[-1])
    return index if index >= 0 else None


class PRMScorer(BatchedModelScorer[_Query]):
    """A process reward model with cross-request micro-batching and shared-prefix KV."""

    def __init__(self, config: PRMRewardConfig) -> None:
        self.name = config.name
        self.timeout_s = config.timeout_s  # applied by engine/guarded.py to every call
        self._config = config
        self._model: Any = None
        self._tokenizer: Any = None
        self._label_ids: list[int] = []  # good, bad (causal formats)
        self._share_kv = False
        # _score_queries is looked up at every batch, so a replaced method is the one used.
        self._batcher: BatchWorker[_Query] = BatchWorker(
            config.name, config.batch_wait_ms, lambda queries: self._score_queries(queries),
            logger)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def shares_prefix_kv(self) -> bool:
        return self._share_kv

    @property
    def _causal(self) -> bool:
        return self._config.format != "token_classification"

    def _load(self) -> None:
        import torch
        from transformers import AutoTokenizer

        cfg = self._config
        dtype = "auto" if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        source = str(cfg.model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                source, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
            model = self._load_model(source, dtype)
        except (OSError, ValueError) as exc:
            raise RewardError(f"reward '{self.name}': cannot load '{cfg.model}': {exc}") from exc
        if not getattr(tokenizer, "is_fast", False):
            raise RewardError(f"reward '{self.name}': the prm reward needs a fast tokenizer "
                              "(a tokenizer.json), which gives character offsets")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self._tokenizer = tokenizer
        if cfg.format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise RewardError(f"reward '{self.name}': format 'chat' needs a model with a "
                              "chat template")
        if self._causal:
            self._label_ids = [self._single_token("good_token", cfg.good_token),
                               self._single_token("bad_token", cfg.bad_token)]
            if self._label_ids[0] == self._label_ids[1]:
                raise RewardError(f"reward '{self.name}': good_token and bad_token are the "
                                  "same token")
        model.to(cfg.device)
        model.eval()
        self._model = model
        self._share_kv = cfg.share_prefix_kv and self._kv_sharing_matches()
        logger.info("process reward model loaded",
                    extra={"reward": self.name, "device": cfg.device, "format": cfg.format})

    def _load_model(self, source: str, dtype: Any) -> Any:
        from transformers import (
            AutoConfig,
            AutoModel,
            AutoModelForCausalLM,
            AutoModelForTokenClassification,
        )

        cfg = self._config
        common = {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}
        if self._causal:
            return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **common)
        model_config = AutoConfig.from_pretrained(source, **common)
        auto_map = getattr(model_config, "auto_map", None) or {}
        # Qwen2.5-Math-PRM ships its head as remote code registered for AutoModel only.
        if (cfg.trust_remote_code and "AutoModelForTokenClassification" not in auto_map
                and "AutoModel" in auto_map):
            return AutoModel.from_pretrained(source, dtype=dtype, **common)
        return AutoModelForTokenClassification.from_pretrained(source, dtype=dtype, **common)

    def _single_token(self, field: str, token: str) -> int:
        ids = self._tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise RewardError(
                f"reward '{self.name}': {field} {token!r} is not a single token of the "
                f"model's tokenizer (it encodes to {len(ids)} tokens); choose a label that is "
                "one token")
        return int(ids[0])

    def _kv_sharing_matches(self) -> bool:
        """Whether scoring on a shared prefix KV gives the full computation's values."""
        ids = self._tokenizer.encode("one two three four five six seven eight",
                                     add_special_tokens=False)
        if len(ids) < 6:
            return False
        prefix = tuple(ids[:3])
        items = [_Encoded(list(ids), [2, len(ids) - 1], prefix),
                 _Encoded(list(ids[:-2]), [2, len(ids) - 3], prefix)]
        try:
            shared = self._score_group(list(prefix), [0, 1], items)
        except Exception:  # a model without a usable cache: no sharing
            logger.info("prefix KV sharing unavailable", extra={"reward": self.name})
            return False
        reference = self._score_full(items)
        return len(shared) == 2 and all(
            abs(a - b) <= 1e-3 for i in (0, 1)
            for a, b in zip(shared[i], reference[i], strict=True))

    # -- formatting ------------------------------------------------------------------------

    def render(self, prompt: Prompt, response: str) -> Rendered:
        """The text the model reads for one (prompt, response) pair, with its read points."""
        steps = split_steps(response, self._config.step_delimiter)
        if self._config.format == "step_tag":
            rendered = self._render_step_tag(question_text(prompt), steps)
        elif self._config.format == "chat":
            rendered = self._render_chat(question_text(prompt), steps)
        else:
            rendered = self._render_separated(prompt, steps)
        return rendered

    def _render_step_tag(self, question: str, steps: list[str]) -> Rendered:
        tag = self._config.step_tag
        text, reads, newest = f"{question} ", [], 0
        for index, step in enumerate(steps):
            if index:
                text += "\n"
            newest = len(text)
            text += f"{step} {tag}"
            reads.append(len(text))
        return Rendered(text, reads, newest if steps[-1] else None)

    def _template(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return str(self._tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt))

    def _render_chat(self, question: str, steps: list[str]) -> Rendered:
        turns: list[dict[str, str]] = []
        for index, step in enumerate(steps):
            turns.append({"role": "user", "content": f"{question} {step}" if index == 0
                          else step})
            turns.append({"role": "assistant", "content": self._config.good_token})
        text = self._template(turns, False)
        reads = []
        for index in range(len(steps)):
            before = self._template(turns[: 2 * index + 1], True)
            if not text.startswith(before):
                raise RewardError(f"reward '{self.name}': the chat template does not render "
                                  "the turns of a conversation one after the other")
            reads.append(len(before))
        return Rendered(text, reads, _newest_start(text, steps[-1], reads))

    def _render_separated(self, prompt: Prompt, steps: list[str]) -> Rendered:
        separator = self._config.separator
        answer = "".join(f"{step}{separator}" for step in steps)
        if getattr(self._tokenizer, "chat_template", None):
            messages = [*chat_messages(prompt), {"role": "assistant", "content": answer}]
            text = self._template(messages, False)
            base = text.rfind(answer)
            if base < 0:
                raise RewardError(f"reward '{self.name}': the chat template changed the "
                                  "steps of the answer")
        else:
            base = len(prompt_as_text(prompt)) + 1
            text = f"{prompt_as_text(prompt)}\n{answer}"
        reads, offset = [], base
        for step in steps:
            offset += len(step) + len(separator)
            reads.append(offset)
        return Rendered(text, reads, _newest_start(text, steps[-1], reads))

    @property
    def _add_special_tokens(self) -> bool:
        # A chat template already writes the special tokens the model was trained with.
        templated = self._config.format == "chat" or (
            self._config.format == "token_classification"
            and bool(getattr(self._tokenizer, "chat_template", None)))
        return not templated

    def encode(self, rendered: Rendered) -> _Encoded:
        """Token ids, the positions read for each step, and the ids shared with siblings."""
        encoding = self._tokenizer(rendered.text, add_special_tokens=self._add_special_tokens,
                                   return_offsets_mapping=True)
        ids = list(encoding["input_ids"])
        offsets = [(int(s), int(e)) for s, e in encoding["offset_mapping"]]
        reads = []
        for end in rendered.reads:
            inside = [t for t, (s, e) in enumerate(offsets) if e > s and s < end]
            if not inside:
                raise RewardError(f"reward '{self.name}': a step has no token to score")
            reads.append(max(inside))
        if self._config.aggregation == "last":
            reads = reads[-1:]
        drop = max(0, len(ids) - self._config.max_length)
        if drop:  # the oldest tokens go first; the newest step stays
            ids = ids[drop:]
            reads = [r - drop for r in reads if r >= drop]
            if not reads:
                raise RewardError(f"reward '{self.name}': the newest step does not fit in "
                                  f"max_length ({self._config.max_length} tokens)")
        prefix: tuple[int, ...] | None = None
        if not drop and rendered.newest is not None:
            head = rendered.text[: rendered.newest].rstrip()
            if head:
                shared = self._tokenizer(head, add_special_tokens=self._add_special_tokens)
                candidate = list(shared["input_ids"])
                if (0 < len(candidate) <= reads[-1] and len(candidate) < len(ids)
                        and ids[: len(candidate)] == candidate):
                    prefix = tuple(candidate)
        return _Encoded(ids, reads, prefix)

    # -- serving ---------------------------------------------------------------------------

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        self._batcher.check_open()
        queries = [_Query(p, r) for p, r in zip(prompts, responses, strict=True)]
        return await self._batcher.submit(queries)

    async def score_block(self, query: BlockQuery) -> Scores:
        """The rewards of a block and the tokens the model runs on for them (reward/cost.py),
        counted from the same encodings the scoring thread builds."""
        responses = query.responses()
        prompts = [query.prompt] * len(responses)
        self._batcher.check_open()
        encoded = await self._batcher.run(
            lambda: [self.encode(self.render(p, r)) for p, r in zip(prompts, responses,
                                                                   strict=True)])
        computed, reused = forward_tokens([(e.prefix, e.ids) for e in encoded], self._share_kv)
        return Scores(await self.score(prompts, responses), computed_tokens=computed,
                      cached_tokens=reused)

    # -- scoring (worker thread) -----------------------------------------------------------

    def step_scores(self, prompts: Sequence[Prompt], responses: Sequence[str]
                    ) -> list[list[float]]:
        """Each response's scored steps (the newest only with ``last``). Synchronous, on the
        calling thread: for tests and tools, not for a scorer that is serving requests."""
        check_lengths(prompts, responses)
        return self._score_encoded([self.encode(self.render(p, r))
                                    for p, r in zip(prompts, responses, strict=True)])

    def _score_queries(self, queries: list[_Query]) -> list[float]:
        steps = self._score_encoded([self.encode(self.render(q.prompt, q.response))
                                     for q in queries])
        return [aggregate(values, self._config.aggregation) for values in steps]

    def _score_encoded(self, items: list[_Encoded]) -> list[list[float]]:
        """Step scores of each item; items sharing a prefix reuse its KV when possible."""
        results: dict[int, list[float]] = {}
        if self._share_kv:
            groups: dict[tuple[int, ...], list[int]] = {}
            for index, item in enumerate(items):
                if item.prefix is not None:
                    groups.setdefault(item.prefix, []).append(index)
            for prefix, members in groups.items():
                if len(members) > 1:
                    results.update(self._score_group(list(prefix), members, items))
        rest = [i for i in range(len(items)) if i not in results]
        for index, values in zip(rest, self._score_full([items[i] for i in rest]), strict=True):
            results[index] = values
        return [results[i] for i in range(len(items))]

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self._model.config)
        except TypeError:  # older signatures
            return DynamicCache()

    def _forward(self, ids: Any, mask: Any, cache: Any, positions: list[int]) -> Any:
        """p(good) at ``positions`` of every row: a (rows, len(positions)) float tensor."""
        import torch

        device = self._config.device
        index = torch.tensor(positions, dtype=torch.long, device=device)
        kwargs: dict[str, Any] = {"input_ids": ids.to(device), "use_cache": cache is not None}
        if mask is not None:
            kwargs["attention_mask"] = mask.to(device)
        if cache is not None:
            kwargs["past_key_values"] = cache
        with torch.inference_mode():
            if self._causal:
                # Only the read positions go through the LM head (the vocabulary is large).
                logits = self._model(**kwargs, logits_to_keep=index).logits
                pair = logits[..., self._label_ids].float()
                return pair.softmax(dim=-1)[..., 0].cpu()
            output = self._model(**kwargs)
            logits = output.logits if hasattr(output, "logits") else output[0]
            if logits.shape[-1] != 2:
                raise RewardError(f"reward '{self.name}': a token-classification PRM needs 2 "
                                  f"classes, the model has {logits.shape[-1]}")
            return logits[:, index, :].float().softmax(dim=-1)[..., 1].cpu()

    def _score_full(self, items: list[_Encoded]) -> list[list[float]]:
        import torch

        results: list[list[float]] = [[] for _ in items]
        pad = self._tokenizer.pad_token_id or 0
        for batch in token_budget_batches([len(item.ids) for item in items],
                                          self._config.max_batch_tokens):
            longest = max(len(items[i].ids) for i in batch)
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), longest), dtype=torch.long)
            for row, i in enumerate(batch):
                ids[row, : len(items[i].ids)] = torch.tensor(items[i].ids)
                mask[row, : len(items[i].ids)] = 1
            union = sorted({r for i in batch for r in items[i].reads})
            probs = self._forward(ids, mask, None, union)
            where = {position: column for column, position in enumerate(union)}
            for row, i in enumerate(batch):
                results[i] = [float(probs[row, where[r]]) for r in items[i].reads]
        return results

    def _score_group(self, prefix: list[int], members: list[int],
                     items: list[_Encoded]) -> dict[int, list[float]]:
        """Score the members (whose ids extend ``prefix``) on top of the prefix's KV cache."""
        import torch

        size = len(prefix)
        cache = self._new_cache()
        earlier = sorted({r for i in members for r in items[i].reads if r < size})
        probs = self._forward(torch.tensor([prefix]), None, cache, earlier or [size - 1])
        from_prefix = {r: float(probs[0, column]) for column, r in enumerate(earlier)}
        results: dict[int, list[float]] = {}
        pad = self._tokenizer.pad_token_id or 0
        lengths = [len(items[i].ids) for i in members]
        for rows in token_budget_batches(lengths, self._config.max_batch_tokens):
            batch = [members[r] for r in rows]
            suffixes = [items[i].ids[size:] for i in batch]
            longest = max(len(s) for s in suffixes)
            ids = torch.full((len(batch), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), size + longest), dtype=torch.long)
            mask[:, :size] = 1
            for row, suffix in enumerate(suffixes):
                ids[row, : len(suffix)] = torch.tensor(suffix)
                mask[row, size : size + len(suffix)] = 1
            union = sorted({r - size for i in batch for r in items[i].reads if r >= size})
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(batch))
            probs = self._forward(ids, mask, batch_cache, union)
            where = {position: column for column, position in enumerate(union)}
            for row, i in enumerate(batch):
                results[i] = [from_prefix[r] if r < size else float(probs[row, where[r - size]])
                              for r in items[i].reads]
        return results
