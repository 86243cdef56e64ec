"""The FUSE boundary: serves a ``Tree`` through the ``Operations`` protocol.

This is the only place where domain errors become errno values (``TreeError.errno``). Disk
reads go into buffers from a small pool and are handed to the FUSE layer without a copy; the
buffer returns to the pool once the reply is written.

A disk whose source can answer READs itself (``DirectSource``: the splice data path of
``snapfs.datapath``) is read through ``start_read``: after the tree's checks, the source gets the
request's ``unique`` and replies without handing bytes back; only a failure comes back, and a
source that cannot go on sends the read back to ``read``.

Sequential reads of a disk file are read ahead by one request (see ``ReadAhead``; two for a
direct source): a reader that issues one read at a time (``dd iflag=direct``, ``cp``) then
overlaps the NBD round trip of its next request with the FUSE reply of the current one. A
direct source is only told which ranges to read ahead; it keeps the bytes itself.

Concurrency rule: everything runs on the trio thread; ``read``/``fallocate`` may be in flight
several at a time, which the tree allows (see ``tree.py``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Protocol

import trio

from snapfs.fuse.ops import (
    Attr,
    DirEntry,
    FuseErrno,
    OpenReply,
    ReadDone,
    ReadResult,
    StatFs,
)
from snapfs.tree import Disk, Tree, TreeError

log = logging.getLogger(__name__)

MAX_READ = 1 << 20
#: Reads at least this large that continue the previous read of the same file start a read-ahead.
READ_AHEAD_MIN = 128 * 1024
#: Requests read ahead for a direct source: two keep QEMU busy while a reply goes out.
DIRECT_READ_AHEAD = 2


@contextlib.contextmanager
def _errno() -> Iterator[None]:
    try:
        yield
    except TreeError as err:
        raise FuseErrno(err.errno, str(err)) from err


class DirectSource(Protocol):
    """A disk source that can answer a READ request itself."""

    def can_read_direct(self) -> bool:
        """Whether ``start_read_direct`` may be tried now."""
        ...

    def start_read_direct(
        self,
        unique: int,
        offset: int,
        length: int,
        ahead: Sequence[tuple[int, int]],
        done: ReadDone,
    ) -> None:
        """Answer READ ``unique`` with ``length`` bytes at ``offset`` (checked by the tree),
        and read the ranges ``ahead`` ahead. If it cannot, ``done(ReadPlain())`` (read it the
        plain way) or ``done(SourceError)`` on the trio thread; success is not reported."""
        ...


class BufferPool:
    """Reusable read buffers of ``size`` bytes; at most ``keep`` are kept when idle."""

    def __init__(self, size: int = MAX_READ, keep: int = 64) -> None:
        self.size = size
        self.keep = keep
        self._free: list[bytearray] = []

    def get(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self.size)

    def put(self, buf: bytearray) -> None:
        if len(self._free) < self.keep:
            self._free.append(buf)


class _Ahead:
    """One read-ahead in flight or done: ``length`` bytes at ``offset`` of inode ``ino``.

    Ownership of ``buf``: the read-ahead task until ``done`` is set; then whoever claims it (a
    matching read) or, if it was dropped, the pool. ``error`` is set if the read failed.
    """

    __slots__ = ("buf", "done", "dropped", "error", "ino", "length", "offset")

    def __init__(self, ino: int, offset: int, length: int, buf: bytearray) -> None:
        self.ino = ino
        self.offset = offset
        self.length = length
        self.buf = buf
        self.done = trio.Event()
        self.dropped = False
        self.error: BaseException | None = None


class ReadAhead:
    """At most one read-ahead per disk inode, started when a read continues the previous one.

    Only bytes of the readable set are read ahead, and a read-ahead is used only by a read that
    passed the tree's checks at its own time: a range punched meanwhile is refused as it would
    be without read-ahead (punching only ever shrinks the readable set, and the snapshot's bytes
    never change, so data read before a check that still passes is the snapshot's data).

    Read-ahead tasks run in the session's nursery (a system task without one, as in model
    tests): they never raise, and end with the session. Concurrency rule: the trio thread only.
    """

    def __init__(self, pool: BufferPool, nursery: trio.Nursery | None = None) -> None:
        self.pool = pool
        self.nursery = nursery
        self._ahead: dict[int, _Ahead] = {}
        self._next: dict[int, int] = {}  # ino -> where its last read ended
        self.hits = 0
        self.misses = 0

    def follow(
        self, ino: int, disk: Disk, offset: int, length: int, depth: int = 1
    ) -> list[tuple[int, int]]:
        """Note a read of ``length`` (> 0, checked by the tree) bytes at ``offset``; return up
        to ``depth`` ranges of that length that follow it, to read ahead: none unless the
        read continues the previous one and is large enough, and only while they are
        readable now."""
        sequential = self._next.get(ino) == offset
        self._next[ino] = offset + length
        ranges: list[tuple[int, int]] = []
        if not sequential or length < READ_AHEAD_MIN:
            return ranges
        start = offset + length
        for _ in range(depth):
            ahead = min(length, disk.size - start)
            if ahead <= 0 or not disk.readable.contains(start, ahead):
                break
            ranges.append((start, ahead))
            start += ahead
        return ranges

    async def read(self, ino: int, disk: Disk, offset: int, length: int) -> bytearray:
        """The ``length`` (> 0, checked by the tree) bytes at ``offset``, in a pool buffer that
        the caller must give back; starts the next read-ahead if the access is sequential."""
        next_ranges = self.follow(ino, disk, offset, length)
        buf = None
        ahead = self._ahead.pop(ino, None)
        if ahead is not None:
            if ahead.offset == offset and ahead.length == length:
                try:
                    await ahead.done.wait()
                except BaseException:
                    self._drop(ahead)
                    raise
                if ahead.error is None:
                    buf = ahead.buf
                    self.hits += 1
                else:
                    self.pool.put(ahead.buf)
            else:
                self._drop(ahead)
                self.misses += 1
        if next_ranges:
            self._start(ino, disk, *next_ranges[0])
        if buf is None:
            buf = self.pool.get()
            try:
                await disk.source.read_into(buf, offset, length)
            except BaseException:
                self.pool.put(buf)
                raise
        return buf

    def _start(self, ino: int, disk: Disk, offset: int, length: int) -> None:
        ahead = _Ahead(ino, offset, length, self.pool.get())
        self._ahead[ino] = ahead
        if self.nursery is not None:
            self.nursery.start_soon(self._run, ahead, disk, name="snapfs-read-ahead")
        else:
            trio.lowlevel.spawn_system_task(self._run, ahead, disk, name="snapfs-read-ahead")

    async def _run(self, ahead: _Ahead, disk: Disk) -> None:
        try:
            await disk.source.read_into(ahead.buf, ahead.offset, ahead.length)
        except Exception as err:  # the read proper retries and reports it
            ahead.error = err
        except BaseException as err:  # cancelled with the run: nobody waits any more
            ahead.error = err
            raise
        finally:
            ahead.done.set()
            if ahead.dropped:
                self.pool.put(ahead.buf)

    def _drop(self, ahead: _Ahead) -> None:
        if ahead.done.is_set():
            self.pool.put(ahead.buf)
        else:
            ahead.dropped = True

    def forget(self, ino: int) -> None:
        """Drop the read-ahead of ``ino`` and its sequential streak (its file was released)."""
        ahead = self._ahead.pop(ino, None)
        if ahead is not None:
            self._drop(ahead)
        self._next.pop(ino, None)


class TreeOperations:
    """``Operations`` for a snapfs ``Tree``. ``on_destroy`` runs when the kernel lets go."""

    def __init__(
        self, tree: Tree, on_destroy: object = None, nursery: trio.Nursery | None = None
    ) -> None:
        self.tree = tree
        self.pool = BufferPool()
        self.read_ahead = ReadAhead(self.pool, nursery)
        self._on_destroy = on_destroy
        self.destroyed = False

    def _attr(self, ino: int) -> Attr:
        a = self.tree.getattr(ino)
        return Attr(
            ino=a.ino,
            mode=a.mode,
            size=a.size,
            blocks=a.blocks,
            mtime_ns=self.tree.mtime_ns,
            blksize=a.blksize,
            nlink=2 if ino == 1 else 1,
        )

    def lookup(self, parent: int, name: bytes) -> Attr:
        with _errno():
            return self._attr(self.tree.lookup(parent, os.fsdecode(name)).ino)

    def forget(self, ino: int, nlookup: int) -> None:
        # Inodes are fixed for the life of the mount: nothing to free.
        pass

    def getattr(self, ino: int) -> Attr:
        with _errno():
            return self._attr(ino)

    def setattr(self, ino: int, size: int | None) -> Attr:
        with _errno():
            attr = self._attr(ino)
        if size is not None and size != attr.size:
            raise FuseErrno(errno.EROFS, "the snapshot cannot change size")
        return attr

    def readdir(self, ino: int) -> Sequence[DirEntry]:
        if ino != 1:
            raise FuseErrno(errno.ENOTDIR)
        with _errno():
            return [DirEntry(e.ino, os.fsencode(e.name), e.mode) for e in self.tree.listdir()]

    def open(self, ino: int, flags: int) -> OpenReply:
        with _errno():
            self.tree.open(
                ino,
                writable=(flags & os.O_ACCMODE) != os.O_RDONLY,
                truncate=bool(flags & os.O_TRUNC),
            )
        # Direct I/O for every file: disk reads must never be widened by readahead (bytes
        # outside the readable set fail), and snapfs.json changes as the session goes on.
        return OpenReply(fh=0, direct_io=True)

    def release(self, ino: int, fh: int) -> None:
        # Frees the read-ahead buffer of a file nobody reads any more; should another handle
        # still read it, that only costs one request without read-ahead.
        self.read_ahead.forget(ino)

    def start_read(
        self, ino: int, fh: int, offset: int, size: int, unique: int, done: ReadDone
    ) -> bool:
        """Hand a disk READ to its direct source (after the tree's checks, as ``read``)."""
        tree = self.tree
        if size > self.pool.size or not tree.is_disk(ino):
            return False
        with _errno():
            disk, length = tree.disk_read_length(ino, offset, size)
        source = disk.source
        can_read_direct = getattr(source, "can_read_direct", None)
        if not length or can_read_direct is None or not can_read_direct():
            return False
        direct: DirectSource = source  # type: ignore[assignment]
        # Counted now: a read that goes well is not reported back.
        disk.bytes_read += length

        def failed(outcome: Exception) -> None:
            disk.bytes_read -= length
            if isinstance(outcome, TreeError):
                outcome = FuseErrno(outcome.errno, str(outcome))
            done(outcome)

        ahead = self.read_ahead.follow(ino, disk, offset, length, DIRECT_READ_AHEAD)
        direct.start_read_direct(unique, offset, length, ahead, failed)
        return True

    async def read(self, ino: int, fh: int, offset: int, size: int) -> ReadResult:
        tree = self.tree
        if not tree.is_disk(ino):
            with _errno():
                return ReadResult(tree.read_text(ino, offset, size))
        if size > self.pool.size:
            raise FuseErrno(errno.EINVAL, "read larger than the negotiated maximum")
        with _errno():
            # The tree's checks, at the time of this read (see ReadAhead for why that matters).
            disk, length = tree.disk_read_length(ino, offset, size)
            if not length:
                return ReadResult(b"")
            buf = await self.read_ahead.read(ino, disk, offset, length)
        disk.bytes_read += length
        return ReadResult(memoryview(buf)[:length], release=lambda: self.pool.put(buf))

    def write(self, ino: int, fh: int, offset: int, data: bytes) -> int:
        raise FuseErrno(errno.EROFS, "snapfs is read-only")

    async def fallocate(self, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
        # The read-ahead is kept: a read of a punched range fails the tree's check before it
        # could use one, and `snapfs copy --discard` punches right behind a sequential read.
        with _errno():
            await self.tree.punch(ino, offset, length, mode)

    async def lseek(self, ino: int, fh: int, offset: int, whence: int) -> int:
        with _errno():
            return self.tree.lseek(ino, offset, whence)

    def statfs(self) -> StatFs:
        total = sum(d.size for d in self.tree.disks) // 4096
        return StatFs(blocks=total, files=len(self.tree.listdir()) + 1)

    def destroy(self) -> None:
        self.destroyed = True
        if callable(self._on_destroy):
            self._on_destroy()
