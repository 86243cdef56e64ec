"""A pytest plugin: SIGTERM and SIGHUP stop the run the way Ctrl-C does, through every cleanup.

Python's default for both ends the process on the spot: no ``finally``, no fixture teardown, so
a CI timeout, a ``kill`` or a closed terminal would leave mounts, QEMU processes and /dev/shm
directories behind. Here the signal raises KeyboardInterrupt in the running test (its
``finally`` blocks and fixtures clean up) and the session stops after that test even if the
test caught the interrupt (``dev.bench.main`` turns one into an exit status, for example).
The first signal only: a second one must not cut the cleanup short (SIGKILL still can).

conftest.py imports the hooks; a pytest of its own loads this with ``-p tests.stopsignals``.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Generator
from types import FrameType

import pytest

SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_got: list[str] = []


def _stop(signum: int, _frame: FrameType | None) -> None:
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _got.append(signal.Signals(signum).name)
    raise KeyboardInterrupt(f"got {_got[0]}")


def pytest_configure(config: pytest.Config) -> None:
    if threading.current_thread() is threading.main_thread():  # where handlers can be set
        for sig in SIGNALS:
            signal.signal(sig, _stop)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    try:
        return (yield)
    finally:
        if _got:
            item.session.shouldstop = f"got {_got[0]}"
