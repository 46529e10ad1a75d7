"""Small fakes of the generation backend and the reward scorer for unit tests of logic."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.types import Candidate, SamplingSettings
from reward.base import Prompt, prompt_as_text


@dataclass
class Call:
    prompt_token_ids: list[int]
    n: int
    max_tokens: int
    request_id: str
    seed: int | None


@dataclass
class FakeBackend:
    """Emits words "w<k>"; candidate i of a call is i+1 tokens long unless ``script`` says."""

    model_name: str = "fake"
    max_model_len: int = 4096
    script: Callable[[Call, int], Candidate] | None = None
    calls: list[Call] = field(default_factory=list)

    async def generate(self, prompt_token_ids: Sequence[int], n: int, sampling: SamplingSettings,
                       max_tokens: int, request_id: str, seed: int | None) -> list[Candidate]:
        call = Call(list(prompt_token_ids), n, max_tokens, request_id, seed)
        self.calls.append(call)
        return [self._candidate(call, i) for i in range(n)]

    def _candidate(self, call: Call, i: int) -> Candidate:
        if self.script is not None:
            return self.script(call, i)
        rng = random.Random(hash((tuple(call.prompt_token_ids), call.seed, i)))
        ids = tuple(rng.randrange(100, 200) for _ in range(call.max_tokens))
        return Candidate(ids, "".join(f"w{t} " for t in ids), -0.5 * len(ids), "length")

    async def abort(self, request_ids: Sequence[str]) -> None:
        return None

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return [1, 2, 3]

    def num_unfinished_requests(self) -> int:
        return 0


@dataclass
class FakeScorer:
    """Reward = a function of the response text; records what it was asked."""

    fn: Callable[[str], float] = len
    name: str = "fake"
    seen: list[tuple[str, str]] = field(default_factory=list)

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        self.seen += [(prompt_as_text(p), r) for p, r in zip(prompts, responses, strict=True)]
        return [float(self.fn(r)) for r in responses]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
