"""Language model as judge, through the serving engine itself.

The policy model (or whatever model the engine serves) is asked whether a response is good;
the reward is log p(yes) - log p(no) for its next token. No second copy of the weights is
loaded: the queries go to the same engine as generation, which batches them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

from common.config import JudgeRewardConfig
from common.prompts import Message, Prompt, prompt_as_text
from reward.base import RewardError, check_lengths

DEFAULT_TEMPLATE = (
    "Here is a request and a response to it. The response may be unfinished.\n\n"
    "Request:\n{prompt}\n\nResponse:\n{response}\n\n"
    "Is the response helpful, correct and well written so far? Answer Yes or No."
)


class LabelLogprobSource(Protocol):
    """An engine that returns the next-token log-probabilities of given labels."""

    async def label_logprobs(self, prompt: Prompt, labels: Sequence[str]) -> list[float]: ...


class JudgeScorer:
    """Reward = log p(yes_token) - log p(no_token) from a co-located language model."""

    def __init__(self, config: JudgeRewardConfig, source: LabelLogprobSource) -> None:
        self.name = config.name
        self._source = source
        self._template = config.judge_template or DEFAULT_TEMPLATE
        self._labels = (config.yes_token, config.no_token)
        if "{prompt}" not in self._template or "{response}" not in self._template:
            raise ValueError("judge_template must contain {prompt} and {response}")

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def judge_prompt(self, prompt: Prompt, response: str) -> tuple[Message, ...]:
        text = self._template.replace("{prompt}", prompt_as_text(prompt)).replace(
            "{response}", response
        )
        return (Message(role="user", content=text),)

    async def _one(self, prompt: Prompt, response: str) -> float:
        yes, no = await self._source.label_logprobs(self.judge_prompt(prompt, response),
                                                   self._labels)
        margin = yes - no
        if margin != margin:  # NaN
            raise RewardError(f"reward '{self.name}' produced NaN")
        return margin

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        check_lengths(prompts, responses)
        # Concurrent engine requests: the engine batches them and shares the common prefix.
        return list(await asyncio.gather(*(self._one(p, r) for p, r in zip(prompts, responses,
                                                                           strict=True))))
