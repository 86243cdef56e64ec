"""How snapfs's data threads are scheduled (see :func:`batch_scheduled`)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def batch_scheduled() -> Iterator[None]:
    """Run the calling thread as ``SCHED_BATCH`` inside the block, then as ``SCHED_OTHER``
    again; a thread under any other policy (one somebody chose) is left as it is.

    Why: snapfs's data threads (a disk's worker in the serving process, the reading thread of
    ``snapfs copy``) are woken by every request and every reply. As normal threads they
    preempt whatever runs at that moment (a reader, QEMU, a guest's vCPU) to move one reply and
    sleep again, and on a busy host those sleeps and wakeups cost more CPU than the replies. A
    batch thread that wakes never preempts the running task: it runs at the end of that task's
    slice or on an idle CPU, and then handles everything that came meanwhile in one go. Its
    share of the CPU and its nice value stay the same; only that preemption goes. Changing
    between these two policies needs no privilege."""
    try:
        batch = os.sched_getscheduler(0) == os.SCHED_OTHER
        if batch:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as err:  # a seccomp filter, say: the thread runs as it is
        log.debug("the thread stays as it is scheduled: %s", err.strerror)
        batch = False
    try:
        yield
    finally:
        if batch:  # a thread of a pool (trio's) is reused for other work
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
