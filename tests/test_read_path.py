"""The one read path of a disk file, without a mount: the tree's checks, the direct reads'
read-ahead policy (snapfs.datapath.SpliceReads), and what a failure of the data path means.

The data path's worker is a stand-in here (it records what it is asked); test_datapath*.py run
the real one against QEMU and against a fake NBD server.
"""

from __future__ import annotations

import errno
import random
from collections.abc import Sequence

import pytest
import trio

from snapfs.datapath import READ_AHEAD_MIN, Done, SpliceReads
from snapfs.errors import NBDError
from snapfs.fs import TreeOperations
from snapfs.fuse.reply import ReadReply
from snapfs.nbd.wire import StreamLost
from snapfs.regions import Regions
from snapfs.tree import DISK_INO_BASE, Disk, SourceError, Tree
from tests.conftest import RecordingReply

MiB = 1 << 20
SIZE = 16 * MiB
RAW = DISK_INO_BASE


class MemorySource:
    """The libnbd connection's stand-in: bytes in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []

    async def read_into(self, buf: bytearray, offset: int, length: int) -> None:
        self.reads.append((offset, length))
        buf[:length] = self.data[offset : offset + length]

    async def discard(self, offset: int, length: int) -> None:
        pass


class StandInReader:
    """A DiskReader's stand-in: records each submit; answers with the data, or fails."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.alive = True
        self.submits: list[tuple[int, int, list[tuple[int, int]]]] = []
        self.fail_with: NBDError | None = None

    def submit(
        self,
        reply: ReadReply,
        offset: int,
        length: int,
        ahead: Sequence[tuple[int, int]],
        done: Done,
    ) -> None:
        self.submits.append((offset, length, list(ahead)))
        if self.fail_with is not None:
            done(self.fail_with)
        else:
            reply.data(self.data[offset : offset + length])


def setup(
    dirty: list[tuple[int, int]] | None = None,
    zeros: Sequence[tuple[int, int]] = (),
) -> tuple[TreeOperations, Disk, StandInReader, MemorySource]:
    data = bytearray(random.Random(1).randbytes(SIZE))
    for offset, length in zeros:
        data[offset : offset + length] = bytes(length)
    source = MemorySource(bytes(data))
    regions = Regions.from_extents(dirty) if dirty is not None else Regions.whole(SIZE)
    disk = Disk("scsi0", SIZE, source, regions, zeros=Regions.from_extents(list(zeros)))
    ops = TreeOperations(Tree([disk], dict))
    reader = StandInReader(source.data)

    def on_error(err: NBDError, offset: int, length: int) -> SourceError:
        return SourceError(f"the snapshot broke: {err}", errno.EIO)

    ops.direct[RAW] = SpliceReads(
        reader,
        SIZE,
        disk.readable.contains,
        on_error,
        disk.reads_as_zeros,
    )
    return ops, disk, reader, source


def read(ops: TreeOperations, offset: int, size: int) -> RecordingReply:
    reply = RecordingReply()
    ops.read(RAW, 0, offset, size, reply)
    trio.run(reply.settle)
    return reply


def test_sequential_reads_name_two_ranges_ahead_and_others_none() -> None:
    ops, _, reader, _ = setup()
    for i in range(4):
        assert read(ops, i * MiB, MiB).payload == reader.data[i * MiB : (i + 1) * MiB]
    assert [a for _, _, a in reader.submits] == [
        [],  # the first read: nothing to follow yet
        [(2 * MiB, MiB), (3 * MiB, MiB)],
        [(3 * MiB, MiB), (4 * MiB, MiB)],
        [(4 * MiB, MiB), (5 * MiB, MiB)],
    ]
    # Small, or not where the last read ended: no read-ahead.
    read(ops, 5 * MiB, READ_AHEAD_MIN - 4096)
    read(ops, 5 * MiB + READ_AHEAD_MIN - 4096, 4096)
    read(ops, 9 * MiB, MiB)
    assert [a for _, _, a in reader.submits[4:]] == [[], [], []]


def test_read_ahead_stays_inside_the_readable_set() -> None:
    ops, disk, reader, _ = setup([(0, 3 * MiB + 4096)])
    read(ops, 0, MiB)
    read(ops, MiB, MiB)
    assert reader.submits[-1][2] == [(2 * MiB, MiB)]  # 3 MiB .. 4 MiB is not readable
    # A punch shrinks the readable set: nothing after the punched range is read ahead.
    trio.run(ops.tree.punch, RAW, 2 * MiB, MiB, 3)
    read(ops, 0, MiB)
    read(ops, MiB, MiB)
    assert reader.submits[-1][2] == []
    # The punched range itself is refused before anything is asked.
    with pytest.raises(Exception, match="outside the readable set"):
        ops.read(RAW, 0, 2 * MiB, 4096, RecordingReply())
    assert disk.bytes_read == 4 * MiB


def test_a_lost_data_path_falls_back_to_the_plain_read() -> None:
    ops, disk, reader, source = setup()
    reader.fail_with = StreamLost("gone")
    reply = read(ops, MiB, MiB)
    assert reply.payload == source.data[MiB : 2 * MiB]
    assert source.reads == [(MiB, MiB)]
    # A reader that is not alive is not asked at all.
    reader.alive = False
    reply = read(ops, 0, 4096)
    assert reply.payload == source.data[:4096]
    assert len(reader.submits) == 1
    assert disk.bytes_read == MiB + 4096


def test_an_error_of_the_server_is_answered_and_not_counted() -> None:
    ops, disk, reader, source = setup()
    reader.fail_with = NBDError("Invalid argument", errno.EINVAL)
    reply = read(ops, 0, MiB)
    assert reply.errno == errno.EIO  # on_error's meaning: the snapshot broke
    assert source.reads == []  # not read another way
    assert disk.bytes_read == 0


def test_text_files_and_reads_past_the_end_are_answered_at_once() -> None:
    ops, _, reader, _ = setup()
    reply = RecordingReply()
    ops.read(RAW, 0, SIZE, 4096, reply)
    assert reply.payload == b""
    assert not reply.spawned
    assert reader.submits == []


def test_known_zeros_are_answered_without_asking_and_not_read_ahead() -> None:
    """A full view's holes (the snapshot's known zeros) are answered with zeros at once: no
    NBD request, no read-ahead into them. A READ that is partly data is asked for whole."""
    hole = (4 * MiB, 4 * MiB)
    ops, disk, reader, source = setup(zeros=[hole])
    for i in range(10):
        reply = read(ops, i * MiB, MiB)
        assert reply.payload == source.data[i * MiB : (i + 1) * MiB]
        assert not reply.spawned
    assert [(o // MiB, a) for o, _, a in reader.submits] == [
        (0, []),
        (1, [(2 * MiB, MiB), (3 * MiB, MiB)]),
        (2, [(3 * MiB, MiB)]),  # 4 MiB .. 8 MiB reads as zeros: not read ahead
        (3, []),
        (8, []),  # after the hole: not where the last asked READ ended
        (9, [(10 * MiB, MiB), (11 * MiB, MiB)]),
    ]
    # A READ across the hole's edges is asked for whole; one inside it in any size is not.
    read(ops, 4 * MiB - 4096, 8192)
    read(ops, 8 * MiB - 4096, 8192)
    assert [(o, n) for o, n, _ in reader.submits[-2:]] == [
        (4 * MiB - 4096, 8192),
        (8 * MiB - 4096, 8192),
    ]
    asked = len(reader.submits)
    assert read(ops, 5 * MiB + 100, 5000).payload == bytes(5000)
    assert len(reader.submits) == asked
    assert disk.bytes_read == 10 * MiB + 2 * 8192 + 5000
    # The thread that reads the FUSE requests answers them too, and a punched range of the hole
    # is refused like any other: known zeros never widen what may be read.
    reply = RecordingReply()
    assert ops.read_now(reply, RAW, 0, 6 * MiB, MiB)
    assert reply.payload == bytes(MiB)
    trio.run(ops.tree.punch, RAW, 6 * MiB, MiB, 3)
    with pytest.raises(Exception, match="outside the readable set"):
        ops.read(RAW, 0, 6 * MiB, 4096, RecordingReply())
    assert source.reads == []
    assert len(reader.submits) == asked
