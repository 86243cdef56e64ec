"""Real FUSE mounts of a small in-memory ``Operations``, exercised with plain system calls.

The server runs ``trio.run`` in a background thread; the test thread (or a subprocess) is the
client, since the kernel calls back into the server while a client call is blocked. ``mounted``
unmounts in ``finally`` (lazily if a plain unmount fails) so no mount outlives a test.
"""

from __future__ import annotations

import errno
import functools
import logging
import mmap
import os
import select
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from snapfs.errors import FuseError
from snapfs.fuse import kernel
from snapfs.fuse.ops import (
    ROOT_INODE,
    Attr,
    DirEntry,
    FuseErrno,
    OpenReply,
    StatFs,
)
from snapfs.fuse.reply import ReadReply
from snapfs.fuse.server import FuseServer, Intake

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting FUSE needs root"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]

MiB = 1 << 20
DISK_SIZE = 4 * MiB + 12345
HOLEY_SIZE = 1 * MiB
HOLE = (256 * 1024, 512 * 1024)  # [start, end) of the region whose reads fail with ENODATA
PUNCH_HOLE_KEEP_SIZE = 3  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
POLL_TIMEOUT = 10.0

INO_DISK, INO_HOLEY, INO_BOOM, INO_SLOW = 2, 3, 4, 5


def _pattern(size: int) -> bytes:
    # Different bytes at every offset modulo a prime, so a misplaced read shows.
    block = bytes((i * 7 + i // 251) & 0xFF for i in range(65521))
    return (block * (size // len(block) + 1))[:size]


def wait_for(cond: Callable[[], bool], what: str, timeout: float = POLL_TIMEOUT) -> None:
    """Poll ``cond`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


@dataclass
class MemOps:
    """A tiny file system: a 4 MiB "disk", a 1 MiB "holey" file with a region that reads
    ENODATA, a "boom" file whose reads raise a bug, and a "slow" file whose reads never end
    (until interrupted). Writes are refused with EROFS. Calls are recorded for assertions."""

    disk: bytes = field(default_factory=lambda: _pattern(DISK_SIZE))
    fallocates: list[tuple[int, int, int, int]] = field(default_factory=list)
    lseeks: list[tuple[int, int, int]] = field(default_factory=list)
    lookups: dict[int, int] = field(default_factory=dict)
    destroyed: threading.Event = field(default_factory=threading.Event)
    slow_started: threading.Event = field(default_factory=threading.Event)
    slow_cancelled: threading.Event = field(default_factory=threading.Event)
    answered: int = 0
    reads_in_flight: int = 0
    max_reads_in_flight: int = 0
    max_read_size: int = 0
    gate: int = 0  # reads of "disk" wait (bounded) until this many are in flight at once
    gate_open: trio.Event = field(default_factory=trio.Event)

    def __post_init__(self) -> None:
        self.files = {
            b"disk.raw": Attr(INO_DISK, stat.S_IFREG | 0o444, DISK_SIZE, 8000, blksize=MiB),
            b"holey.raw": Attr(INO_HOLEY, stat.S_IFREG | 0o444, HOLEY_SIZE, 1536),
            b"boom": Attr(INO_BOOM, stat.S_IFREG | 0o444, 4096, 8),
            b"slow": Attr(INO_SLOW, stat.S_IFREG | 0o444, 4096, 8),
        }
        self.by_ino = {a.ino: a for a in self.files.values()}
        self.root = Attr(ROOT_INODE, stat.S_IFDIR | 0o755, nlink=2)

    def lookup(self, parent: int, name: bytes) -> Attr:
        if parent != ROOT_INODE or name not in self.files:
            raise FuseErrno(errno.ENOENT)
        attr = self.files[name]
        self.lookups[attr.ino] = self.lookups.get(attr.ino, 0) + 1
        return attr

    def forget(self, ino: int, nlookup: int) -> None:
        self.lookups[ino] -= nlookup

    def getattr(self, ino: int) -> Attr:
        if ino == ROOT_INODE:
            return self.root
        return self.by_ino[ino]

    def setattr(self, ino: int, size: int | None) -> Attr:
        raise FuseErrno(errno.EROFS)

    def readdir(self, ino: int) -> Sequence[DirEntry]:
        return [DirEntry(a.ino, name, a.mode) for name, a in self.files.items()]

    def open(self, ino: int, flags: int) -> OpenReply:
        return OpenReply(fh=ino * 10)

    def release(self, ino: int, fh: int) -> None:
        assert fh == ino * 10

    def read(self, ino: int, fh: int, offset: int, size: int, reply: ReadReply) -> None:
        if ino == INO_HOLEY:
            if offset < HOLE[1] and offset + size > HOLE[0]:
                raise FuseErrno(errno.ENODATA)
            reply.data(bytes(min(size, max(0, HOLEY_SIZE - offset))))
            return
        reply.later(functools.partial(self._read, ino, offset, size, reply))

    async def _read(self, ino: int, offset: int, size: int, reply: ReadReply) -> None:
        if ino == INO_BOOM:
            raise RuntimeError("a bug in ops.read")
        if ino == INO_SLOW:
            self.slow_started.set()
            try:
                await trio.sleep_forever()
            finally:
                self.slow_cancelled.set()
        self.max_read_size = max(self.max_read_size, size)
        self.reads_in_flight += 1
        self.max_reads_in_flight = max(self.max_reads_in_flight, self.reads_in_flight)
        try:
            if self.max_reads_in_flight >= self.gate:
                self.gate_open.set()
            # Bounded: the test wants overlap, but must not hang if the kernel serialized.
            with trio.move_on_after(2):
                await self.gate_open.wait()
            await trio.lowlevel.checkpoint()
        finally:
            self.reads_in_flight -= 1
        reply.data(memoryview(self.disk)[offset : offset + size])
        self.answered += 1

    def write(self, ino: int, fh: int, offset: int, data: bytes) -> int:
        raise FuseErrno(errno.EROFS)

    async def fallocate(self, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        self.fallocates.append((ino, offset, length, mode))

    async def lseek(self, ino: int, fh: int, offset: int, whence: int) -> int:
        self.lseeks.append((ino, offset, whence))
        if whence == os.SEEK_DATA:
            return HOLE[1] if HOLE[0] <= offset < HOLE[1] else offset
        if whence == os.SEEK_HOLE:
            return HOLE[0] if offset < HOLE[0] else HOLEY_SIZE
        raise FuseErrno(errno.EINVAL)

    def statfs(self) -> StatFs:
        return StatFs(blocks=1000, bfree=10, bavail=10, files=5)

    def destroy(self) -> None:
        self.destroyed.set()


@dataclass
class Mount:
    path: Path
    ops: MemOps
    server: FuseServer
    thread: threading.Thread
    errors: list[BaseException]
    token: trio.lowlevel.TrioToken | None = None
    cancel_scope: trio.CancelScope | None = None
    nursery: trio.Nursery | None = None  # the server's, for tasks a test adds

    def wait_stopped(self) -> None:
        self.thread.join(POLL_TIMEOUT)
        assert not self.thread.is_alive(), "serve() did not return"


@contextmanager
def mounted(tmp_path: Path, ops: MemOps | None = None) -> Iterator[Mount]:
    """Serve ``ops`` at ``tmp_path/mnt`` from a background thread; always unmounted after."""
    ops = ops or MemOps()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    server = FuseServer(ops, mnt, name="test")
    started = threading.Event()
    errors: list[BaseException] = []

    async def main() -> None:
        m.token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            m.cancel_scope = nursery.cancel_scope
            m.nursery = nursery
            await nursery.start(server.serve)
            started.set()

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=run, name="fuse-server", daemon=True)
    m = Mount(mnt, ops, server, thread, errors)
    thread.start()
    try:
        wait_for(lambda: started.is_set() or not thread.is_alive(), "the server to start")
        if errors:
            raise errors[0]
        yield m
    finally:
        if os.path.ismount(mnt):
            try:
                kernel.unmount(mnt)
            except FuseError:
                kernel.unmount(mnt, lazy=True)
        thread.join(POLL_TIMEOUT)


def test_readdir_and_mount_listing(tmp_path: Path) -> None:
    with mounted(tmp_path) as m:
        assert sorted(os.listdir(m.path)) == ["boom", "disk.raw", "holey.raw", "slow"]
        kinds = {e.name: e.is_file() for e in os.scandir(m.path)}
        assert all(kinds.values())
        with open("/proc/self/mounts") as f:
            line = next(ln for ln in f if f" {m.path} " in ln)
        assert line.startswith(f"snapfs:test {m.path} fuse.snapfs ")
        assert "nosuid" in line
        assert "nodev" in line


def test_stat(tmp_path: Path) -> None:
    with mounted(tmp_path) as m:
        st = os.stat(m.path / "disk.raw")
        assert st.st_size == DISK_SIZE
        assert st.st_blocks == 8000
        assert st.st_blksize == MiB
        assert stat.S_ISREG(st.st_mode)
        assert stat.S_ISDIR(os.stat(m.path).st_mode)
        with pytest.raises(FileNotFoundError):
            os.stat(m.path / "nope")
        vfs = os.statvfs(m.path)
        assert (vfs.f_blocks, vfs.f_bfree, vfs.f_files) == (1000, 10, 5)


def test_open_and_write_erofs(tmp_path: Path) -> None:
    with mounted(tmp_path) as m:
        os.close(os.open(m.path / "disk.raw", os.O_RDONLY))
        fd = os.open(m.path / "disk.raw", os.O_RDWR)
        try:
            with pytest.raises(OSError, match="Read-only") as info:
                os.pwrite(fd, b"x", 0)
            assert info.value.errno == errno.EROFS
        finally:
            os.close(fd)


def test_read_content(tmp_path: Path) -> None:
    with mounted(tmp_path) as m:
        path = m.path / "disk.raw"
        expected = m.ops.disk
        assert path.read_bytes() == expected
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(fd, MiB, MiB) == expected[MiB : 2 * MiB]
            assert os.pread(fd, MiB, 3 * MiB + 5) == expected[3 * MiB + 5 : 4 * MiB + 5]
            assert os.pread(fd, MiB, DISK_SIZE - 10) == expected[-10:]
            assert os.pread(fd, 100, DISK_SIZE) == b""
        finally:
            os.close(fd)
        wait_for(lambda: m.ops.answered > 0, "reads answered from a task")


def test_dd_direct(tmp_path: Path) -> None:
    with mounted(tmp_path) as m:
        out = tmp_path / "copy"
        subprocess.run(
            ["dd", f"if={m.path / 'disk.raw'}", f"of={out}", "bs=1M", "iflag=direct",
             "status=none"],
            check=True,
        )  # fmt: skip
        assert out.read_bytes() == m.ops.disk
        assert m.ops.max_read_size == MiB  # max_pages=256: one request per 1 MiB read


def test_read_hole_gives_enodata(tmp_path: Path) -> None:
    with mounted(tmp_path) as m:
        fd = os.open(m.path / "holey.raw", os.O_RDONLY)
        try:
            assert os.pread(fd, 4096, 0) == bytes(4096)
            with pytest.raises(OSError, match="No data available") as info:
                os.pread(fd, 4096, HOLE[0] + 8192)
            assert info.value.errno == errno.ENODATA
            assert os.pread(fd, 4096, HOLE[1]) == bytes(4096)
        finally:
            os.close(fd)


def test_lseek_data_hole(tmp_path: Path) -> None:
    with mounted(tmp_path) as m:
        fd = os.open(m.path / "holey.raw", os.O_RDONLY)
        try:
            assert os.lseek(fd, 4096, os.SEEK_DATA) == 4096
            assert os.lseek(fd, 4096, os.SEEK_HOLE) == HOLE[0]
            assert os.lseek(fd, HOLE[0] + 1, os.SEEK_DATA) == HOLE[1]
            assert os.lseek(fd, HOLE[1], os.SEEK_HOLE) == HOLEY_SIZE
        finally:
            os.close(fd)
        assert (INO_HOLEY, HOLE[0] + 1, os.SEEK_DATA) in m.ops.lseeks


def test_fallocate_punch(tmp_path: Path) -> None:
    with mounted(tmp_path) as m:
        path = m.path / "disk.raw"
        subprocess.run(["fallocate", "-p", "-o", "65536", "-l", "131072", str(path)], check=True)
        assert m.ops.fallocates == [(INO_DISK, 65536, 131072, PUNCH_HOLE_KEEP_SIZE)]


def test_concurrent_reads(tmp_path: Path) -> None:
    ops = MemOps(gate=4)
    with mounted(tmp_path, ops) as m:
        path = m.path / "disk.raw"
        expected = ops.disk

        def read_at(offset: int) -> bool:
            fd = os.open(path, os.O_RDONLY)
            try:
                return os.pread(fd, 256 * 1024, offset) == expected[offset : offset + 256 * 1024]
            finally:
                os.close(fd)

        offsets = [i * 256 * 1024 for i in range(16)]
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(read_at, offsets))
        assert ops.max_reads_in_flight >= 2


def test_exception_in_ops_gives_eio_and_keeps_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with mounted(tmp_path) as m, caplog.at_level(logging.ERROR, "snapfs.fuse.server"):
        fd = os.open(m.path / "boom", os.O_RDONLY)
        try:
            with pytest.raises(OSError, match="Input/output error") as info:
                os.pread(fd, 4096, 0)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert (m.path / "disk.raw").read_bytes()[:10] == m.ops.disk[:10]
        assert any("a bug in ops.read" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("intake", [False, True], ids=["trio", "intake"])
def test_interrupt_cancels_read(tmp_path: Path, intake: bool) -> None:
    """Also when an intake reads the INTERRUPT and hands it to the trio thread, whose task
    runs the READ."""
    with ExitStack() as stack:
        m = stack.enter_context(mounted(tmp_path))
        if intake:
            stack.enter_context(reading(m, _disk_reads_here(m.ops, [])))
        code = f"import os; os.read(os.open({str(m.path / 'slow')!r}, os.O_RDONLY), 4096)"
        proc = subprocess.Popen([sys.executable, "-c", code])
        try:
            wait_for(m.ops.slow_started.is_set, "the slow read to reach ops")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(POLL_TIMEOUT) == -signal.SIGTERM
            wait_for(m.ops.slow_cancelled.is_set, "the slow read to be cancelled")
        finally:
            with suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        # Still serving after the interrupt.
        assert os.stat(m.path / "disk.raw").st_size == DISK_SIZE


def test_umount_ends_serve_and_calls_destroy(tmp_path: Path) -> None:
    with mounted(tmp_path) as m:
        subprocess.run(["umount", str(m.path)], check=True)
        m.wait_stopped()
        assert m.ops.destroyed.is_set()
        assert not m.errors
        assert not os.path.ismount(m.path)


def test_unmount_from_inside(tmp_path: Path) -> None:
    with mounted(tmp_path) as m:
        fd = os.open(m.path / "disk.raw", os.O_RDONLY)
        try:
            with pytest.raises(FuseError, match="busy"):
                trio.from_thread.run(m.server.unmount, trio_token=m.token)
        finally:
            os.close(fd)
        trio.from_thread.run(m.server.unmount, trio_token=m.token)
        m.wait_stopped()
        assert m.ops.destroyed.is_set()
        assert not m.errors


def test_cancelled_serve_unmounts(tmp_path: Path) -> None:
    with mounted(tmp_path) as m:
        assert m.cancel_scope is not None
        trio.from_thread.run_sync(m.cancel_scope.cancel, trio_token=m.token)
        m.wait_stopped()
        assert m.ops.destroyed.is_set()
        assert not m.errors
        assert not os.path.ismount(m.path)


def test_mount_errors(tmp_path: Path) -> None:
    ops = MemOps()
    with pytest.raises(FuseError, match="does not exist"):
        trio.run(FuseServer(ops, tmp_path / "missing").serve)
    assert ops.destroyed.is_set()
    (tmp_path / "file").touch()
    with pytest.raises(FuseError, match="not a directory"):
        trio.run(FuseServer(MemOps(), tmp_path / "file").serve)


# --- an intake: another thread reads the requests ------------------------------------------------


@dataclass
class Reader:
    """A thread of the test that reads a server's requests through an ``Intake``."""

    intake: Intake
    thread: threading.Thread
    stop_fd: int
    ended: threading.Event
    thread_ids: set[int] = field(default_factory=set)

    def stop(self) -> None:
        os.eventfd_write(self.stop_fd, 1)
        self.thread.join(POLL_TIMEOUT)
        assert not self.thread.is_alive(), "the intake's thread did not stop"


@contextmanager
def reading(m: Mount, read: Callable[[ReadReply, int, int, int, int], bool]) -> Iterator[Reader]:
    """Let a thread of the test read ``m``'s requests (answering READs with ``read``) until the
    block ends, the connection ends, or ``Reader.stop``; the thread is always stopped after."""
    intake = trio.from_thread.run_sync(m.server.intake, read, trio_token=m.token)
    stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
    ended = threading.Event()

    def run() -> None:
        poll = select.poll()
        poll.register(intake.fileno, select.POLLIN)
        poll.register(stop_fd, select.POLLIN)
        try:
            while True:
                ready = {fd for fd, _ in poll.poll()}
                if stop_fd in ready:
                    return
                r.thread_ids.add(threading.get_ident())
                if not intake.read_some(16):
                    ended.set()
                    return
        finally:
            intake.stop()

    r = Reader(intake, threading.Thread(target=run, name="intake", daemon=True), stop_fd, ended)
    trio.from_thread.run_sync(intake.start, trio_token=m.token)
    r.thread.start()
    try:
        yield r
    finally:
        if r.thread.is_alive():
            r.stop()
        os.close(stop_fd)


def _disk_reads_here(ops: MemOps, seen: list[int]) -> Callable[..., bool]:
    """READs of disk.raw answered in the intake's thread (a range past 3 MiB fails with
    ENODATA there); every other READ is left to the trio thread."""

    def read(reply: ReadReply, ino: int, fh: int, offset: int, size: int) -> bool:
        if ino != INO_DISK:
            return False
        if offset + size > 3 * MiB and offset < 3 * MiB + 4096:
            raise FuseErrno(errno.ENODATA)
        seen.append(threading.get_ident())
        reply.data(ops.disk[offset : offset + size])
        return True

    return read


def _pread(path: Path, size: int, offset: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, size)
        with buf:
            n = os.preadv(fd, [buf], offset)
            return buf[:n]
    finally:
        os.close(fd)


def test_an_intake_answers_reads_in_its_thread_and_hands_on_the_rest(tmp_path: Path) -> None:
    ops = MemOps()
    seen: list[int] = []
    with mounted(tmp_path, ops) as m, reading(m, _disk_reads_here(ops, seen)) as r:
        disk = m.path / "disk.raw"
        assert _pread(disk, MiB, MiB) == ops.disk[MiB : 2 * MiB]
        assert seen
        assert set(seen) == r.thread_ids  # answered in the intake's thread
        # Handed to the trio thread: names, attributes, listings, READs the intake declines
        # (answered at once, and in a task), async requests with the caller's uid.
        assert sorted(os.listdir(m.path)) == ["boom", "disk.raw", "holey.raw", "slow"]
        assert os.stat(disk).st_size == DISK_SIZE
        with pytest.raises(OSError, match="No data available") as info:
            _pread(m.path / "holey.raw", 4096, HOLE[0])
        assert info.value.errno == errno.ENODATA
        assert _pread(m.path / "holey.raw", 4096, 0) == bytes(4096)
        # (No descriptor of the mount is open across the fork: the child would close it, and
        # its FLUSH would wait for this process's server behind the fork.)
        subprocess.run(["fallocate", "-p", "-o", "4096", "-l", "4096", str(disk)], check=True)
        fd = os.open(disk, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == 0
        finally:
            os.close(fd)
        assert ops.fallocates == [(INO_DISK, 4096, 4096, PUNCH_HOLE_KEEP_SIZE)]
        # A FuseErrno raised in the intake's thread is answered with its errno.
        with pytest.raises(OSError, match="No data available") as info:
            _pread(disk, 8192, 3 * MiB - 4096)
        assert info.value.errno == errno.ENODATA
        assert r.intake.reads == len(seen)
        # Given back: the trio thread reads again (the declined path serves disk.raw too).
        r.stop()
        before = len(seen)
        assert _pread(disk, MiB, 0) == ops.disk[:MiB]
        assert len(seen) == before
        assert ops.answered >= 1


def test_umount_while_an_intake_reads_ends_serve(tmp_path: Path) -> None:
    with mounted(tmp_path) as m, reading(m, _disk_reads_here(m.ops, [])) as r:
        assert _pread(m.path / "disk.raw", 4096, 0) == m.ops.disk[:4096]
        subprocess.run(["umount", str(m.path)], check=True)
        m.wait_stopped()
        wait_for(lambda: not r.thread.is_alive(), "the intake's thread to end")
        assert m.ops.destroyed.is_set()
        assert not m.errors
        assert not os.path.ismount(m.path)


def test_a_server_takes_one_intake_at_a_time(tmp_path: Path) -> None:
    with mounted(tmp_path) as m, reading(m, _disk_reads_here(m.ops, [])):
        other = trio.from_thread.run_sync(
            m.server.intake, _disk_reads_here(m.ops, []), trio_token=m.token
        )
        try:
            with pytest.raises(FuseError, match="read elsewhere"):
                trio.from_thread.run_sync(other.start, trio_token=m.token)
        finally:
            other.stop()
        assert os.stat(m.path / "disk.raw").st_size == DISK_SIZE
