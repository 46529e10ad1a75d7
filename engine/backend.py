"""The generation backend contract: what the soft best-of-n loop needs from an engine.

The real implementation is :mod:`engine.vllm_backend` (the only module that imports vLLM);
tests use small fakes. Prompts are always token ids here: blockwise decoding continues
from the ids of the chosen blocks and never re-tokenises text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from common.prompts import Prompt
from engine.types import Candidate, SamplingSettings


class BackendError(RuntimeError):
    """The engine is unavailable or failed while generating."""


class InvalidGenerationRequest(ValueError):
    """The engine refused the request's parameters."""

    param: str | None = None  # the request field at fault, when one is


class PromptTooLongError(InvalidGenerationRequest):
    """The prompt plus the requested tokens do not fit the model's context."""


class PromptFormatError(InvalidGenerationRequest):
    """The model's chat template refused the conversation (some templates require roles
    to alternate, or a user turn first)."""

    param = "messages"


class GenerationBackend(Protocol):
    """An async engine that returns n sampled continuations of a tokenised prompt."""

    model_name: str
    max_model_len: int

    @property
    def ready(self) -> bool:
        """True once started and while the engine runs; False before start and once it died."""
        ...

    @property
    def dead_error(self) -> BaseException | None:
        """Why a started engine stopped (vLLM's ``EngineClient.dead_error``); None while it
        runs or before it started."""
        ...

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        n: int,
        sampling: SamplingSettings,
        max_tokens: int,
        request_id: str,
        seed: int | None,
    ) -> list[Candidate]:
        """Sample ``n`` continuations (one engine request; the prompt's KV is shared)."""
        ...

    def generate_stream(
        self,
        prompt_token_ids: Sequence[int],
        sampling: SamplingSettings,
        max_tokens: int,
        request_id: str,
        seed: int | None,
    ) -> AsyncIterator[str | Candidate]:
        """One sample, token by token: text deltas as they decode, then the :class:`Candidate`.

        Plain decoding (one candidate, nothing to select) streams through this.
        """
        ...

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: chat messages through the model's chat template."""
        ...

    def num_unfinished_requests(self) -> int:
        """Engine requests that are queued or running now."""
        ...
