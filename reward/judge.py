"""Language model as judge, through the serving engine itself.

The policy model (or whatever model the engine serves) is asked whether a response is good;
the reward is log p(yes) - log p(no) for its next token. No second copy of the weights is
loaded: the queries go to the same engine as generation.

The query is laid out so that everything shared comes first and is found in the engine's
prefix cache (docs/rewards.md, "The judge"): the generation prompt's own token ids, then
the response's token ids, then a short fixed follow-up turn that asks the question. The
prompt and earlier blocks were computed by generation, and each candidate's tokens by the
sample that produced it, so a query computes little more than the follow-up turn.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from common.config import JudgeRewardConfig
from common.prompts import Message, Prompt, prompt_as_text
from reward.base import BlockQuery, RewardError, Scores, check_lengths

DEFAULT_QUESTION = (
    "Is your response above helpful, correct and well written so far? "
    "It may be unfinished. Answer Yes or No."
)


@dataclass(frozen=True)
class LabelLogprobs:
    """Next-token log-probabilities of the labels, and the query's prompt tokens computed
    and found cached."""

    values: list[float]
    computed_tokens: int
    cached_tokens: int


class JudgeEngine(Protocol):
    """What the judge needs of the serving engine."""

    max_model_len: int

    def encode_prompt(self, prompt: Prompt) -> list[int]: ...

    def encode_text(self, text: str) -> list[int]: ...

    def follow_up_ids(self, question: str) -> list[int]: ...

    async def label_logprobs(self, token_ids: Sequence[int],
                             labels: Sequence[str]) -> LabelLogprobs: ...


class JudgeScorer:
    """Reward = log p(yes_token) - log p(no_token) from a co-located language model."""

    never_choose_negative_infinity = False  # -inf from the judge is a failure
    # Its queries run on the generation engine, through its prefix cache (engine/pruned.py).
    reuses_prefix_cache = True
    healthy = True  # the engine is the generator's, watched by the server itself

    def __init__(self, config: JudgeRewardConfig, engine: JudgeEngine) -> None:
        self.name = config.name
        self.timeout_s = config.timeout_s  # applied by engine/guarded.py
        self._engine = engine
        self._labels = (config.yes_token, config.no_token)
        self._question = config.question or DEFAULT_QUESTION
        self._template = config.judge_template
        if self._template is not None and ("{prompt}" not in self._template
                                           or "{response}" not in self._template):
            raise ValueError("judge_template must contain {prompt} and {response}")
        self._suffix: list[int] | None = None

    async def start(self) -> None:
        # Nothing to load: the engine is the generator's. The start-up self-test
        # (engine/selftest.py) sends the first label query, which builds the engine's
        # log-probability helper before any user request.
        return None

    async def close(self) -> None:
        return None

    def _follow_up(self) -> list[int]:
        if self._suffix is None:
            self._suffix = list(self._engine.follow_up_ids(self._question))
        return self._suffix

    def query_ids(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[int]:
        """The judge query: generation prompt, response, follow-up question turn."""
        return [*prompt_ids, *response_ids, *self._follow_up()]

    def _text_query(self, prompt: Prompt, response: str) -> list[int]:
        if self._template is not None:  # a custom template re-renders the whole query
            text = self._template.replace("{prompt}", prompt_as_text(prompt)).replace(
                "{response}", response)
            return self._engine.encode_prompt((Message(role="user", content=text),))
        return self.query_ids(self._engine.encode_prompt(prompt),
                              self._engine.encode_text(response))

    async def _ask(self, ids: list[int]) -> LabelLogprobs:
        limit = self._engine.max_model_len - 1
        if len(ids) > limit:  # keep the question; the oldest context goes first
            ids = ids[-limit:]
        result = await self._engine.label_logprobs(ids, self._labels)
        yes, no = result.values
        if yes - no != yes - no:  # NaN
            raise RewardError(f"reward '{self.name}' produced NaN")
        return result

    async def _scores(self, queries: list[list[int]]) -> Scores:
        answers = await asyncio.gather(*(self._ask(ids) for ids in queries))
        return Scores([a.values[0] - a.values[1] for a in answers],
                      computed_tokens=sum(a.computed_tokens for a in answers),
                      cached_tokens=sum(a.cached_tokens for a in answers))

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        queries = [self._text_query(p, r) for p, r in zip(prompts, responses, strict=True)]
        return (await self._scores(queries)).rewards

    async def score_block(self, query: BlockQuery) -> Scores:
        """The n queries of one block, all at once: their shared part is already cached."""
        if self._template is not None:
            responses = query.responses()
            return await self._scores([self._text_query(query.prompt, r) for r in responses])
        shared = [*query.prompt_ids, *query.prefix_ids]
        return await self._scores([self.query_ids(shared, ids) for ids in query.block_ids])
