"""Running snapfs's async code: trio, with an asyncio loop for qemu.qmp (trio-asyncio)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
import trio_asyncio

from snapfs.errors import SnapfsError


def unwrap(exc: BaseException) -> BaseException:
    """The error worth reporting from a (possibly nested) exception group: a lone leaf, or the
    first snapfs error among several."""
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
            continue
        ours = [e for e in exc.exceptions if isinstance(unwrap(e), SnapfsError)]
        if not ours:
            return exc
        exc = unwrap(ours[0])
    return exc


def run_trio(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run an async function under trio with an asyncio loop for qemu.qmp; errors come out of
    nurseries' exception groups as the single error they stand for."""

    async def main() -> Any:
        async with trio_asyncio.open_loop():
            return await fn(*args, **kwargs)

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        err = unwrap(group)
        if err is group:
            raise
        raise err from group
