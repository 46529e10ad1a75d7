"""From a parsed request to a :class:`Plan`, in two steps with admission between them.

:meth:`Planner.draft` checks everything that needs no tokenizer (model, unsupported fields,
counts and characters, soft best-of-n settings, the candidates it will cost), so that
admission can refuse a full server's request before any tokenising; :meth:`Planner.plan`
then tokenises the prompts in the tokenizer's worker thread and checks the lengths.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Any, Protocol

from common.config import AppConfig
from common.prompts import Prompt
from engine.pruned import check_checkpoints
from engine.resolve import SettingsError, resolve_params
from engine.sbon import SBoNEngine
from engine.seeds import SEED_MODULUS
from engine.types import SamplingSettings, SBoNParams
from reward.truncation import ResponseTooLong, check_response_room
from server.errors import InvalidRequest, NotFound
from server.limits import check_request_size, check_stops
from server.protocol import UNSUPPORTED_FIELDS, ChatCompletionRequest, CompletionRequest
from server.render import Kind

AnyRequest = CompletionRequest | ChatCompletionRequest


class ServingBackend(Protocol):
    """What the server needs of the engine beyond the soft best-of-n loop."""

    max_model_len: int

    @property
    def ready(self) -> bool:
        """True while the engine runs (engine/backend.py)."""
        ...

    @property
    def dead_error(self) -> BaseException | None:
        """Why the engine stopped; None while it runs."""
        ...

    def encode_prompt(self, prompt: Prompt) -> list[int]: ...

    def num_unfinished_requests(self) -> int: ...


class ServingRuntime(Protocol):
    """A started engine with its rewards (``engine.runtime.Runtime`` or a test double)."""

    @property
    def sbon(self) -> SBoNEngine: ...

    @property
    def backend(self) -> ServingBackend: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Draft:
    """A request checked without its tokens: what admission needs to count it."""

    request: AnyRequest
    kind: Kind
    prompts: list[Prompt]
    params: SBoNParams
    candidates: int  # prompts x n x sbon.n: what admission counts


@dataclass(frozen=True)
class Plan:
    """A validated request, ready to run, with the ids its response carries."""

    kind: Kind
    request_id: str
    response_id: str  # "chatcmpl-..." or "cmpl-...", the body's and every chunk's id
    created: int  # Unix seconds, as OpenAI's ``created``
    model: str  # the served model name
    prompts: list[Prompt]
    prompt_ids: list[list[int]]
    params: SBoNParams
    sampling: SamplingSettings
    choices_per_prompt: int
    show_sbon: bool
    return_candidates: bool
    include_usage: bool
    arrived: float  # event-loop time the request arrived
    deadline: float  # event-loop time by which the whole request must be answered
    candidates: int  # prompts x n x sbon.n: what admission counts
    log: bool = True  # False: the request opted out of the distillation log (sbon.log)

    def slots(self) -> list[tuple[int, int]]:
        """(choice index, prompt index) of every returned choice, in OpenAI's order."""
        return [(p * self.choices_per_prompt + c, p) for p in range(len(self.prompts))
                for c in range(self.choices_per_prompt)]

    def sampling_for(self, choice: int) -> SamplingSettings:
        """The sampling settings of one returned choice: its own seed when seeded.

        Per prompt: a batch of prompts with one seed answers each as a single request would.
        """
        seed = choice_seed(self.sampling.seed, choice % self.choices_per_prompt)
        return self.sampling if seed == self.sampling.seed else replace(self.sampling, seed=seed)


def choice_seed(seed: int | None, choice_index: int) -> int | None:
    """The seed of returned choice ``choice_index`` (OpenAI ``n``) of a seeded request.

    Choice 0 keeps the request's seed, so ``n = 1`` and the first of several choices agree;
    the others get seeds mixed from (seed, index), far from the block seeds of choice 0
    (engine/seeds.py spaces those ``BLOCK_SEED_STRIDE`` apart).
    """
    if seed is None or choice_index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{choice_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


class Planner:
    """Checks requests against the server's policy and tokenises their prompts."""

    def __init__(self, config: AppConfig, encoder: Executor | None = None) -> None:
        self.config = config
        self.encoder = encoder  # where prompts are tokenised (None: asyncio's default pool)

    def draft(self, request: AnyRequest, runtime: ServingRuntime) -> Draft:
        """Every check that needs no tokenizer; counts and characters first
        (server/limits.py), so that tokenising only ever sees bounded input."""
        self._check_model(request.model)
        refuse_unsupported(request)
        limits = self.config.limits
        check_request_size(request, limits)
        params = self._params(request, runtime)
        check_stops(request.stop_list(), params.block_delimiter)
        kind: Kind = "chat" if isinstance(request, ChatCompletionRequest) else "completion"
        prompts = _prompts(request)
        candidates = len(prompts) * request.n * params.n
        if candidates > limits.max_candidates_in_flight:
            raise InvalidRequest(
                f"{len(prompts)} prompts x n = {request.n} x sbon.n = {params.n} make "
                f"{candidates} candidates; the server runs at most "
                f"{limits.max_candidates_in_flight} at once", "sbon.n", "limit_exceeded")
        return Draft(request, kind, prompts, params, candidates)

    async def plan(self, draft: Draft, runtime: ServingRuntime, request_id: str,
                   arrived: float, deadline: float) -> Plan:
        """Tokenise the prompts (off the event loop), check lengths, and fix the ids."""
        request, params = draft.request, draft.params
        prompt_ids = await self._encode(draft.prompts, runtime.backend)
        max_tokens = self._max_tokens(request, max(len(ids) for ids in prompt_ids),
                                      runtime.backend.max_model_len)
        if params.block_size is not None:
            blocks = math.ceil(max_tokens / params.block_size)
            if blocks > self.config.limits.max_blocks:
                raise InvalidRequest(
                    f"{max_tokens} tokens in blocks of {params.block_size} make {blocks} blocks; "
                    f"the maximum is {self.config.limits.max_blocks}", "sbon.block_size",
                    "limit_exceeded")
        try:
            check_checkpoints(params, max_tokens, self.config.limits.max_blocks)
        except SettingsError as exc:
            raise InvalidRequest(str(exc), f"sbon.{exc.param}", "limit_exceeded") from exc
        if params.score:
            _check_reward_room(request, runtime.sbon.scorer_for(params.reward)[0], runtime,
                               max_tokens)
        sampling = SamplingSettings(
            temperature=request.temperature, top_p=request.top_p, top_k=max(0, request.top_k),
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty, max_tokens=max_tokens,
            stop=request.stop_list(), seed=request.seed)
        options = request.sbon
        prefix = "chatcmpl" if draft.kind == "chat" else "cmpl"
        return Plan(
            kind=draft.kind, request_id=request_id, response_id=f"{prefix}-{uuid.uuid4().hex}",
            created=int(time.time()), model=self.config.model.public_name,
            prompts=draft.prompts, prompt_ids=prompt_ids, params=params, sampling=sampling,
            choices_per_prompt=request.n,
            show_sbon=options is not None or self.config.sbon.enabled,
            return_candidates=bool(options and options.return_candidates),
            include_usage=bool(request.stream_options and request.stream_options.include_usage),
            arrived=arrived, deadline=deadline, candidates=draft.candidates,
            log=not (options is not None and options.log is False))

    async def _encode(self, prompts: list[Prompt], backend: ServingBackend) -> list[list[int]]:
        """Token ids of every prompt, computed in a worker thread (chat templates and
        tokenizers take milliseconds per prompt; the event loop must not wait on them).
        Cancelled while still queued, the work is dropped before it starts."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.encoder, lambda: [backend.encode_prompt(p) for p in prompts])

    def _check_model(self, model: str) -> None:
        served = self.config.model.public_name
        if model != served:
            raise NotFound(f"The model '{model}' does not exist; this server serves '{served}'.",
                           "model", "model_not_found")

    def _params(self, request: AnyRequest, runtime: ServingRuntime) -> SBoNParams:
        overrides = request.sbon.overrides() if request.sbon is not None else None
        try:
            params = resolve_params(self.config.sbon, overrides)
        except SettingsError as exc:
            raise InvalidRequest(str(exc), f"sbon.{exc.param}", "invalid_value") from exc
        # Step-aligned blocks can be short: the number of selections is bounded in the loop.
        params = replace(params, max_blocks=self.config.limits.max_blocks)
        if params.n > self.config.limits.max_candidates:
            raise InvalidRequest(f"sbon.n must be at most {self.config.limits.max_candidates}",
                                 "sbon.n", "limit_exceeded")
        runtime.sbon.scorer_for(params.reward)  # 404 for an unknown reward, before any work
        try:
            runtime.sbon.check_prune(params)
        except SettingsError as exc:
            raise InvalidRequest(str(exc), f"sbon.{exc.param}", "invalid_value") from exc
        return params

    def _max_tokens(self, request: AnyRequest, prompt_len: int, context: int) -> int:
        limits = self.config.limits
        param = "max_tokens"
        if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens:
            param = "max_completion_tokens"
        room = context - prompt_len
        if room < 1:
            raise InvalidRequest(
                f"The prompt has {prompt_len} tokens; this model's context is {context} tokens.",
                "messages" if isinstance(request, ChatCompletionRequest) else "prompt",
                "context_length_exceeded")
        wanted = request.requested_max_tokens()
        if wanted is None:
            return min(limits.max_tokens, room)
        if wanted > limits.max_tokens:
            raise InvalidRequest(f"{param} must be at most {limits.max_tokens}", param,
                                 "limit_exceeded")
        if wanted > room:
            raise InvalidRequest(
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt_len + wanted} tokens ({prompt_len} in the prompt, {wanted} "
                "for the completion).", param, "context_length_exceeded")
        return wanted


def _check_reward_room(request: AnyRequest, reward: str, runtime: ServingRuntime,
                       max_tokens: int) -> None:
    """A 400 when the reward model cannot read a response of ``max_tokens`` whole (it would
    score a truncated response; reward/truncation.py)."""
    try:
        check_response_room(runtime.sbon.scorers[reward].inner, max_tokens)
    except ResponseTooLong as exc:
        param = "max_completion_tokens" if isinstance(request, ChatCompletionRequest) \
            and request.max_completion_tokens else "max_tokens"
        raise InvalidRequest(str(exc).replace("max_tokens", param, 1), param,
                             "reward_context_exceeded") from exc


def refuse_unsupported(request: AnyRequest) -> None:
    """A 400 naming the first OpenAI field set to a value this server does not implement."""
    values = dict(request)  # field name -> value
    for name in sorted(request.model_fields_set & UNSUPPORTED_FIELDS.keys()):
        if not _is_neutral(values[name], UNSUPPORTED_FIELDS[name]):
            raise InvalidRequest(f"The parameter '{name}' is not supported by this server.",
                                 name, "unsupported_parameter")


def _is_neutral(value: Any, neutrals: Sequence[Any]) -> bool:
    # ``type`` is compared too, so that 0 does not pass for False or 1 for True.
    return any(value is n or (type(value) is type(n) and value == n) for n in neutrals)


def _prompts(request: AnyRequest) -> list[Prompt]:
    if isinstance(request, ChatCompletionRequest):
        return [request.prompt()]
    return list(request.prompts())
