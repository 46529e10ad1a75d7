"""One resolver from configured defaults and a caller's options to soft best-of-n settings.

The HTTP server (the ``sbon`` object) and the command line (``sbon generate`` flags) both
call :func:`resolve_params`, so the same options mean the same thing in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from common.config import Normalization, SBoNDefaults
from common.prune import PruneSettings
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
    prune: PruneSettings | None = None
    prune_given: bool = False  # like block_size: None given means "no pruning"
    particles: bool | None = None
    ess_threshold: float | None = None


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
    normalize = options.normalize or defaults.normalize
    prune = _prune(defaults, options, block, kl_budget, normalize)
    return SBoNParams(
        n=n,
        lam=options.lam if options.lam is not None else defaults.lam,
        block_size=block,
        normalize=normalize,
        reward=options.reward,
        score=n > 1,
        kl_budget=kl_budget,
        block_delimiter=delimiter,
        prune=prune if n > 1 else None,  # one candidate: nothing to prune
        particles=_particles(defaults, options, block, kl_budget, normalize),
        ess_threshold=options.ess_threshold or defaults.ess_threshold,
    )


def _particles(defaults: SBoNDefaults, options: SBoNOverrides, block: int | None,
               kl_budget: float | None, normalize: Normalization) -> bool:
    """Whether particles run (docs/maths.md, "Particles"). The configured default applies to
    blockwise requests only; a request asking for particles without a block size is refused.
    The weights exp(increment / lambda) telescope to exp(r / lambda) only for one fixed
    lambda on raw rewards, so a KL budget (lambda solved per selection) and per-block
    z-scores are refused with them."""
    if options.particles and block is None:
        raise SettingsError("particles work in blockwise mode only (give a block_size)",
                            "particles")
    particles = options.particles if options.particles is not None else (
        defaults.particles and block is not None)
    if options.ess_threshold is not None and not particles:
        raise SettingsError("ess_threshold applies to particles only", "ess_threshold")
    if particles and kl_budget is not None:
        raise SettingsError("particles weight by exp(r / lambda): give a lambda, not a "
                            "kl_budget", "kl_budget")
    if particles and normalize is not Normalization.RAW:
        raise SettingsError("particles need raw rewards (normalize: raw)", "normalize")
    if options.ess_threshold is not None and not 0.0 < options.ess_threshold <= 1.0:
        raise SettingsError("ess_threshold must be in (0, 1]", "ess_threshold")
    return particles


def _prune(defaults: SBoNDefaults, options: SBoNOverrides, block: int | None,
           kl_budget: float | None, normalize: Normalization) -> PruneSettings | None:
    """The pruning in force. The configured default applies to per-response requests only;
    a request that asks for pruning in blockwise mode is refused. ``bound`` needs raw rewards
    and a fixed lambda: its bounds are on raw rewards, and a lambda solved from the
    survivors' rewards (a KL budget) would void the distortion guarantee. A configured
    ``bound`` default that a request's settings exclude is refused too (``"prune": null``
    opts out)."""
    if not options.prune_given and block is not None:
        return None
    prune = options.prune if options.prune_given else defaults.prune
    if prune is None:
        return None
    if block is not None:
        raise SettingsError("pruning works in per-response mode only (block_size null)",
                            "prune")
    if prune.mode == "bound" and kl_budget is not None:
        raise SettingsError("prune mode 'bound' needs a fixed lambda, not a kl_budget",
                            "prune.mode")
    if prune.mode == "bound" and normalize is not Normalization.RAW:
        raise SettingsError("prune mode 'bound' needs raw rewards (normalize 'raw')",
                            "prune.mode")
    return prune
