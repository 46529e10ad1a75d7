"""Settings of early pruning in per-response mode (``sbon.prune``), shared by config and API.

``rank`` keeps the top ``keep`` fraction of the live candidates by partial reward at every
checkpoint (Speculative Rejection, arXiv 2410.20290); ``bound`` prunes only what reward
bounds prove to carry at most ``epsilon`` of selection probability (docs/maths.md, pruning).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

PruneMode = Literal["rank", "bound"]

DEFAULT_KEEP = 0.5
DEFAULT_EPSILON = 0.05


class PruneSettings(BaseModel):
    """When and how to stop candidates early; ``keep`` belongs to ``rank``, ``epsilon`` to
    ``bound`` (giving the other mode's field is refused, never ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: PruneMode = Field(description="rank: keep the best fraction; bound: provable")
    every: int = Field(default=16, ge=1, le=4096, description="tokens between checkpoints")
    keep: float = Field(default=DEFAULT_KEEP, gt=0.0, le=1.0,
                        description="rank: fraction of live candidates kept per checkpoint")
    epsilon: float = Field(default=DEFAULT_EPSILON, ge=0.0, le=1.0, allow_inf_nan=False,
                           description="bound: total selection probability pruning may move")
    min_keep: int = Field(default=1, ge=1, le=1024,
                          description="candidates never pruned below this count")

    @field_validator("keep")
    @classmethod
    def _keep_is_rank(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("mode") != "rank":
            raise ValueError("keep applies to mode 'rank' only")
        return value

    @field_validator("epsilon")
    @classmethod
    def _epsilon_is_bound(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("mode") != "bound":
            raise ValueError("epsilon applies to mode 'bound' only")
        return value
