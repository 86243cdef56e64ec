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
from typing import cast

import pytest
import trio

from snapfs import fastpath
from snapfs.datapath import MAX_JOBS, DiskReader
from snapfs.errors import NBDError
from snapfs.fuse.reply import ReadReply
from snapfs.fuse.server import Intake, TakerFactory
from snapfs.nbd.wire import NBDStream, StreamLost
from snapfs.qmp import COPIED_BITMAP
from snapfs.regions import Regions
from snapfs.sched import batch_scheduled
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


async def read_all_right(
    reader: DiskReader, dev: FakeDevice, reads: dict[int, tuple[int, int]], data: bytes
) -> None:
    """``read_many``, and every read answered with its own bytes of ``data``."""
    got, failed = await read_many(reader, dev, reads)
    assert not failed
    for u, (offset, length) in reads.items():
        assert got[u] == data[offset : offset + length], (u, offset, length)


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
        await read_all_right(reader, dev, reads, server.data)

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


#: The clusters the fake calls saved (and misreads in reads across clusters), for the tests of
#: checked reads: a few scattered ones, and a run of them.
SAVED = {3, 17, 18, 40, 41, 42, 43, 77, 100}
COPIED = f"qemu:dirty-bitmap:{COPIED_BITMAP}"


@pytest.mark.parametrize(
    "server",
    [
        {"shuffle": True, "chunk": 24 * KiB, "copied": COPIED, "saved": SAVED},
        {"shuffle": False, "copied": COPIED, "saved": SAVED},
        {"shuffle": True, "copied": COPIED, "saved": SAVED, "status_fail": True},
    ],
    ids=["shuffled", "in-order", "status-fails"],
    indirect=True,
)
def test_reads_across_clusters_are_checked_on_the_stream(server: FakeNBD) -> None:
    """With the copied bitmap (QEMU before 8.0), a READ across clusters is one request,
    flagged "don't fragment", and its bytes go out only once a block status asked after
    they arrived finds none of its clusters saved; otherwise it is read again a request per
    cluster. The fake misreads every saved cluster in a read across clusters (as QEMU 7.2
    does), so any READ answered from such a read would be wrong. Checks that fail read
    again, as if saved. Sequential READs with read-ahead are checked before they are used."""
    c = 64 * KiB
    reads = random_reads(80, 5)

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        await read_all_right(reader, dev, reads, server.data)
        unique = 1000
        for offset in range(0, 4 * MiB, 512 * KiB):  # 768 KiB is in a saved cluster
            ahead = [(offset + k * 512 * KiB, 512 * KiB) for k in (1, 2)]
            unique += 1
            got1 = await read_back(reader, dev, unique, offset, 512 * KiB, ahead)
            assert got1 == server.data[offset : offset + 512 * KiB], offset

    reader = with_reader(str(server.path), "disk", body, confine=c, copied=COPIED_BITMAP)
    across = [(o, n) for o, n in server.reads[1:] if o // c != (o + n - 1) // c]
    assert across, "no READ across clusters was read in one request"
    assert set(across) <= set(server.unfragmented)
    # Every whole read was checked (the last read-aheads' checks may not have reached the
    # server when the reader closed), each block status after its read was answered in full
    # and for exactly its range.
    assert len(across) >= reader.verified >= len(server.statuses) >= len(across) - 2
    answered: set[tuple[int, int]] = set()
    for what, offset, length in server.events:
        if what == "read":
            answered.add((offset, length))
        else:
            assert (offset, length) in answered, (offset, length)
    if server.status_fail:
        # Nothing read whole went out: every READ (read-ahead or not) was read again.
        assert reader.reread > 0
        assert reader.hits == 0
    else:
        assert 0 < reader.reread < reader.verified
        assert reader.hits > 0  # read-aheads checked and used


@pytest.mark.parametrize("server", [{"copied": "", "saved": SAVED}], indirect=True)
def test_reads_stay_confined_where_the_copied_bitmap_is_not_offered(server: FakeNBD) -> None:
    """A server without the copied bitmap: every request stays inside one cluster, and no
    block status is asked."""
    c = 64 * KiB
    reads = random_reads(40, 6)

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        await read_all_right(reader, dev, reads, server.data)

    reader = with_reader(str(server.path), "disk", body, confine=c, copied=COPIED_BITMAP)
    assert all(o // c == (o + n - 1) // c for o, n in server.reads[1:])
    assert not server.statuses
    assert reader.verified == 0


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


def test_the_worker_runs_as_a_batch_thread_and_hands_its_thread_back_as_it_was(
    server: FakeNBD,
) -> None:
    """The worker serves as SCHED_BATCH (never preempting the task that runs when a request or
    reply wakes it); the thread, which trio reuses, is SCHED_OTHER again once it stops."""
    seen: list[int] = []

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        got, failed = await read_many(reader, dev, {1: (0, 4096)})
        assert got[1] == server.data[:4096]
        assert not failed
        seen.append(os.sched_getscheduler(reader.worker_tid))

    reader = with_reader(str(server.path), "disk", body)
    assert seen == [os.SCHED_BATCH]
    assert reader.worker_tid not in (0, threading.get_native_id())
    # Back in trio's cache (idle threads stay there for seconds): as it was.
    assert os.sched_getscheduler(reader.worker_tid) == os.SCHED_OTHER


@pytest.mark.parametrize("policy", ["SCHED_OTHER", "SCHED_IDLE"])
def test_batch_scheduling_leaves_a_chosen_policy_alone(policy: str) -> None:
    """Only a thread scheduled as usual becomes a batch thread (and goes back after); one
    that somebody put under another policy keeps it."""
    inside: list[int] = []
    after: list[int] = []

    def thread() -> None:
        os.sched_setscheduler(0, getattr(os, policy), os.sched_param(0))
        with batch_scheduled():
            inside.append(os.sched_getscheduler(0))
        after.append(os.sched_getscheduler(0))

    t = threading.Thread(target=thread)
    t.start()
    t.join(30)
    expected = os.SCHED_BATCH if policy == "SCHED_OTHER" else os.SCHED_IDLE
    assert inside == [expected]
    assert after == [getattr(os, policy)]


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
    fake: FakeNBD, m: Mount, taker: TakerFactory | None = None
) -> Iterator[tuple[DiskReader, Intake, list[NBDError]]]:
    """A running DiskReader of ``fake``'s export whose worker reads the FUSE requests of the
    mount ``m`` (its READs of the disk; the rest goes to the server), through ``taker`` first
    if given; the failures it reported. Closed, and its worker gone, at the end."""
    assert m.token is not None
    assert m.nursery is not None
    failures: list[NBDError] = []

    def read(reply: ReadReply, ino: int, fh: int, offset: int, size: int) -> bool:
        if ino != INO_DISK:
            return False

        def done(err: NBDError | None) -> None:
            if err is not None:
                failures.append(err)
                reply.error(err.errno)

        reader.submit(reply, offset, size, (), done)
        return True

    intake = trio.from_thread.run_sync(m.server.intake, read, taker, trio_token=m.token)
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


# -- the compiled READ path (snapfs/_fastpath.c) ------------------------------------------------


@contextlib.contextmanager
def _compiled(
    fake: FakeNBD,
    m: Mount,
    readable: Regions | None = None,
    confine: int = 0,
    zeros: Regions | None = None,
) -> Iterator[tuple[fastpath.CompiledDisk, Intake, list[NBDError], DiskReader]]:
    """``_reading_requests`` with the compiled path reading the requests first: it answers the
    READs of the disk's ``readable`` ranges (all of it by default) that are not wholly in
    ``zeros`` over a connection of its own (simple replies), and hands the rest to the
    DiskReader. Closed at the end."""
    if not fastpath.available():
        pytest.skip("snapfs._fastpath is not built (see test_compiled.py)")
    from snapfs import _fastpath

    made: list[fastpath.CompiledIntake] = []

    def taker(fd: int) -> fastpath.CompiledIntake | None:
        made.append(_fastpath.Intake(fd))
        return made[-1]

    stream = NBDStream.connect(str(fake.path), "disk", structured=False, tune=False)
    starts, ends = (readable or Regions.whole(DISK_SIZE)).arrays()
    zero_starts, zero_ends = (zeros or Regions()).arrays()
    disk = _fastpath.Disk(
        INO_DISK, DISK_SIZE, confine, stream.fileno, starts, ends, 128 * KiB, zero_starts, zero_ends
    )
    try:
        with _reading_requests(fake, m, taker) as (reader, intake, failures):
            assert made[0].add(disk)
            yield disk, intake, failures, reader
    finally:
        disk.close()
        stream.close()


def _read_all(m: Mount, ranges: list[tuple[int, int]]) -> list[bytes | int]:
    """Direct preads of ``ranges``, all at once: the bytes, or the errno."""

    def one(r: tuple[int, int]) -> bytes | int:
        try:
            return _pread_direct(m.path / "disk.raw", r[1], r[0])
        except OSError as err:
            return err.errno or 0

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(one, ranges))


def _ranges(seed: int, count: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.choice([1, 511, 4096, 4097, 65536, 70_000, 200_000, MiB])
        out.append((rng.randrange(0, DISK_SIZE - length), length))
    return out


@pytest.mark.mount
@pytest.mark.parametrize("confine", [0, 65536])
def test_compiled_reads_answered_out_of_order_are_exact(tmp_path: Path, confine: int) -> None:
    """Many READs in flight at once, answered by the server in a shuffled order: each gets its
    own bytes, from the compiled path (READs across a ``confine`` block go to Python)."""
    with (
        FakeNBD(tmp_path / "nbd.sock", content(), shuffle=True) as fake,
        mounted(tmp_path) as m,
        _compiled(fake, m, confine=confine) as (disk, intake, failures, _),
    ):
        ranges = _ranges(1, 200)
        got = _read_all(m, ranges)
        for (o, n), data in zip(ranges, got, strict=True):
            assert data == fake.data[o : o + n], (o, n)
        assert not failures
        c = disk.counters
        assert c["reads"] > 50
        assert (c["declined"] > 0) == bool(confine)
        assert intake.reads >= len(ranges)


@pytest.mark.mount
def test_compiled_reads_outside_the_readable_set_go_to_python(tmp_path: Path) -> None:
    """The compiled path answers only READs inside its readable set; after ``remove`` the range
    is no longer read there. Python's side decides about the rest."""
    readable = Regions.from_extents([(0, MiB), (2 * MiB, MiB)])
    with (
        FakeNBD(tmp_path / "nbd.sock", content()) as fake,
        mounted(tmp_path) as m,
        _compiled(fake, m, readable) as (disk, _, failures, _),
    ):
        assert _read_all(m, [(4096, 8192)]) == [fake.data[4096 : 4096 + 8192]]
        assert disk.counters["reads"] == 1
        # Across the edge of the readable set, and outside it: declined (read by Python here).
        assert _read_all(m, [(MiB - 4096, 8192), (MiB + 4096, 4096)]) == [
            fake.data[MiB - 4096 : MiB + 4096],
            fake.data[MiB + 4096 : MiB + 8192],
        ]
        assert disk.counters["reads"] == 1
        assert disk.counters["declined"] == 2
        disk.remove(2 * MiB + 65536, 65536)
        assert not disk.contains(2 * MiB + 65536, 1)
        assert disk.contains(2 * MiB, 65536)
        assert disk.contains(2 * MiB + 131072, MiB - 131072)
        _read_all(m, [(2 * MiB + 65536 + 100, 100), (2 * MiB + 100, 100)])
        assert disk.counters["reads"] == 2
        assert disk.counters["declined"] == 3
        assert not failures


@pytest.mark.mount
def test_compiled_reads_wholly_in_known_zeros_go_to_python(tmp_path: Path) -> None:
    """A READ that lies wholly in a known zero of the snapshot is handed to Python (which
    answers it without QEMU, see test_read_path); one that runs on into data is read here."""
    zeros = Regions.from_extents([(MiB, MiB), (3 * MiB, 4096)])
    with (
        FakeNBD(tmp_path / "nbd.sock", content()) as fake,
        mounted(tmp_path) as m,
        _compiled(fake, m, zeros=zeros) as (disk, _, failures, _),
    ):
        inside = [(MiB, MiB), (MiB + 4096, 512), (3 * MiB, 4096)]
        across = [(MiB - 4096, 8192), (2 * MiB - 512, 1024), (3 * MiB, 4097)]
        for ranges, reads, declined in ((inside, 0, 3), (across, 3, 3)):
            got = _read_all(m, ranges)
            assert got == [fake.data[o : o + n] for o, n in ranges]
            assert (disk.counters["reads"], disk.counters["declined"]) == (reads, declined)
        assert not failures
    # Zero ranges are checked as the readable ones are.
    from snapfs import _fastpath

    bad = Regions.from_extents([(MiB, 4096)]).arrays()
    with pytest.raises(ValueError, match="zero ranges are not sorted"):
        _fastpath.Disk(INO_DISK, MiB, 0, 0, *Regions.whole(MiB).arrays(), 4096, *bad)


@pytest.mark.mount
def test_compiled_reads_refused_by_the_server_go_to_python(tmp_path: Path) -> None:
    """An error reply hands that READ to Python (which reports the server's error); the READs
    in flight beside it get their bytes from the compiled path."""
    bad = (MiB, 4096)
    with (
        FakeNBD(tmp_path / "nbd.sock", content(), shuffle=True, fail=[bad]) as fake,
        mounted(tmp_path) as m,
        _compiled(fake, m) as (disk, _, failures, _),
    ):
        ranges = [(i * 65536, 65536) for i in range(40)]
        got = _read_all(m, ranges)
        for (o, n), data in zip(ranges, got, strict=True):
            if o < bad[0] + bad[1] and bad[0] < o + n:
                assert data == errno.EIO
            else:
                assert data == fake.data[o : o + n], o
        assert disk.counters["errors"] == 1
        assert disk.alive
        assert len(failures) == 1


@pytest.mark.mount
def test_a_broken_compiled_connection_hands_its_reads_to_python(tmp_path: Path) -> None:
    """A server that breaks the protocol ends the compiled path of that disk: the READs in
    flight there, and every later one, are answered by Python (with the right bytes)."""
    with (
        FakeNBD(tmp_path / "nbd.sock", content(), break_after=5) as fake,
        mounted(tmp_path) as m,
        _compiled(fake, m) as (disk, _, _, _),
    ):
        ranges = _ranges(2, 60)
        got = _read_all(m, ranges)
        assert not disk.alive
        for (o, n), data in zip(ranges, got, strict=True):
            # Python's connection may break as well (the count is the server's): then the
            # READ fails, it never gets other bytes.
            assert data == fake.data[o : o + n] or isinstance(data, int), (o, n)
        assert disk.counters["declined"] > 0


class _CountingTaker:
    """A compiled intake's Taker, and how often it was called."""

    def __init__(self, inner: fastpath.CompiledIntake) -> None:
        self.inner = inner
        self.calls = 0

    def take(
        self, limit: int, wake: tuple[int, ...], idle: bool = False, /
    ) -> tuple[int, list[bytes], int]:
        self.calls += 1
        return self.inner.take(limit, wake, idle)

    def close(self) -> None:
        self.inner.close()


@pytest.mark.mount
def test_the_compiled_path_waits_for_the_next_request_and_wakes_for_other_work(
    tmp_path: Path,
) -> None:
    """With no READ in flight the compiled path waits for the next request itself instead of
    returning to Python, which a reader taking turns with the server would make it do after
    every READ; and it leaves that wait at once for work the trio thread gives the reader."""
    reads = 100
    with (
        FakeNBD(tmp_path / "nbd.sock", content()) as fake,
        mounted(tmp_path) as m,
        _compiled(fake, m) as (disk, intake, failures, reader),
    ):
        assert m.token is not None
        assert intake.compiled is not None
        counting = _CountingTaker(cast(fastpath.CompiledIntake, intake.compiled))
        fd = os.open(m.path / "disk.raw", os.O_RDONLY | os.O_DIRECT)
        try:
            with mmap.mmap(-1, 4096) as buf:
                assert os.preadv(fd, [buf], 0) == 4096
                intake.compiled = counting  # between two calls: one READ at a time here
                for i in range(reads):
                    o = (i * 40 + 4) * KiB  # apart, inside DISK_SIZE
                    assert os.preadv(fd, [buf], o) == 4096
                    assert buf[:] == fake.data[o : o + 4096], o
                assert counting.calls < reads // 10, f"{counting.calls} calls for {reads} READs"

                # The last READ answered, the compiled path waits for the next request: a job
                # from the trio thread must not wait for it.
                async def a_job_from_the_trio_thread() -> None:
                    done = trio.Event()

                    def finished(err: NBDError | None) -> None:
                        assert err is None
                        done.set()

                    reader.submit(ReadReply(1 << 60), MiB, 4096, (), finished, tell_success=True)
                    with trio.fail_after(10):
                        await done.wait()

                trio.from_thread.run(a_job_from_the_trio_thread, trio_token=m.token)
                assert os.preadv(fd, [buf], 2 * MiB) == 4096
                assert buf[:] == fake.data[2 * MiB : 2 * MiB + 4096]
                # All of them answered there (its count follows each answer).
                wait_for(lambda: disk.counters["reads"] == reads + 2, "the compiled count")
                assert disk.counters["declined"] == 0
        finally:
            os.close(fd)
        assert not failures
