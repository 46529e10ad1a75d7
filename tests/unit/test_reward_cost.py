"""Tokens a transformers reward model runs on (reward/cost.py), the cost axis of hf and prm."""

from __future__ import annotations

from reward.cost import forward_tokens


def test_inputs_that_extend_one_prefix_run_it_once() -> None:
    prefix = [1, 2, 3, 4]
    inputs = [(prefix, [*prefix, 9]), (prefix, [*prefix, 8, 7]), (prefix, [*prefix, 6])]
    assert forward_tokens(inputs, share_kv=True) == (4 + 1 + 2 + 1, 4 * 2)
    assert forward_tokens(inputs, share_kv=False) == (5 + 6 + 5, 0)


def test_inputs_that_cannot_share_run_whole() -> None:
    prefix = [1, 2, 3]
    alone = [(prefix, [*prefix, 5])]  # a group of one shares nothing
    assert forward_tokens(alone, share_kv=True) == (4, 0)
    mismatched = [(prefix, [1, 2, 4, 5]), (prefix, [*prefix, 5]), (None, [7, 7])]
    assert forward_tokens(mismatched, share_kv=True) == (4 + 4 + 2, 0)
    equal = [(prefix, list(prefix)), (prefix, list(prefix))]  # must strictly extend it
    assert forward_tokens(equal, share_kv=True) == (6, 0)
    assert forward_tokens([], share_kv=True) == (0, 0)
