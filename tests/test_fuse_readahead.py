"""Read-ahead at the FUSE boundary (``snapfs.fs.ReadAhead``), against an in-memory source.

No mount: ``TreeOperations.read`` is called the way the FUSE server calls it, and the source
records what was read from it, so the tests see which reads hit a read-ahead.
"""

from __future__ import annotations

import errno
import random
from typing import Any

import pytest
import trio
import trio.testing

from snapfs.fs import READ_AHEAD_MIN, TreeOperations
from snapfs.fuse.ops import FuseErrno
from snapfs.regions import Regions
from snapfs.tree import (
    DISK_INO_BASE,
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    Disk,
    SourceError,
    Tree,
)

MiB = 1 << 20
RAW = DISK_INO_BASE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


class RecordingSource:
    """Serves ``data``; records every read; fails reads at ``fail_at`` once; can hold reads on
    a gate."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []
        self.fail_at: set[int] = set()
        self.gate: trio.Event | None = None

    async def read_into(self, buf: bytearray, offset: int, length: int) -> None:
        self.reads.append((offset, length))
        if self.gate is not None:
            await self.gate.wait()
        await trio.lowlevel.checkpoint()
        if offset in self.fail_at:
            self.fail_at.discard(offset)
            raise SourceError("injected")
        buf[:length] = self.data[offset : offset + length]

    async def discard(self, offset: int, length: int) -> None:
        pass


def make_ops(
    size: int = 8 * MiB, dirty: list[tuple[int, int]] | None = None
) -> tuple[TreeOperations, RecordingSource]:
    src = RecordingSource(random.Random(5).randbytes(size))
    regions = Regions.from_extents(dirty) if dirty is not None else Regions.whole(size)
    facts: dict[str, Any] = {}
    return TreeOperations(Tree([Disk("scsi0", size, src, regions)], lambda: facts)), src


async def read(ops: TreeOperations, offset: int, size: int = MiB) -> bytes:
    result = await ops.read(RAW, 0, offset, size)
    try:
        return bytes(result.data)
    finally:
        if result.release is not None:
            result.release()


def test_sequential_reads_are_served_from_read_ahead() -> None:
    async def main() -> None:
        ops, src = make_ops()
        for offset in range(0, 8 * MiB, MiB):
            assert await read(ops, offset) == src.data[offset : offset + MiB]
        # The first two reads establish the pattern; from the third on, each one was read ahead.
        assert ops.read_ahead.hits == 6
        # Nothing read twice, nothing past the end of the disk.
        assert sorted(src.reads) == [(o, MiB) for o in range(0, 8 * MiB, MiB)]

    trio.run(main)


def test_read_ahead_stays_inside_the_readable_set() -> None:
    async def main() -> None:
        ops, src = make_ops(dirty=[(0, 2 * MiB), (3 * MiB, MiB)])
        await read(ops, 0)
        await read(ops, MiB)
        await trio.testing.wait_all_tasks_blocked()
        assert (2 * MiB, MiB) not in src.reads
        with pytest.raises(FuseErrno) as exc:
            await read(ops, 2 * MiB)
        assert exc.value.errno == errno.ENODATA

    trio.run(main)


def test_a_punch_after_the_read_ahead_still_refuses_the_read() -> None:
    async def main() -> None:
        ops, src = make_ops()
        await read(ops, 0)
        await read(ops, MiB)  # reads 2 MiB ahead
        await trio.testing.wait_all_tasks_blocked()
        assert (2 * MiB, MiB) in src.reads
        await ops.fallocate(RAW, 0, 2 * MiB, MiB, PUNCH)
        with pytest.raises(FuseErrno) as exc:
            await read(ops, 2 * MiB)
        assert exc.value.errno == errno.ENODATA

    trio.run(main)


def test_a_failed_read_ahead_is_retried_by_the_read() -> None:
    async def main() -> None:
        ops, src = make_ops()
        await read(ops, 0)
        src.fail_at.add(2 * MiB)  # the read-ahead started by the next read
        await read(ops, MiB)
        await trio.testing.wait_all_tasks_blocked()
        assert await read(ops, 2 * MiB) == src.data[2 * MiB : 3 * MiB]
        assert ops.read_ahead.hits == 0
        assert src.reads.count((2 * MiB, MiB)) == 2

    trio.run(main)


def test_small_and_random_reads_start_no_read_ahead() -> None:
    async def main() -> None:
        ops, src = make_ops()
        small = READ_AHEAD_MIN // 2
        await read(ops, 0, small)
        await read(ops, small, small)
        for offset in (5 * MiB, MiB, 3 * MiB):
            assert await read(ops, offset) == src.data[offset : offset + MiB]
        await trio.testing.wait_all_tasks_blocked()
        assert len(src.reads) == 5

    trio.run(main)


def test_a_cancelled_read_gives_its_read_ahead_buffer_back() -> None:
    async def main() -> None:
        ops, src = make_ops()
        await read(ops, 0)
        await read(ops, MiB)
        await trio.testing.wait_all_tasks_blocked()
        free = len(ops.pool._free)
        src.gate = trio.Event()
        await read(ops, 2 * MiB)  # served from the read-ahead; the one of 3 MiB now waits
        with trio.move_on_after(0.01):
            await read(ops, 3 * MiB)
        src.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        # Every buffer is back: the one of the cancelled read's read-ahead too.
        assert len(ops.pool._free) >= free
        src.gate = None
        assert await read(ops, 3 * MiB) == src.data[3 * MiB : 4 * MiB]

    trio.run(main)


def test_release_gives_the_read_ahead_buffer_back() -> None:
    async def main() -> None:
        ops, _ = make_ops()
        await read(ops, 0)
        await read(ops, MiB)
        await trio.testing.wait_all_tasks_blocked()
        free = len(ops.pool._free)
        ops.release(RAW, 0)
        assert len(ops.pool._free) == free + 1

    trio.run(main)
