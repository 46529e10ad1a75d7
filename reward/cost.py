"""Tokens a transformers reward model runs its forward pass on, for the cost axis.

``tokens_computed`` (docs/maths.md, cost) counts every token a model computes. The ``hf``
and ``prm`` scorers run a group of inputs that extend one shared prompt on top of that
prompt's KV, computed once; every other input is run whole. Padding is not counted.
"""

from __future__ import annotations

from collections.abc import Sequence


def forward_tokens(inputs: Sequence[tuple[Sequence[int] | None, Sequence[int]]],
                   share_kv: bool) -> tuple[int, int]:
    """(computed, reused): tokens the model runs on, and prompt tokens it reuses instead.

    ``inputs`` holds each input's shareable prefix (None: none) and its whole token ids,
    grouped as the scorers group them: two or more inputs that strictly extend the same
    prefix share it when ``share_kv`` is on.
    """
    groups: dict[tuple[int, ...], list[Sequence[int]]] = {}
    computed = reused = 0
    for prefix, ids in inputs:
        key = tuple(prefix) if share_kv and prefix else None
        if key is not None and len(ids) > len(key) and tuple(ids[: len(key)]) == key:
            groups.setdefault(key, []).append(ids)
        else:
            computed += len(ids)
    for key, members in groups.items():
        if len(members) < 2:
            computed += sum(len(ids) for ids in members)
            continue
        computed += len(key) + sum(len(ids) - len(key) for ids in members)
        reused += len(key) * (len(members) - 1)
    return computed, reused
