"""Typed configuration of the reward backends (one entry per named reward)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RewardConfig(BaseModel):
    """One named reward.

    ``hf``: a Hugging Face sequence-classification reward model (``model`` is a hub id or a
    folder). ``judge``: the served policy model asked whether a response is good; the reward
    is log p(yes) - log p(no). ``python``: a ``module:function`` taking (prompt, response).
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    type: Literal["hf", "judge", "python"]
    # hf
    model: str | None = None
    label: int | str | None = None  # output logit to use when the head has several labels
    device: str = "cpu"
    dtype: Literal["float32", "float16", "bfloat16", "auto"] = "float32"
    max_batch_tokens: int = Field(default=8192, ge=64)
    max_length: int = Field(default=2048, ge=16)
    batch_wait_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    use_chat_template: bool = True
    share_prompt_kv: bool = True  # compute a prompt's KV once for its n responses (causal models)
    trust_remote_code: bool = False
    # judge
    judge_template: str | None = None
    yes_token: str = "Yes"
    no_token: str = "No"
    # python
    function: str | None = None

    @model_validator(mode="after")
    def _check_backend_fields(self) -> RewardConfig:
        if self.type == "hf" and not self.model:
            raise ValueError(f"reward '{self.name}': type 'hf' needs 'model'")
        if self.type == "python" and (not self.function or ":" not in self.function):
            raise ValueError(
                f"reward '{self.name}': type 'python' needs 'function: module:callable'"
            )
        return self
