"""The interleaved pruned-against-unpruned throughput measurement (bench/prune_ab.py)."""

from __future__ import annotations

import pytest

from bench.bench import MethodRun, Sample
from bench.prune_ab import parse_args, round_figures


def test_a_round_compares_requests_per_second_and_computed_tokens() -> None:
    unpruned = MethodRun("per-response", 4, 10.0, [Sample(1.0, 500, 60, 0.5, 0.4, 0.0, 90,
                                                          256, 340, 700)] * 8)
    pruned = MethodRun("pruned", 4, 8.0, [Sample(1.0, 300, 60, 0.5, 0.4, 0.0, 90, 256, 400,
                                                 900)] * 8)
    figures = round_figures(unpruned, pruned)
    assert figures["ratio"] == pytest.approx(10.0 / 8.0)
    assert figures["per_response_computed"] == 500 + 90 + 340
    assert figures["pruned_computed"] == 300 + 90 + 400


def test_rounds_are_bounded() -> None:
    assert parse_args(["--url", "http://127.0.0.1:1"]).rounds == 5
    with pytest.raises(SystemExit):
        parse_args(["--url", "http://127.0.0.1:1", "--rounds", "0"])
