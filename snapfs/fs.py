"""The FUSE boundary: serves a ``Tree`` through the ``Operations`` protocol.

This is the only place where domain errors become errno values (``TreeError.errno``). Disk
reads go into buffers from a small pool and are handed to the FUSE layer without a copy; the
buffer returns to the pool once the reply is written.

Concurrency rule: everything runs on the trio thread; ``read``/``fallocate`` may be in flight
several at a time, which the tree allows (see ``tree.py``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator, Sequence

from snapfs.fuse.ops import Attr, DirEntry, FuseErrno, OpenReply, ReadResult, StatFs
from snapfs.tree import Tree, TreeError

log = logging.getLogger(__name__)

MAX_READ = 1 << 20


@contextlib.contextmanager
def _errno() -> Iterator[None]:
    try:
        yield
    except TreeError as err:
        raise FuseErrno(err.errno, str(err)) from err


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


class TreeOperations:
    """``Operations`` for a snapfs ``Tree``. ``on_destroy`` runs when the kernel lets go."""

    def __init__(self, tree: Tree, on_destroy: object = None) -> None:
        self.tree = tree
        self.pool = BufferPool()
        self._on_destroy = on_destroy
        self.destroyed = False

    def _attr(self, ino: int) -> Attr:
        a = self.tree.getattr(ino)
        return Attr(ino=a.ino, mode=a.mode, size=a.size, blocks=a.blocks,
                    mtime_ns=self.tree.mtime_ns, blksize=a.blksize,
                    nlink=2 if ino == 1 else 1)

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
            self.tree.open(ino, writable=(flags & os.O_ACCMODE) != os.O_RDONLY,
                           truncate=bool(flags & os.O_TRUNC))
        # Direct I/O for every file: disk reads must never be widened by readahead (bytes
        # outside the readable set fail), and snapfs.json changes as the session goes on.
        return OpenReply(fh=0, direct_io=True)

    def release(self, ino: int, fh: int) -> None:
        pass

    async def read(self, ino: int, fh: int, offset: int, size: int) -> ReadResult:
        tree = self.tree
        if not tree.is_disk(ino):
            with _errno():
                return ReadResult(tree.read_text(ino, offset, size))
        if size > self.pool.size:
            raise FuseErrno(errno.EINVAL, "read larger than the negotiated maximum")
        buf = self.pool.get()
        try:
            with _errno():
                n = await tree.read_disk(ino, buf, offset, size)
        except BaseException:
            self.pool.put(buf)
            raise
        return ReadResult(memoryview(buf)[:n], release=lambda: self.pool.put(buf))

    def write(self, ino: int, fh: int, offset: int, data: bytes) -> int:
        raise FuseErrno(errno.EROFS, "snapfs is read-only")

    async def fallocate(self, ino: int, fh: int, offset: int, length: int, mode: int) -> None:
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
