"""``engine.resolve.resolve_params``: configured defaults merged with a caller's options."""

from __future__ import annotations

import math

import pytest

from common.config import Normalization, SBoNDefaults
from engine.resolve import SBoNOverrides, plain_decoding, resolve_params
from engine.types import SBoNParams

DEFAULTS = SBoNDefaults(n=4, lam=1.0, block_size=16, normalize=Normalization.RAW)


def test_no_options_take_every_default() -> None:
    expected = SBoNParams(n=4, lam=1.0, block_size=16, normalize=Normalization.RAW,
                          reward=None, score=True)
    assert resolve_params(DEFAULTS, SBoNOverrides()) == expected
    assert resolve_params(DEFAULTS, None) == expected  # soft best-of-n is on by default


def test_given_options_override_the_defaults() -> None:
    params = resolve_params(DEFAULTS, SBoNOverrides(
        n=2, lam=0.0, block_size=8, block_size_given=True, normalize=Normalization.ZSCORE,
        reward="other"))
    assert params == SBoNParams(n=2, lam=0.0, block_size=8, normalize=Normalization.ZSCORE,
                                reward="other", score=True)


def test_a_zero_or_infinite_lambda_is_an_option_not_a_missing_one() -> None:
    assert resolve_params(DEFAULTS, SBoNOverrides(lam=0.0)).lam == 0.0
    assert math.isinf(resolve_params(DEFAULTS, SBoNOverrides(lam=math.inf)).lam)


def test_block_size_given_as_none_means_one_selection_per_response() -> None:
    params = resolve_params(DEFAULTS, SBoNOverrides(block_size=None, block_size_given=True))
    assert params.block_size is None and not params.blockwise


def test_block_size_not_given_is_the_default() -> None:
    assert resolve_params(DEFAULTS, SBoNOverrides()).block_size == 16
    # Without ``block_size_given`` the value is not the caller's: the default stands.
    assert resolve_params(DEFAULTS, SBoNOverrides(block_size=4)).block_size == 16
    assert resolve_params(DEFAULTS, SBoNOverrides(block_size=4,
                                                  block_size_given=True)).block_size == 4


@pytest.mark.parametrize("options", [
    SBoNOverrides(n=1),
    SBoNOverrides(n=1, block_size=2, block_size_given=True),
    SBoNOverrides(n=1, lam=0.0, reward="other"),
])
def test_one_candidate_is_never_scored(options: SBoNOverrides) -> None:
    params = resolve_params(DEFAULTS, options)
    assert params.n == 1 and params.score is False


def test_one_candidate_from_the_defaults_is_never_scored() -> None:
    assert resolve_params(SBoNDefaults(n=1), SBoNOverrides()).score is False
    assert resolve_params(SBoNDefaults(n=1), SBoNOverrides(n=2)).score is True


def test_disabled_defaults_without_options_are_plain_decoding() -> None:
    disabled = SBoNDefaults(enabled=False, n=4, lam=1.0, block_size=16)
    params = resolve_params(disabled, None)
    assert params == plain_decoding()
    assert (params.n, params.score, params.block_size) == (1, False, None)
    assert math.isinf(params.lam)


def test_disabled_defaults_with_options_are_soft_best_of_n() -> None:
    disabled = SBoNDefaults(enabled=False, n=4, lam=1.0, block_size=16)
    params = resolve_params(disabled, SBoNOverrides(n=3))
    assert (params.n, params.lam, params.block_size, params.score) == (3, 1.0, 16, True)
    assert resolve_params(disabled, SBoNOverrides()).n == 4


@pytest.mark.parametrize(("options", "message"), [
    (SBoNOverrides(n=0), "n must be at least 1"),
    (SBoNOverrides(block_size=0, block_size_given=True), "block_size must be at least 1"),
])
def test_impossible_options_are_refused(options: SBoNOverrides, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_params(DEFAULTS, options)
