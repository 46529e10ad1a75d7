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
    CLOSED_FORM,
    ENUMERATION,
    MONTE_CARLO,
    NO_POOL_KL,
    SCORE_CHUNK,
    SOFT,
    EvalSettings,
    Pool,
    build_pool,
    draw_from_pool,
    hard_bon_pool_probabilities,
    markdown_table,
    pool_kl,
    pool_kl_from_uniform,
    run_eval,
    soft_bon_pool_probabilities,
)
from bench.plots import eval_chart
from bench.promptset import load_prompts
from engine.selection import kl_bon_bound, select


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
    # best of the n + 1, so the win rate is exactly n / (n + 1) in expectation
    # (docs/maths.md, "The win-rate bound").
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


def simulated_selection(rewards: list[float], n: int, lam: float, draws: int,
                        seed: int) -> list[float]:
    """Selection frequencies of each pool member under the scheme of draw_from_pool."""
    rng = random.Random(seed)
    counts = [0] * len(rewards)
    for _ in range(draws):
        candidates = rng.sample(range(len(rewards)), n)
        chosen = select([rewards[i] for i in candidates], lam, rng).chosen_index
        counts[candidates[chosen]] += 1
    return [c / draws for c in counts]


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def test_hard_closed_form_matches_the_draws_of_the_evaluation() -> None:
    # draw_from_pool itself, 60,000 draws: each frequency has a standard error of at most
    # 0.002, and the tolerance is five of those. Distinct rewards, so a reward names a member.
    pool = distinct_pool(10, 11)
    exact = hard_bon_pool_probabilities(pool.rewards, 3)
    draws = draw_from_pool(pool, 3, 0.0, 60_000, random.Random(12))
    seen = [sum(1 for d in draws if d.reward == r) / len(draws) for r in pool.rewards]
    assert max_abs_diff(exact, seen) < 0.01
    ranks = sorted(range(10), key=lambda i: pool.rewards[i])
    for k, i in enumerate(ranks, start=1):  # C(k-1, n-1) / C(m, n) by rank
        assert exact[i] == pytest.approx(math.comb(k - 1, 2) / math.comb(10, 3))


def test_hard_closed_form_splits_ties_as_select_does() -> None:
    rewards = [0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 3.0, 3.0]
    exact = hard_bon_pool_probabilities(rewards, 3)
    assert sum(exact) == pytest.approx(1.0)
    assert exact[0] == exact[1] == 0.0  # a 3-subset cannot have both zeros as its maximum
    assert exact[6] == exact[7] and exact[2] == exact[3] == exact[4]
    # 40,000 draws: standard error at most 0.0025, tolerance about five of those.
    assert max_abs_diff(exact, simulated_selection(rewards, 3, 0.0, 40_000, 13)) < 0.012


def test_soft_probabilities_match_simulation() -> None:
    pool = distinct_pool(9, 14)
    exact, how = soft_bon_pool_probabilities(pool.rewards, 4, 0.7)
    assert how == f"{ENUMERATION} ({math.comb(9, 4)} subsets)"
    assert max_abs_diff(exact, simulated_selection(pool.rewards, 4, 0.7, 40_000, 15)) < 0.012


def test_monte_carlo_agrees_with_enumeration_and_is_seeded() -> None:
    pool = distinct_pool(20, 16)  # C(20, 5) = 15504 subsets
    exact, how = soft_bon_pool_probabilities(pool.rewards, 5, 0.5)
    assert how.startswith(ENUMERATION)
    sampled, how = soft_bon_pool_probabilities(pool.rewards, 5, 0.5, max_subsets=10_000,
                                               seed=(0, 3))
    assert how == f"{MONTE_CARLO} (10000 subsets)"
    assert sum(sampled) == pytest.approx(1.0)
    assert max_abs_diff(exact, sampled) < 0.01
    assert pool_kl_from_uniform(sampled) == pytest.approx(pool_kl_from_uniform(exact), abs=0.01)
    again, _ = soft_bon_pool_probabilities(pool.rewards, 5, 0.5, max_subsets=10_000,
                                           seed=(0, 3))
    assert again == sampled


@pytest.mark.parametrize("max_subsets", [100_000, 20_000])  # enumeration, then Monte Carlo
def test_soft_tends_to_hard_as_lambda_falls_and_to_uniform_as_it_grows(max_subsets: int
                                                                       ) -> None:
    pool = distinct_pool(16, 17)  # C(16, 6) = 8008 subsets
    hard = hard_bon_pool_probabilities(pool.rewards, 6)
    cold, how = soft_bon_pool_probabilities(pool.rewards, 6, 1e-6, max_subsets)
    assert how.startswith(ENUMERATION if max_subsets > 8008 else MONTE_CARLO)
    assert max_abs_diff(hard, cold) < (1e-9 if max_subsets > 8008 else 0.01)
    kls = [pool_kl_from_uniform(soft_bon_pool_probabilities(pool.rewards, 6, lam,
                                                            max_subsets)[0])
           for lam in (1e-6, 0.1, 0.3, 1.0, 3.0, 100.0, 1e6)]
    assert kls == sorted(kls, reverse=True)
    assert kls[0] == pytest.approx(pool_kl_from_uniform(hard), abs=0.01)
    assert kls[-1] == pytest.approx(0.0, abs=1e-6)
    assert soft_bon_pool_probabilities(pool.rewards, 6, math.inf) == ([1 / 16] * 16,
                                                                      CLOSED_FORM)
    assert soft_bon_pool_probabilities(pool.rewards, 6, 0.0) == (hard, CLOSED_FORM)


def test_pool_kl_never_exceeds_log_pool() -> None:
    rng = random.Random(18)
    for _ in range(50):
        m = rng.randint(2, 20)
        raw = [rng.random() ** 8 for _ in range(m)]
        p = [v / sum(raw) for v in raw]
        assert 0.0 <= pool_kl_from_uniform(p) <= math.log(m)
    assert pool_kl_from_uniform([1.0, 0.0, 0.0, 0.0]) == pytest.approx(math.log(4))
    assert pool_kl_from_uniform([0.25] * 4) == 0.0
    # Best-of-m of the whole pool is one-hot: the estimate reaches its ceiling log m.
    assert pool_kl(distinct_pool(8, 19), 8, 0.0) == pytest.approx((math.log(8), CLOSED_FORM))
    # A pool of about n cannot resolve best-of-n, whatever the base model.
    for n in (2, 4, 8):
        assert pool_kl(distinct_pool(4 * n, n), n, 0.0)[0] < math.log(4 * n)


def test_never_chosen_members_are_handled_like_select() -> None:
    rewards = [-math.inf, 0.0, 1.0, 2.0]
    hard = hard_bon_pool_probabilities(rewards, 2)
    assert hard[0] == 0.0 and sum(hard) == pytest.approx(1.0)
    uniform, how = soft_bon_pool_probabilities(rewards, 2, math.inf)
    assert how.startswith(ENUMERATION) and uniform[0] == 0.0
    assert max_abs_diff(uniform, simulated_selection(rewards, 2, math.inf, 20_000, 20)) < 0.02
    with pytest.raises(ValueError, match="-inf"):
        hard_bon_pool_probabilities([-math.inf, -math.inf, 1.0], 2)
    with pytest.raises(ValueError, match="pool"):
        soft_bon_pool_probabilities([1.0, 2.0], 3, 1.0)


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
    for row in rows[:-1]:  # every pool setting has the pool estimate, below log(pool)
        assert 0.0 <= row["kl_pool"] <= math.log(settings.pool) + 1e-12
    assert [r["kl_pool_method"] for r in rows] == [CLOSED_FORM] * 3 + [
        f"{ENUMERATION} (70 subsets)", CLOSED_FORM, NO_POOL_KL]
    assert rows[0]["kl_pool"] == 0.0 and rows[4]["kl_pool"] == 0.0  # n = 1, lambda = inf
    blockwise = rows[-1]
    assert blockwise["kl_pool"] is None  # real runs are not drawn from the pool
    assert blockwise["kl_bon_bound"] == pytest.approx(2 * kl_bon_bound(4))  # two blocks of 3
    assert rows[0]["win_rate"] == pytest.approx(0.5, abs=0.1)  # n = 1 is the base model
    pool_calls = [c for c in runtime.backend.calls if c.request_id.startswith("eval-pool")]
    assert len(pool_calls) == 4 and all(c.n == 8 for c in pool_calls)
    table = markdown_table(report).splitlines()
    assert len(table) == 2 + len(rows) and table[0].startswith("| method")
    assert json.loads(json.dumps(report.to_dict()))["settings"]["lam_grid"] == [0.5, "inf"]
    assert eval_chart(report, tmp_path / "eval.png").read_bytes()[:4] == b"\x89PNG"


async def test_a_large_pool_is_scored_a_chunk_at_a_time() -> None:
    # Each reward call is held to the reward's timeout, sized for one request's candidates.
    sizes: list[int] = []

    class CountingScorer(FakeScorer):
        async def score(self, prompts, responses):  # type: ignore[no-untyped-def]
            sizes.append(len(responses))
            return await super().score(prompts, responses)

    runtime = fake_runtime(FakeBackend(), {"fake": CountingScorer()})
    settings = EvalSettings(pool=2 * SCORE_CHUNK + 5)
    item = load_prompts(None, 1)[0]
    pool = await build_pool(runtime, item, 0, settings)
    assert sizes == [SCORE_CHUNK, SCORE_CHUNK, 5]
    assert len(pool.rewards) == len(pool.logprobs) == 2 * SCORE_CHUNK + 5
    assert pool.rewards == sorted(pool.rewards)  # the fake's candidate i is i + 1 tokens long
