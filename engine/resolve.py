"""One resolver from configured defaults and a caller's options to soft best-of-n settings.

The HTTP server (the ``sbon`` object) and the command line (``sbon generate`` flags) both
call :func:`resolve_params`, so the same options mean the same thing in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import Normalization, SBoNDefaults
from engine.types import SBoNParams


@dataclass(frozen=True)
class SBoNOverrides:
    """What a caller asked for; ``None`` means "use the configured default".

    ``block_size`` is special: ``None`` is a real value (one selection per response), so
    ``block_size_given`` says whether the caller set it at all.
    """

    n: int | None = None
    lam: float | None = None
    block_size: int | None = None
    block_size_given: bool = False
    normalize: Normalization | None = None
    reward: str | None = None


def plain_decoding() -> SBoNParams:
    """One candidate and no reward: what the base model would answer."""
    return SBoNParams(n=1, lam=math.inf, score=False)


def resolve_params(defaults: SBoNDefaults, options: SBoNOverrides | None) -> SBoNParams:
    """Merge ``options`` over ``defaults``.

    No options while soft best-of-n is disabled by default means plain decoding. One
    candidate leaves nothing to select, so ``n = 1`` never pays for a reward call.
    """
    if options is None:
        if not defaults.enabled:
            return plain_decoding()
        options = SBoNOverrides()
    n = options.n if options.n is not None else defaults.n
    if n < 1:
        raise ValueError("n must be at least 1")
    block = options.block_size if options.block_size_given else defaults.block_size
    if block is not None and block < 1:
        raise ValueError("block_size must be at least 1")
    return SBoNParams(
        n=n,
        lam=options.lam if options.lam is not None else defaults.lam,
        block_size=block,
        normalize=options.normalize or defaults.normalize,
        reward=options.reward,
        score=n > 1,
    )
