"""A reward model served by a co-located vLLM engine in pooling mode (``type: vllm``).

The same formatting as the ``hf`` backend (the reward model's chat template over
(prompt, response), raw logit of the chosen label), so the two give the same scores; vLLM
adds continuous batching and prefix caching. Token-id inputs make the conversation's
shared part (prompt, earlier blocks) a prefix-cache hit: the first candidate of a block is
sent alone, and the others reuse what it computed. Inputs are built on a tokenizing thread of
their own (never on the event loop); longer than the engine's length, they lose their
oldest prompt tokens, never the response (reward/truncation.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from common.config import VLLMRewardConfig
from common.prompts import Prompt, conversation, prompt_as_text
from reward.base import BlockQuery, RewardError, Scores, check_lengths
from reward.truncation import fit_group, leading_special


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

    @property
    def healthy(self) -> bool:
        """False once the engine has died; True before start and while it runs."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def reset_prefix_cache(self) -> bool: ...

    async def classify(self, token_ids: Sequence[int]) -> Classified: ...


class VLLMRewardScorer:
    """Reward = the raw logit of the configured label, from a vLLM pooling engine."""

    never_choose_negative_infinity = False  # -inf from a model is a failure
    # Its queries run through a vLLM prefix cache (engine/pruned.py aligns checkpoints).
    reuses_prefix_cache = True

    def __init__(self, config: VLLMRewardConfig, engine: ClassifierEngine) -> None:
        self.name = config.name
        self.timeout_s = config.timeout_s  # applied by engine/guarded.py to every call
        self._config = config
        self._engine = engine
        self._label = 0
        self._room: int | None = None  # set at start, from the engine's tokenizer
        self._tokenizing = ThreadPoolExecutor(max_workers=1,
                                              thread_name_prefix=f"reward-{config.name}")

    async def start(self) -> None:
        try:
            await self._engine.start()
        except Exception as exc:
            raise RewardError(f"reward '{self.name}': cannot start the reward engine for "
                              f"'{self._config.model}': {exc}") from exc
        self._label = self._resolve_label()
        self._room = self._engine.max_model_len - len(self.token_ids("", ""))

    async def close(self) -> None:
        self._tokenizing.shutdown(wait=False, cancel_futures=True)
        await self._engine.close()

    async def reset_prefix_cache(self) -> None:
        await self._engine.reset_prefix_cache()

    @property
    def healthy(self) -> bool:
        """False once the pooling engine has died (vLLM reports it errored)."""
        return self._engine.healthy

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
        """The reward model's input for one pair, as the ``hf`` backend builds it (before it
        is fitted to the engine's length: :meth:`inputs`)."""
        tokenizer = self._engine.tokenizer
        if self._templated:
            text = str(tokenizer.apply_chat_template(conversation(prompt, response),
                                                     tokenize=False))
        else:
            text = f"{prompt_as_text(prompt)}{tokenizer.sep_token or chr(10)}{response}"
        return list(tokenizer(text, add_special_tokens=not self._templated)["input_ids"])

    def inputs(self, prompts: Sequence[Prompt],
               responses: Sequence[str]) -> tuple[list[list[int]], bool]:
        """Every pair's token ids, fitted to the engine's length per prompt: the oldest
        prompt tokens go first, the responses stay whole (reward/truncation.py)."""
        full = [self.token_ids(p, r) for p, r in zip(prompts, responses, strict=True)]
        groups: dict[Prompt, list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault(prompt, []).append(index)
        truncated = False
        bos = self._engine.tokenizer.bos_token_id
        for members in groups.values():
            fitted, cut = fit_group([full[i] for i in members], self._engine.max_model_len,
                                    leading_special(full[members[0]], bos))
            truncated = truncated or cut
            for index, ids in zip(members, fitted, strict=True):
                full[index] = ids
        return full, truncated

    def response_room(self) -> int | None:
        """Response tokens that fit the engine's length whole, beside the template's own."""
        return self._room

    async def _prepared(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> Scores:
        # Templates and tokenising (n x prompt + response per block) off the event loop, on
        # one thread: a fast tokenizer must not be used by two threads at once.
        loop = asyncio.get_running_loop()
        try:
            inputs, truncated = await loop.run_in_executor(
                self._tokenizing, self.inputs, list(prompts), list(responses))
        except Exception as exc:  # a template that refuses the input, or closed
            raise RewardError(f"reward '{self.name}' cannot build its input: "
                              f"{type(exc).__name__}") from exc
        scores = await self._scores(inputs)
        return dataclasses.replace(scores, truncated=truncated)

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
        return (await self._prepared(prompts, responses)).rewards

    async def score_block(self, query: BlockQuery) -> Scores:
        responses = query.responses()
        return await self._prepared([query.prompt] * len(responses), responses)
