"""The FUSE boundary: serves a ``Tree`` through the ``Operations`` protocol.

This is the only place where domain errors become errno values (``TreeError.errno``). Every READ
comes with a reply handle (snapfs.fuse.reply). Text files are answered at once, and so is a
disk READ that lies wholly in a known zero of the snapshot (``Disk.zeros``, the holes a full
view shows: no need to ask QEMU for them). Any other disk READ
that passes the tree's checks goes to the disk's direct reads if it has them (``DirectReads``:
the splice data path, ``snapfs.datapath.SpliceReads``), which answer it from another thread;
otherwise, or when they give up on it, it is read through the disk's source in a task of the
server: one read path, no read-ahead of its own.

Concurrency rule: everything here runs on the trio thread, except ``read_now``, which the thread
that reads the FUSE requests calls (snapfs.fuse.server.Intake) and which touches the tree only
through its thread-safe read checks; reads and fallocate may be in flight several at a time,
which the tree allows (see ``tree.py``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from snapfs.fuse.ops import (
    Attr,
    DirEntry,
    FuseErrno,
    OpenReply,
    StatFs,
)
from snapfs.fuse.reply import ReadReply
from snapfs.tree import Disk, Tree, TreeError

log = logging.getLogger(__name__)

#: The largest READ the FUSE layer negotiates (snapfs.fuse.server.MAX_PAGES).
MAX_READ = 1 << 20
#: What a READ of a known zero is answered with (a slice of it).
_ZEROS = memoryview(bytes(MAX_READ))


@contextlib.contextmanager
def _errno() -> Iterator[None]:
    try:
        yield
    except TreeError as err:
        raise FuseErrno(err.errno, str(err)) from err


class DirectReads(Protocol):
    """A disk's way of answering READs without handing bytes to the trio thread."""

    def read(
        self, reply: ReadReply, offset: int, length: int, failed: Callable[[Exception], None]
    ) -> bool:
        """Answer ``reply`` with ``length`` bytes at ``offset`` (checked by the tree); False if
        it cannot now (read another way). Later failures come to ``failed`` on the trio thread,
        the reply unanswered: a ``TreeError`` to answer, or anything else to read another way."""
        ...


class TreeOperations:
    """``Operations`` for a snapfs ``Tree``. ``on_destroy`` runs when the kernel lets go."""

    def __init__(self, tree: Tree, on_destroy: object = None) -> None:
        self.tree = tree
        #: Direct reads by disk inode (the session adds them once the data path runs).
        self.direct: dict[int, DirectReads] = {}
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
        # A full view's disks go through the page cache: every byte of them is the snapshot's
        # and never changes, so the kernel's readahead serves small reads (tar reads 512 bytes
        # at a time) and keeps what it read. An incremental view's disks are read directly:
        # readahead would touch bytes outside the backup. snapfs.json changes as the session
        # goes on; the other text files are small.
        if self.tree.is_disk(ino) and self.tree.full(ino):
            return OpenReply(fh=0, direct_io=False, keep_cache=True)
        return OpenReply(fh=0, direct_io=True)

    def release(self, ino: int, fh: int) -> None:
        pass  # nothing is kept per open file

    def read(self, ino: int, fh: int, offset: int, size: int, reply: ReadReply) -> None:
        tree = self.tree
        if not tree.is_disk(ino):
            with _errno():
                reply.data(tree.read_text(ino, offset, size))
            return
        checked = self._check(ino, offset, size, reply)
        if checked is None:
            return
        disk, length = checked
        if not self._direct(ino, disk, reply, offset, length):
            disk.count_read(length)
            reply.later(functools.partial(self._plain, disk, reply, offset, length))

    def read_now(self, reply: ReadReply, ino: int, fh: int, offset: int, size: int) -> bool:
        """A READ in the thread that reads the FUSE requests (snapfs.fuse.server.Intake): a
        disk's, answered through its direct reads (True), or left to ``read`` (False)."""
        if ino not in self.direct:
            return False  # text files, and disks without direct reads
        checked = self._check(ino, offset, size, reply)
        if checked is None:
            return True
        disk, length = checked
        return self._direct(ino, disk, reply, offset, length)

    def _check(self, ino: int, offset: int, size: int, reply: ReadReply) -> tuple[Disk, int] | None:
        """The tree's checks of a disk READ, at the time of the READ: a range punched after a
        read-ahead of it was sent is refused here, before the read-ahead could be used. None
        if it is answered already (nothing to read, or a known zero)."""
        if size > MAX_READ:
            raise FuseErrno(errno.EINVAL, "read larger than the negotiated maximum")
        try:  # not _errno(): a context manager costs more than the rest of the check
            disk, length = self.tree.disk_read_length(ino, offset, size)
        except TreeError as err:
            raise FuseErrno(err.errno, str(err)) from err
        if not length:
            reply.data(b"")
            return None
        if disk.reads_as_zeros(offset, length):
            disk.count_read(length)
            reply.data(_ZEROS[:length])
            return None
        return disk, length

    def _direct(self, ino: int, disk: Disk, reply: ReadReply, offset: int, length: int) -> bool:
        """Hand the READ to the disk's direct reads; False if they cannot take it now."""
        direct = self.direct.get(ino)
        if direct is None:
            return False
        disk.count_read(length)  # counted now: a read that goes well is not reported back
        failed = functools.partial(self._direct_failed, disk, reply, offset, length)
        if direct.read(reply, offset, length, failed):
            return True
        disk.count_read(-length)
        return False

    def _direct_failed(
        self, disk: Disk, reply: ReadReply, offset: int, length: int, outcome: Exception
    ) -> None:
        if isinstance(outcome, TreeError):
            disk.count_read(-length)
            reply.error(outcome.errno)
        else:
            # The data path cannot go on: the plain way, which tells what is wrong if anything.
            reply.later(functools.partial(self._plain, disk, reply, offset, length))

    async def _plain(self, disk: Disk, reply: ReadReply, offset: int, length: int) -> None:
        buf = bytearray(length)
        try:
            with _errno():
                await disk.source.read_into(buf, offset, length)
        except BaseException:
            disk.count_read(-length)
            raise
        reply.data(buf)

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
