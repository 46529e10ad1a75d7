"""``sbon eval`` logic: pool draws against the theory, and the report's consistency."""

from __future__ import annotations

import json
import math
import random

import pytest
from fakes import FakeBackend, FakeScorer, fake_runtime

from bench.evaluate import (
    BLOCKWISE,
    BON,
    SOFT,
    EvalSettings,
    Pool,
    draw_from_pool,
    markdown_table,
    run_eval,
)
from bench.plots import eval_chart
from bench.promptset import load_prompts
from engine.selection import kl_bon_bound

pytestmark = pytest.mark.unit


def distinct_pool(size: int, seed: int) -> Pool:
    rng = random.Random(seed)
    return Pool([rng.gauss(0.0, 1.0) for _ in range(size)],
                [-rng.uniform(1.0, 30.0) for _ in range(size)])


def win_rate(draws) -> float:  # type: ignore[no-untyped-def]
    return sum(d.win for d in draws) / len(draws)


def test_lambda_infinity_wins_half_the_time() -> None:
    # The selection is then a uniform pick, exchangeable with the base sample: E[win] = 1/2.
    # 4000 draws give a standard error of about 0.008; the tolerance is about four of those.
    draws = draw_from_pool(distinct_pool(16, 1), 4, math.inf, 4000, random.Random(2))
    assert win_rate(draws) == pytest.approx(0.5, abs=0.03)
    assert all(d.kl_from_uniform == pytest.approx(0.0, abs=1e-12) for d in draws)


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_hard_best_of_n_wins_n_over_n_plus_one(n: int) -> None:
    # With distinct rewards the best of n beats one more sample unless that sample is the
    # best of the n + 1, so the win rate is exactly n / (n + 1) in expectation [BBN, KL].
    draws = draw_from_pool(distinct_pool(16, n), n, 0.0, 4000, random.Random(n))
    assert win_rate(draws) == pytest.approx(n / (n + 1), abs=0.03)
    for d in draws:
        assert d.kl_from_uniform == pytest.approx(math.log(n))
        assert 0.0 <= d.kl_estimate <= kl_bon_bound(n) + 1e-12


def test_soft_selection_lies_between_base_and_hard() -> None:
    pool = distinct_pool(32, 5)
    rates = [win_rate(draw_from_pool(pool, 8, lam, 3000, random.Random(7)))
             for lam in (math.inf, 1.0, 0.3, 0.0)]
    assert rates == sorted(rates)  # less temperature, more reward
    kls = [sum(d.kl_from_uniform for d in draw_from_pool(pool, 8, lam, 500,
                                                          random.Random(3))) / 500
           for lam in (math.inf, 1.0, 0.3, 0.0)]
    assert kls == sorted(kls) and all(0.0 <= k <= math.log(8) + 1e-9 for k in kls)


def test_a_pool_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match="pool"):
        draw_from_pool(distinct_pool(4, 0), 4, 1.0, 1, random.Random(0))


async def test_run_eval_reports_every_setting_consistently(tmp_path) -> None:
    settings = EvalSettings(n_grid=(1, 2, 4), lam_grid=(0.5, math.inf), soft_n=4,
                            block_sizes=(3,), pool=8, draws=300, prompts=4, max_tokens=6)
    runtime = fake_runtime(FakeBackend(), {"fake": FakeScorer(fn=lambda r: r.count("1"))})
    report = await run_eval(runtime, load_prompts(None, 4), settings)
    rows = report.rows()
    assert [(r["method"], r["n"]) for r in rows] == [
        (BON, 1), (BON, 2), (BON, 4), (SOFT, 4), (SOFT, 4), (BLOCKWISE, 4)]
    for row in rows:
        assert row["kl_from_uniform"] >= 0.0 and row["kl_estimate"] >= 0.0
        if row["method"] != BLOCKWISE:
            assert row["kl_from_uniform"] <= math.log(row["n"]) + 1e-9
            assert row["kl_estimate"] <= kl_bon_bound(row["n"]) + 1e-9
        assert row["reward_gain"] == pytest.approx(row["reward"] - row["base_reward"])
        assert 0.0 <= row["win_rate"] <= 1.0
    blockwise = rows[-1]
    assert blockwise["kl_bon_bound"] == pytest.approx(2 * kl_bon_bound(4))  # two blocks of 3
    assert rows[0]["win_rate"] == pytest.approx(0.5, abs=0.1)  # n = 1 is the base model
    pool_calls = [c for c in runtime.backend.calls if c.request_id.startswith("eval-pool")]
    assert len(pool_calls) == 4 and all(c.n == 8 for c in pool_calls)
    table = markdown_table(report).splitlines()
    assert len(table) == 2 + len(rows) and table[0].startswith("| method")
    assert json.loads(json.dumps(report.to_dict()))["settings"]["lam_grid"] == [0.5, "inf"]
    assert eval_chart(report, tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"
