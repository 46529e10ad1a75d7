"""Request and response schemas: OpenAI's completions and chat completions, plus ``sbon``.

Requests mirror OpenAI's fields. Every soft best-of-n setting lives in one nested ``sbon``
object (sent by clients through ``extra_body``) and every diagnostic in one optional ``sbon``
object on each returned choice. Unknown fields are refused, never dropped; known OpenAI
fields this server does not implement are listed in ``UNSUPPORTED_FIELDS`` and refused when
set to anything but their neutral value.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from common.config import Normalization
from common.prompts import Message
from common.prune import PruneSettings
from common.values import parse_lambda
from engine.resolve import SBoNOverrides

# OpenAI fields that are understood but not implemented, with the value that means "unused".
UNSUPPORTED_FIELDS: dict[str, Any] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
}


def _well_formed(text: str) -> str:
    # A lone surrogate ("\ud800" in JSON) is valid JSON but not text: no tokenizer, reward
    # model or response encoder can take it, so it is refused here with a 400.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (it contains a lone surrogate)") from None
    return text


LIMIT_EXCEEDED = "limit_exceeded"  # a validation error type the server answers as its limits


Text = Annotated[str, AfterValidator(_well_formed)]
"""A string that is valid Unicode text; its length is checked against the limits later."""
Name = Annotated[str, AfterValidator(_well_formed), Field(max_length=256)]
"""A short identifier-like string (model, user, message name)."""


class StrictModel(BaseModel):
    """Refuses unknown fields, so nothing a client sends is silently ignored."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SBoNOptions(StrictModel):
    """The soft best-of-n settings of one request; missing ones come from configuration."""

    n: int | None = Field(default=None, ge=1, description="candidates per selection")
    lam: float | None = Field(
        default=None, alias="lambda", ge=0.0,
        description="selection temperature in reward units; 0 = hard best-of-n, 'inf' = off")
    block_size: int | None = Field(
        default=None, ge=1,
        description="tokens per block; null = one selection per response, absent = the default")
    reward: Name | None = Field(default=None, description="a configured reward's name")
    normalize: Normalization | None = Field(
        default=None, description="raw rewards, or per-request z-scores (lambda then unit-free)")
    return_candidates: bool = Field(default=False, description="include every candidate's text")
    log: bool | None = Field(
        default=None, description="false: keep this request out of the distillation log")
    kl_budget: float | None = Field(
        default=None, ge=0.0, allow_inf_nan=False,
        description="nats of KL from uniform per selection; lambda is then solved per "
                    "selection (excludes lambda)")
    block_delimiter: str | None = Field(
        default=None, min_length=1, max_length=64,
        description="a block also ends after this string (kept): one block per step")
    prune: PruneSettings | None = Field(
        default=None, description="early pruning (per-response mode); null = off, absent = "
                                  "the configured default")
    particles: bool | None = Field(
        default=None, description="blockwise mode: keep n weighted particles, resampled when "
                                  "the ESS is low (excludes kl_budget; raw rewards)")
    ess_threshold: float | None = Field(
        default=None, gt=0.0, le=1.0, allow_inf_nan=False,
        description="particles: resample when ESS < ess_threshold x n")

    @field_validator("lam", mode="before")
    @classmethod
    def _lambda(cls, value: Any) -> Any:
        return parse_lambda(value)

    @field_validator("lam")
    @classmethod
    def _finite_or_inf(cls, value: float | None) -> float | None:
        if value is not None and math.isnan(value):
            raise ValueError("lambda must be a number >= 0 or 'inf'")
        return value

    def overrides(self) -> SBoNOverrides:
        """The request's settings for the shared resolver (unset fields fall back)."""
        return SBoNOverrides(n=self.n, lam=self.lam, block_size=self.block_size,
                             block_size_given="block_size" in self.model_fields_set,
                             normalize=self.normalize, reward=self.reward,
                             kl_budget=self.kl_budget, block_delimiter=self.block_delimiter,
                             prune=self.prune, prune_given="prune" in self.model_fields_set,
                             particles=self.particles, ess_threshold=self.ess_threshold)


class StreamOptions(StrictModel):
    include_usage: bool = False


class _Sampling(StrictModel):
    """Fields shared by completions and chat completions."""

    model: Name
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # vLLM keeps top_k in an int32 tensor (and clamps it to the vocabulary): larger is a 400.
    top_k: int = Field(default=0, ge=-1, le=2**31 - 1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop: Text | list[Text] | None = Field(
        default=None, description="at most limits.max_stop_sequences strings")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    n: int = Field(default=1, ge=1, description="returned choices, each an independent draw")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Name | None = None
    sbon: SBoNOptions | None = None
    # Accepted so that they can be refused by name (see UNSUPPORTED_FIELDS).
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        # How many and how long is server policy (limits), checked in the serving layer.
        items = [value] if isinstance(value, str) else (value or [])
        if any(not s for s in items):
            raise ValueError("stop sequences must not be empty")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Sampling):
    """``POST /v1/completions``. ``prompt`` is a string or a list of strings."""

    prompt: Text | list[Text] = Field(
        description="a string, or a list of at most limits.max_prompts strings")
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(StrictModel):
    type: Literal["text"]
    text: Text


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Name | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``; the prompt is rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    @field_validator("messages", mode="before")
    @classmethod
    def _count_before_validating(cls, value: Any, info: ValidationInfo) -> Any:
        # With the server's limits as context (server/body_parsing.py), counted on the raw
        # JSON: 150,000 small content parts would take seconds to validate one by one.
        limits = (info.context or {}).get("limits")
        if limits is None or not isinstance(value, list):
            return value
        if len(value) > limits.max_messages:
            raise PydanticCustomError(LIMIT_EXCEEDED, f"at most {limits.max_messages} messages, "
                                      f"not {len(value)} (limits.max_messages)")
        parts = sum(len(m["content"]) for m in value
                    if isinstance(m, dict) and isinstance(m.get("content"), list))
        if parts > limits.max_content_parts:
            raise PydanticCustomError(
                LIMIT_EXCEEDED, f"at most {limits.max_content_parts} content parts in all "
                f"messages, not {parts} (limits.max_content_parts)")
        return value

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def prompt(self) -> tuple[Message, ...]:
        """The conversation as the engine's prompt type."""
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        return tuple(Message("system" if m.role == "developer" else m.role, m.text())
                     for m in self.messages)


# --- responses -----------------------------------------------------------------------------
# The bodies the server sends are built from these models (server/render.py), so the
# OpenAPI document and the wire format are one definition. Optional fields that a body
# leaves unset are left out of it; fields set to None are sent as null.


class ResponseModel(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


JSONFloat = float | Literal["inf", "-inf"]


class SBoNBlock(ResponseModel):
    """One selection step of a blockwise response."""

    index: int
    chosen_index: int
    rewards: list[JSONFloat]
    weights: list[float]
    ess: float
    kl_from_uniform: float
    kl_estimate: float
    lam: JSONFloat = Field(alias="lambda", description="the lambda this selection used")
    candidates: list[str] | None = Field(default=None, description="with return_candidates")
    resampled: bool | None = Field(
        default=None, description="particles: whether the particles were resampled after "
                                  "this block (ess is then the ESS that triggered it)")
    ancestors: list[int] | None = Field(
        default=None, description="particles, when resampled: the particle each new one copies")


class SBoNPrune(ResponseModel):
    """What early pruning did to a per-response selection."""

    mode: str
    every: int = Field(description="tokens between checkpoints")
    checkpoints: int = Field(description="checkpoints at which candidates were scored")
    pruned: int = Field(description="candidates stopped early")
    pruned_at: list[int | None] = Field(
        description="per candidate: the checkpoint (tokens) it was stopped at, or null")
    distortion_bound: float | None = Field(
        default=None, description="bound mode: the total selection probability pruning "
                                  "can have moved (sum of the pruned weight bounds)")


class SBoNParticles(ResponseModel):
    """What the particles of a blockwise response did (per block: ``blocks``)."""

    ess_threshold: float = Field(description="resampling when ESS < ess_threshold x n")
    resamplings: int = Field(description="blocks after which the particles were resampled")


class SBoNInfo(ResponseModel):
    """The ``sbon`` object of one returned choice: settings, selection, diagnostics."""

    n: int
    lam: JSONFloat | None = Field(
        alias="lambda", description="the lambda asked for; null when a KL budget solves it")
    kl_budget: float | None = Field(description="nats per selection, when one was asked for")
    reward_truncated: bool | None = Field(
        default=None, description="true when the reward model read every response whole but "
                                  "not the whole prompt (its oldest tokens were dropped)")
    lambdas: list[JSONFloat] = Field(description="the lambda each selection used, in order")
    block_size: int | None
    block_delimiter: str | None
    normalize: str
    reward: str | None = Field(description="the reward used; null when nothing was scored")
    scored: bool
    blocks: list[SBoNBlock] | None = Field(default=None, description="blockwise mode")
    chosen_index: int | None = Field(default=None, description="per-response mode")
    candidates: list[str] | None = Field(default=None, description="with return_candidates")
    rewards: list[JSONFloat | None] | None = Field(
        default=None, description="of the final selection; null for a pruned candidate")
    weights: list[float] | None = None
    ess: float
    kl_from_uniform: float
    kl_bon_bound: float
    kl_estimate: float
    win_rate_bound: float
    tokens_generated: int
    tokens_scored: int
    tokens_computed: int = Field(
        description="decoded tokens of every candidate plus prompt tokens computed (not "
                    "cached) by generation and by model rewards")
    prune: SBoNPrune | None = Field(default=None, description="with sbon.prune")
    particles: SBoNParticles | None = Field(default=None, description="with sbon.particles")
    tokens_prefilled: dict[str, int] = Field(
        description="prompt tokens computed by engine requests: generation, scoring")
    tokens_cached: dict[str, int] = Field(
        description="prompt tokens served from the prefix cache: generation, scoring")
    timings_s: dict[str, float]


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None
    sbon: SBoNInfo | None = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None
    sbon: SBoNInfo | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(ResponseModel):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None
    sbon: SBoNInfo | None = None


class CompletionChunkChoice(ResponseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None
    sbon: SBoNInfo | None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


class ErrorDetail(ResponseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(ResponseModel):
    """Every error, whatever its status: OpenAI's envelope."""

    error: ErrorDetail


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sbon"


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def to_json(body: BaseModel) -> dict[str, Any]:
    """A response model as the JSON sent: aliases, and only the fields the body set."""
    return body.model_dump(mode="json", by_alias=True, exclude_unset=True)
