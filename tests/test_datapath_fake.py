"""The splice data path against a FAKE NBD server (tests/fake_nbd.py): the fast tier, no QEMU.

The fake answers requests out of order, interleaves the chunks of different replies, sends
holes, fails chosen ranges and breaks the protocol on purpose: what QEMU may do but cannot be
made to do at will. ``test_datapath.py`` runs the same reader against QEMU's own server.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import mmap
import os
import random
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trio

from snapfs.datapath import MAX_JOBS, DiskReader
from snapfs.errors import NBDError
from snapfs.fuse.reply import ReadReply
from snapfs.fuse.server import Intake
from snapfs.nbd.wire import StreamLost
from tests.conftest import FakeDevice, read_back, with_reader
from tests.fake_nbd import FakeNBD
from tests.test_fuse_mount import DISK_SIZE, INO_DISK, Mount, mounted, wait_for

KiB = 1024
MiB = 1 << 20
SIZE = 8 * MiB


def content(seed: int = 1) -> bytes:
    """Random data with zero runs of many lengths (holes for the fake's structured replies)."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(SIZE))
    for start, length in [(0, 70_000), (MiB, 4096), (5 * MiB + 12345, 300_000)] + [
        (rng.randrange(0, SIZE - 200_000), rng.choice([1, 100, 4096, 10_000, 200_000]))
        for _ in range(40)
    ]:
        data[start : start + length] = bytes(length)
    return bytes(data)


@pytest.fixture
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[FakeNBD]:
    opts = getattr(request, "param", {})
    with FakeNBD(tmp_path / "nbd.sock", content(), **opts) as fake:
        yield fake


async def read_many(
    reader: DiskReader, dev: FakeDevice, reads: dict[int, tuple[int, int]]
) -> tuple[dict[int, bytes], dict[int, NBDError]]:
    """Submit every read at once; collect the replies (any order) and the failures."""
    got: dict[int, bytes] = {}
    failed: dict[int, NBDError] = {}
    settled = trio.Event()
    stop = threading.Event()

    def note() -> None:
        if len(got) + len(failed) == len(reads):
            settled.set()
            stop.set()

    def done(u: int, err: NBDError | None) -> None:
        if err is not None:
            failed[u] = err
            note()

    def taker() -> None:
        for u, error, payload in dev.take_until(stop):
            assert error == 0
            got[u] = payload
            trio.from_thread.run_sync(note)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, taker)
        for u, (offset, length) in reads.items():
            reader.submit(ReadReply(u), offset, length, (), functools.partial(done, u))
        with trio.fail_after(30):
            await settled.wait()
    return got, failed


def random_reads(n: int, seed: int) -> dict[int, tuple[int, int]]:
    rng = random.Random(seed)
    reads = {}
    for u in range(1, n + 1):
        length = rng.choice([1, 512, 4096, 65536, 65537, 300_000, MiB])
        reads[u] = (rng.randrange(0, SIZE - length), length)
    return reads


@pytest.mark.parametrize("confine", [0, 64 * KiB], ids=["whole", "confined"])
@pytest.mark.parametrize(
    "server",
    [{"shuffle": True, "chunk": 24 * KiB}, {"shuffle": False}],
    ids=["shuffled", "in-order"],
    indirect=True,
)
def test_concurrent_reads_out_of_order(server: FakeNBD, confine: int) -> None:
    """Many READs at once; the server answers in any order and interleaves chunks (structured
    replies) or whole replies (simple ones, when confined); every reply has its own bytes."""
    reads = random_reads(60, 2)

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        got, failed = await read_many(reader, dev, reads)
        assert not failed
        for u, (offset, length) in reads.items():
            assert got[u] == server.data[offset : offset + length], (u, offset, length)

    reader = with_reader(str(server.path), "disk", body, confine=confine)
    assert reader.most_jobs > 1
    # READs queued together went out together: fewer sends than requests.
    assert reader.sends < reader.requests, (reader.sends, reader.requests)
    if confine:
        # Every request stays inside one 64 KiB block.
        assert all(o // confine == (o + n - 1) // confine for o, n in server.reads[1:])
        assert len(server.reads) > len(reads)


@pytest.mark.parametrize("server", [{"shuffle": True, "chunk": 8 * KiB}], indirect=True)
def test_sequential_reads_with_read_ahead_and_small_pipes(server: FakeNBD) -> None:
    """Read-aheads used and dropped, pipes too small for a reply (copied instead)."""

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        unique = 0
        for start in (0, 3 * MiB):
            for i in range(8):
                offset = start + i * 256 * KiB
                ahead = [(offset + k * 256 * KiB, 256 * KiB) for k in (1, 2)]
                unique += 1
                got = await read_back(reader, dev, unique, offset, 256 * KiB, ahead)
                assert got == server.data[offset : offset + 256 * KiB]

    for pipe_size in (MiB, 64 * KiB):
        reader = with_reader(str(server.path), "disk", body, pipe_size=pipe_size)
        assert reader.hits > 8
        assert (reader.copied > 0) == (pipe_size < 256 * KiB)


@pytest.mark.parametrize("server", [{"shuffle": True, "fail": [(2 * MiB + 100, 1)]}], indirect=True)
@pytest.mark.parametrize("confine", [0, 64 * KiB], ids=["whole", "confined"])
def test_a_failing_request_among_many(server: FakeNBD, confine: int) -> None:
    """The one read touching the failing byte fails with the server's errno, alone; the
    others in flight with it are answered, and the reader goes on."""
    reads = random_reads(30, 3)
    reads[99] = (2 * MiB, 64 * KiB)

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        got, failed = await read_many(reader, dev, reads)
        bad = {u for u, (o, n) in reads.items() if o <= 2 * MiB + 100 < o + n}
        assert set(failed) == bad
        assert all(
            err.errno == errno.EIO and not isinstance(err, StreamLost) for err in failed.values()
        )
        for u in set(reads) - bad:
            offset, length = reads[u]
            assert got[u] == server.data[offset : offset + length]
        assert reader.alive
        assert await read_back(reader, dev, 1000, 0, 4096) == server.data[:4096]

    with_reader(str(server.path), "disk", body, confine=confine)


@pytest.mark.parametrize("server", [{"break_after": 5}], indirect=True)
def test_a_broken_protocol_fails_everything_in_flight(server: FakeNBD) -> None:
    """Garbage from the server ends the stream: every read in flight and every later one
    fails with StreamLost (the caller then reads the libnbd way), nothing hangs."""
    reads = random_reads(20, 4)

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        got, failed = await read_many(reader, dev, reads)
        assert failed
        assert all(isinstance(err, StreamLost) for err in failed.values())
        for u, payload in got.items():  # those answered before the garbage are right
            offset, length = reads[u]
            assert payload == server.data[offset : offset + length]
        assert not reader.alive
        with pytest.raises(StreamLost):
            await reader.read(ReadReply(500), 0, 4096, ())

    with_reader(str(server.path), "disk", body)


@pytest.mark.mount
def test_the_worker_reading_fuse_requests_answers_a_stat_while_its_reads_wait(
    tmp_path: Path,
) -> None:
    """A reader that reads the FUSE requests itself (an intake, on a real mount) keeps
    reading them while MAX_JOBS READs of its disk wait for the server: a ``stat`` and a
    listing are answered meanwhile, and every READ gets its bytes once the server answers."""
    hold = threading.Event()
    with (
        FakeNBD(tmp_path / "nbd.sock", content(), hold=hold) as fake,
        mounted(tmp_path) as m,
        _reading_requests(fake, m) as (reader, intake, failures),
    ):
        try:
            assert reader.reads_requests
            offsets = [i * 160 * KiB for i in range(MAX_JOBS + 8)]
            with ThreadPoolExecutor(len(offsets) + 1) as pool:
                try:
                    results = pool.map(
                        lambda o: _pread_direct(m.path / "disk.raw", 64 * KiB, o), offsets
                    )
                    wait_for(lambda: reader.jobs >= MAX_JOBS, "MAX_JOBS reads to be in flight")
                    assert not hold.is_set()
                    looked = pool.submit(lambda: (os.stat(m.path / "disk.raw"), os.listdir(m.path)))
                    attr, names = looked.result(timeout=10)  # not behind the held reads
                    assert attr.st_size == DISK_SIZE
                    assert "disk.raw" in names
                finally:
                    hold.set()  # before the pool waits for its threads
                for o, got in zip(offsets, results, strict=True):
                    assert got == fake.data[o : o + 64 * KiB], o
            assert not failures
            assert intake.reads >= len(offsets)
        finally:
            hold.set()


@contextlib.contextmanager
def _reading_requests(
    fake: FakeNBD, m: Mount
) -> Iterator[tuple[DiskReader, Intake, list[NBDError]]]:
    """A running DiskReader of ``fake``'s export whose worker reads the FUSE requests of the
    mount ``m`` (its READs of the disk; the rest goes to the server); the failures it reported.
    Closed, and its worker gone, at the end."""
    assert m.token is not None
    assert m.nursery is not None
    failures: list[NBDError] = []

    def done(err: NBDError | None) -> None:
        if err is not None:
            failures.append(err)

    def read(reply: ReadReply, ino: int, fh: int, offset: int, size: int) -> bool:
        if ino != INO_DISK:
            return False
        reader.submit(reply, offset, size, (), done)
        return True

    intake = trio.from_thread.run_sync(m.server.intake, read, trio_token=m.token)
    reader = DiskReader(str(fake.path), "disk", m.server.reply_pipe, tune=False, intake=intake)
    trio.from_thread.run(m.nursery.start, reader.run, trio_token=m.token)
    try:
        yield reader, intake, failures
    finally:
        trio.from_thread.run_sync(reader.close, trio_token=m.token)
        trio.from_thread.run(reader.stopped.wait, trio_token=m.token)


def _pread_direct(path: Path, size: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, size) as buf:
            n = os.preadv(fd, [buf], offset)
            return buf[:n]
    finally:
        os.close(fd)


def _epoll_targets() -> set[int]:
    """Every descriptor that some epoll instance of this process watches."""
    targets = set()
    for info in Path("/proc/self/fdinfo").iterdir():
        with contextlib.suppress(OSError):
            for line in info.read_text().splitlines():
                if line.startswith("tfd:"):
                    targets.add(int(line.split()[1]))
    return targets


def _wakeups(tid: int) -> int:
    """How often the thread ``tid`` of this process went to sleep and was woken."""
    for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches for thread {tid}")


@pytest.mark.mount
def test_the_trio_thread_sleeps_while_the_worker_reads_the_fuse_requests(
    tmp_path: Path,
) -> None:
    """While a reader's worker reads the FUSE requests (an intake), the server's trio thread
    no longer watches /dev/fuse at all: a silenced epoll registration still wakes it for
    every request the kernel queues. Once the worker stops, the trio thread reads again."""
    reads = 300
    with FakeNBD(tmp_path / "nbd.sock", content()) as fake, mounted(tmp_path) as m:
        assert m.token is not None
        fuse_fd = m.server._fd
        # The trio thread waits on it for every request.
        wait_for(lambda: fuse_fd in _epoll_targets(), "the trio thread to wait on /dev/fuse")
        trio_tid = trio.from_thread.run_sync(threading.get_native_id, trio_token=m.token)
        with _reading_requests(fake, m) as (reader, intake, failures):
            assert reader.reads_requests
            assert _pread_direct(m.path / "disk.raw", 4096, 0) == fake.data[:4096]
            wait_for(lambda: fuse_fd not in _epoll_targets(), "the trio thread to let go")
            before = _wakeups(trio_tid)
            # One descriptor: an open or a close is a request for the trio thread.
            fd = os.open(m.path / "disk.raw", os.O_RDONLY | os.O_DIRECT)
            try:
                with mmap.mmap(-1, 4096) as buf:
                    for i in range(reads):  # one at a time: the trio thread sleeps meanwhile
                        o = i * 16 * KiB
                        assert os.preadv(fd, [buf], o) == 4096
                        assert buf[:] == fake.data[o : o + 4096], o
                    woken = _wakeups(trio_tid) - before
            finally:
                os.close(fd)
            assert intake.reads >= reads
            assert woken < reads // 10, f"the trio thread woke {woken} times for {reads} READs"
            assert not failures
        assert not reader.reads_requests or intake.fileno == -1
        assert os.stat(m.path / "disk.raw").st_size == DISK_SIZE  # served by the trio thread
        wait_for(lambda: fuse_fd in _epoll_targets(), "the trio thread to wait on /dev/fuse again")
