"""The statistics of the particles-versus-blockwise benchmark: per-method means with 95 %
intervals, and differences paired by prompt and repeat."""

from __future__ import annotations

import math

import pytest

from bench.particles_compare import Row, build_parser, paired, params_for, summary, table


def row(method: str, prompt: str, repeat: int, passed: float, tokens: int) -> Row:
    return Row(method, prompt, repeat, 0, passed, passed, tokens, tokens, 10, 0, 1.0)


def test_summary_and_paired_differences() -> None:
    rows = [row("blockwise", "a", 0, 0.0, 100), row("particles", "a", 0, 1.0, 90),
            row("blockwise", "b", 0, 1.0, 120), row("particles", "b", 0, 1.0, 100),
            row("blockwise", "a", 1, 0.0, 100), row("particles", "a", 1, 0.0, 110)]
    stats = {s["method"]: s for s in summary(rows)}
    assert set(stats) == {"blockwise", "particles"}
    assert stats["particles"]["pass_rate"] == pytest.approx(2 / 3)
    assert stats["blockwise"]["tokens_computed"] == pytest.approx(320 / 3)
    sd = math.sqrt(((1 - 1 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert stats["particles"]["pass_rate_ci95"] == pytest.approx(1.96 * sd / math.sqrt(3))
    diff = paired(rows, "passed")
    assert diff["pairs"] == 3 and diff["mean"] == pytest.approx(1 / 3)
    assert paired(rows, "tokens_computed")["mean"] == pytest.approx((-10 - 20 + 10) / 3)
    assert "| particles | 3 |" in table(summary(rows))


def test_methods_share_n_lambda_and_block_size() -> None:
    args = build_parser().parse_args(["--config", "c.yaml", "--out", "o", "--n", "6"])
    blockwise, particles = params_for("blockwise", args), params_for("particles", args)
    assert particles.particles and not blockwise.particles
    assert (blockwise.n, blockwise.lam, blockwise.block_size) == (6, 0.1, 16)
    assert (particles.n, particles.lam, particles.block_size) == (6, 0.1, 16)
    plain = params_for("plain", args)
    assert plain.n == 1 and not plain.score


def test_methods_are_chosen_from_the_known_ones() -> None:
    parser = build_parser()
    base = ["--config", "c.yaml", "--out", "o"]
    assert parser.parse_args([*base, "--methods", "particles"]).methods == ("particles",)
    for bad in ("beam", "", "particles,beam"):
        with pytest.raises(SystemExit):
            parser.parse_args([*base, "--methods", bad])
