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
    kl_budget: float | None = None
    block_delimiter: str | None = None


class SettingsError(ValueError):
    """Settings that cannot work together; ``param`` names the one to change."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def plain_decoding() -> SBoNParams:
    """One candidate and no reward: what the base model would answer."""
    return SBoNParams(n=1, lam=math.inf, score=False)


def resolve_params(defaults: SBoNDefaults, options: SBoNOverrides | None) -> SBoNParams:
    """Merge ``options`` over ``defaults``.

    No options while soft best-of-n is disabled by default means plain decoding. One
    candidate leaves nothing to select, so ``n = 1`` never pays for a reward call. A KL
    budget and a lambda exclude each other; a block delimiter needs a block size.
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
    if options.lam is not None and options.kl_budget is not None:
        raise SettingsError("give either lambda or kl_budget, not both", "kl_budget")
    # A lambda the caller gives wins over a configured budget, and the other way round.
    kl_budget = options.kl_budget if options.lam is None else None
    if kl_budget is None and options.lam is None:
        kl_budget = defaults.kl_budget
    delimiter = options.block_delimiter or defaults.block_delimiter
    if delimiter is not None and block is None:
        raise SettingsError("block_delimiter needs a block_size (the longest step in tokens)",
                            "block_delimiter")
    return SBoNParams(
        n=n,
        lam=options.lam if options.lam is not None else defaults.lam,
        block_size=block,
        normalize=options.normalize or defaults.normalize,
        reward=options.reward,
        score=n > 1,
        kl_budget=kl_budget,
        block_delimiter=delimiter,
    )
