"""Small fakes of the generation backend and the reward scorer for unit tests of logic."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from common.prompts import Prompt, prompt_as_text
from engine.pruned import sample_seed
from engine.sbon import SBoNEngine
from engine.types import Candidate, PrefillTokens, SamplingSettings


@dataclass
class Call:
    prompt_token_ids: list[int]
    n: int
    max_tokens: int
    request_id: str
    seed: int | None


def word(token_id: int) -> str:
    """The text of one token of the fake backend."""
    return f"w{token_id} "


def stop_at_stop_strings(candidate: Candidate, stops: Sequence[str]) -> Candidate:
    """What vLLM returns for ``candidate`` when ``stops`` are the request's stop strings.

    At the earliest stop string in the text, the text is cut before it, the finish reason
    is ``stop`` and the stop reason is the string. Token ids are kept up to the token that
    completed the stop string when the text is the fake's own words, all of them otherwise.
    """
    found = [(candidate.text.find(stop), stop) for stop in stops
             if stop and stop in candidate.text]
    if not found:
        return candidate
    index, stop = min(found)
    ids = candidate.token_ids
    if candidate.text == "".join(word(t) for t in ids):
        end, kept = 0, 0
        while end < index + len(stop):
            end += len(word(ids[kept]))
            kept += 1
        ids = ids[:kept]
    return dataclasses.replace(candidate, token_ids=ids, text=candidate.text[:index],
                               finish_reason="stop", stop_reason=stop)


@dataclass
class FakeBackend:
    """Emits words "w<k> " up to ``max_tokens``, seeded by the prefix, the seed and the index.

    ``script`` replaces the words with candidates of its own.

    Stop strings behave as in vLLM (see :func:`stop_at_stop_strings`), whether a candidate
    comes from the fake's own words or from ``script``.
    """

    model_name: str = "fake"
    max_model_len: int = 4096
    script: Callable[[Call, int], Candidate] | None = None
    calls: list[Call] = field(default_factory=list)
    delay_s: float = 0.0  # simulated generation time per call
    running: set[str] = field(default_factory=set)  # request ids inside generate() now
    sampling_seen: list[SamplingSettings] = field(default_factory=list)
    dead: BaseException | None = None  # set it to make the engine die
    kv_block_tokens: int | None = None  # prefix-cache block size (None: not aligned)
    chunk: int = 1  # sample_one: tokens per output
    token_delay_s: float = 0.0  # sample_one: pause before each output
    aborted: list[str] = field(default_factory=list)  # sample_one requests cancelled

    async def generate(self, prompt_token_ids: Sequence[int], n: int, sampling: SamplingSettings,
                       max_tokens: int, request_id: str, seed: int | None) -> list[Candidate]:
        call = Call(list(prompt_token_ids), n, max_tokens, request_id, seed)
        self.calls.append(call)
        self.sampling_seen.append(sampling)
        self.running.add(request_id)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        finally:
            self.running.discard(request_id)
        return [stop_at_stop_strings(self._candidate(call, i), sampling.stop) for i in range(n)]

    def _candidate(self, call: Call, i: int) -> Candidate:
        if self.script is not None:
            return self.script(call, i)
        rng = random.Random(hash((tuple(call.prompt_token_ids), call.seed, i)))
        ids = tuple(rng.randrange(100, 200) for _ in range(call.max_tokens))
        return Candidate(ids, "".join(word(t) for t in ids), -0.5 * len(ids), "length")

    async def generate_stream(self, prompt_token_ids: Sequence[int], sampling: SamplingSettings,
                              max_tokens: int, request_id: str, seed: int | None
                              ) -> AsyncIterator[str | Candidate]:
        """The same candidate as ``generate(n=1)``, its text sent word by word first."""
        (candidate,) = await self.generate(prompt_token_ids, 1, sampling, max_tokens,
                                           request_id, seed)
        for word in candidate.text.split(" "):
            if word:
                yield word + " "
        yield candidate

    async def sample_one(self, prompt_token_ids: Sequence[int], sampling: SamplingSettings,
                         max_tokens: int, request_id: str, seed: int | None, *,
                         on_output: Callable[[Sequence[int], PrefillTokens], None],
                         prefilled: asyncio.Event | None = None) -> Candidate:
        """One sample (the candidate ``generate(n=1)`` gives for ``seed``), reported
        ``chunk`` tokens at a time, ``token_delay_s`` apart; cancelling it records an abort."""
        call = Call(list(prompt_token_ids), 1, max_tokens, request_id, seed)
        self.calls.append(call)
        self.sampling_seen.append(sampling)
        candidate = stop_at_stop_strings(self._candidate(call, 0), sampling.stop)
        prefill = PrefillTokens(len(prompt_token_ids), 0)
        self.running.add(request_id)
        try:
            for start in range(0, max(1, candidate.num_tokens), self.chunk):
                await asyncio.sleep(self.token_delay_s)
                on_output(candidate.token_ids[start:start + self.chunk], prefill)
        except asyncio.CancelledError:
            self.aborted.append(request_id)
            raise
        finally:
            self.running.discard(request_id)
        return dataclasses.replace(candidate, prefill=prefill)

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(word(t) for t in token_ids)

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        # Three tokens, plus one per word beyond the first three (so length limits can bite).
        return [1, 2, 3] + [4] * max(0, len(prompt_as_text(prompt).split()) - 3)

    def num_unfinished_requests(self) -> int:
        return len(self.running)

    @property
    def ready(self) -> bool:
        return self.dead is None

    @property
    def dead_error(self) -> BaseException | None:
        return self.dead


class SampleByIndex(FakeBackend):
    """``generate`` draws sample i as ``sample_one`` with seed + i: the seeds vLLM gives."""

    async def generate(self, prompt_token_ids: Sequence[int], n: int, sampling: SamplingSettings,
                       max_tokens: int, request_id: str, seed: int | None) -> list[Candidate]:
        return [await self.sample_one(prompt_token_ids, sampling, max_tokens,
                                      f"{request_id}-{i}", sample_seed(seed, i),
                                      on_output=lambda ids, prefill: None) for i in range(n)]


def mean_id(text: str) -> float:
    """A reward over fake words ``w<id>``: the mean token id of the text."""
    words = text.split()
    return sum(int(w[1:]) for w in words) / max(1, len(words))


@dataclass
class FakeScorer:
    """Reward = a function of the response text; records what it was asked."""

    fn: Callable[[str], float] = len
    name: str = "fake"
    seen: list[tuple[str, str]] = field(default_factory=list)
    timeout_s: float = 120.0
    alive: bool = True  # False: the scorer died (``healthy`` turns False)
    # -inf is a failure unless a subclass declares it means "never choose".
    never_choose_negative_infinity: ClassVar[bool] = False
    reuses_prefix_cache: ClassVar[bool] = False  # True: queries go through a prefix cache

    @property
    def healthy(self) -> bool:
        return self.alive

    async def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        self.seen += [(prompt_as_text(p), r) for p, r in zip(prompts, responses, strict=True)]
        return [float(self.fn(r)) for r in responses]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


@dataclass
class FakeRuntime:
    """The shape of ``engine.runtime.Runtime`` that the server and the measurements use."""

    sbon: SBoNEngine
    backend: FakeBackend
    closed: bool = False

    async def close(self) -> None:
        self.closed = True


def fake_runtime(backend: FakeBackend | None = None,
                 scorers: dict[str, FakeScorer] | None = None) -> FakeRuntime:
    backend = backend or FakeBackend()
    scorers = scorers or {"fake": FakeScorer()}
    return FakeRuntime(SBoNEngine(backend, scorers, next(iter(scorers))), backend)
