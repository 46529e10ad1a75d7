"""Which error to report when several concurrent tasks failed together."""

from __future__ import annotations

import asyncio


def first_error(group: BaseExceptionGroup) -> BaseException:
    """The first real failure inside a (nested) exception group.

    Tasks cancelled because a sibling failed are not the cause: a ``CancelledError`` is
    returned only when nothing else is in the group.
    """
    leaves: list[BaseException] = []

    def walk(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                walk(inner)
        else:
            leaves.append(error)

    walk(group)
    real = [e for e in leaves if not isinstance(e, asyncio.CancelledError)]
    return (real or leaves)[0]
