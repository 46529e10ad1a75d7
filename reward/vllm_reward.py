"""A reward model served by a co-located vLLM engine in pooling mode (``type: vllm``).

The same formatting as the ``hf`` backend (the reward model's chat template over
(prompt, response), raw logit of the chosen label), so the two give the same scores; vLLM
adds continuous batching and prefix caching. Token-id inputs make the conversation's
shared part (prompt, earlier blocks) a prefix-cache hit: the first candidate of a block is
sent alone, and the others reuse what it computed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from common.config import VLLMRewardConfig
from common.prompts import Prompt, conversation, prompt_as_text
from reward.base import BlockQuery, RewardError, Scores, check_lengths


@dataclass(frozen=True)
class Classified:
    """One input's raw classifier logits, and its prompt tokens computed and cached."""

    logits: list[float]
    computed_tokens: int
    cached_tokens: int


class ClassifierEngine(Protocol):
    """What this scorer needs of a pooling engine (``engine.vllm_pooling.PoolingEngine``)."""

    tokenizer: Any
    num_labels: int
    label2id: dict[str, int]
    max_model_len: int

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def classify(self, token_ids: Sequence[int]) -> Classified: ...


class VLLMRewardScorer:
    """Reward = the raw logit of the configured label, from a vLLM pooling engine."""

    def __init__(self, config: VLLMRewardConfig, engine: ClassifierEngine) -> None:
        self.name = config.name
        self.timeout_s = config.timeout_s  # applied by engine/guarded.py to every call
        self._config = config
        self._engine = engine
        self._label = 0

    async def start(self) -> None:
        try:
            await self._engine.start()
        except Exception as exc:
            raise RewardError(f"reward '{self.name}': cannot start the reward engine for "
                              f"'{self._config.model}': {exc}") from exc
        self._label = self._resolve_label()

    async def close(self) -> None:
        await self._engine.close()

    async def reset_prefix_cache(self) -> None:
        reset = getattr(self._engine, "reset_prefix_cache", None)
        if reset is not None:
            await reset()

    @property
    def ready(self) -> bool:
        return bool(getattr(self._engine, "ready", True))

    def _resolve_label(self) -> int:
        label, count = self._config.label, self._engine.num_labels
        if label is None:
            if count != 1:
                raise RewardError(f"reward '{self.name}' has {count} labels; set 'label'")
            return 0
        index = label if isinstance(label, int) else self._engine.label2id.get(label)
        if index is None or not 0 <= index < count:
            raise RewardError(f"reward '{self.name}': unknown label {label!r}")
        return index

    @property
    def _templated(self) -> bool:
        tokenizer = self._engine.tokenizer
        return self._config.use_chat_template and bool(getattr(tokenizer, "chat_template", None))

    def token_ids(self, prompt: Prompt, response: str) -> list[int]:
        """The reward model's input for one pair, as the ``hf`` backend builds it."""
        tokenizer = self._engine.tokenizer
        if self._templated:
            text = str(tokenizer.apply_chat_template(conversation(prompt, response),
                                                     tokenize=False))
        else:
            text = f"{prompt_as_text(prompt)}{tokenizer.sep_token or chr(10)}{response}"
        ids = tokenizer(text, add_special_tokens=not self._templated)["input_ids"]
        return list(ids[: self._engine.max_model_len])

    async def _classify(self, ids: list[int]) -> Classified:
        try:
            return await self._engine.classify(ids)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise RewardError(f"reward '{self.name}' failed: {exc}") from exc

    async def _scores(self, inputs: list[list[int]]) -> Scores:
        if not inputs:
            return Scores([])
        # The first input computes the shared prefix; sent together, every input would
        # compute it again (none finds in the cache what none has finished computing).
        first = await self._classify(inputs[0])
        rest = await asyncio.gather(*(self._classify(ids) for ids in inputs[1:]))
        answers = [first, *rest]
        rewards = [a.logits[self._label] for a in answers]
        if any(r != r for r in rewards):
            raise RewardError(f"reward '{self.name}' produced NaN")
        return Scores(rewards, computed_tokens=sum(a.computed_tokens for a in answers),
                      cached_tokens=sum(a.cached_tokens for a in answers))

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        inputs = [self.token_ids(p, r) for p, r in zip(prompts, responses, strict=True)]
        return (await self._scores(inputs)).rewards

    async def score_block(self, query: BlockQuery) -> Scores:
        return await self._scores([self.token_ids(query.prompt, r) for r in query.responses()])
