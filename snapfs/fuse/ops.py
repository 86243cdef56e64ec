"""What the FUSE protocol layer asks of a file system: the ``Operations`` protocol.

The protocol layer (``server.py``) decodes kernel requests and calls these methods; it knows
nothing about VMs. An implementation reports failures only by raising ``FuseErrno``: any other
exception is a bug and is answered with EIO (and logged).

Concurrency rule: the server runs in one trio task tree. Plain methods run inline in the request
loop and must not block. ``async`` methods (fallocate, lseek) run in a task of their own, so
several of them can be in flight at once; they may be cancelled when the kernel sends INTERRUPT,
and a cancelled request is answered EINTR, never EIO. ``read`` gets a reply handle
(snapfs.fuse.reply) and may answer at once, from another thread, or from a task of the server.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from snapfs.fuse.reply import ReadReply

ROOT_INODE = 1


class FuseErrno(Exception):
    """A failure to report to the kernel as ``-errno``."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or errno)
        self.errno = errno


@dataclass(frozen=True, slots=True)
class Attr:
    """Attributes of one inode. ``blocks`` counts 512-byte units; ``blksize`` is what ``stat``
    shows as st_blksize, which tools such as ``cp`` use as their buffer size."""

    ino: int
    mode: int
    size: int = 0
    blocks: int = 0
    nlink: int = 1
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    blksize: int = 4096


@dataclass(frozen=True, slots=True)
class DirEntry:
    ino: int
    name: bytes
    mode: int  # only the S_IFMT bits matter


@dataclass(frozen=True, slots=True)
class OpenReply:
    fh: int = 0
    direct_io: bool = True  # FOPEN_DIRECT_IO: no page cache, no readahead
    keep_cache: bool = False


@dataclass(frozen=True, slots=True)
class StatFs:
    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    files: int = 0
    ffree: int = 0
    bsize: int = 4096
    namelen: int = 255
    frsize: int = 4096


class Operations(Protocol):
    """A file system as the FUSE layer sees it. Inode 1 is the root directory."""

    def lookup(self, parent: int, name: bytes) -> Attr: ...

    def forget(self, ino: int, nlookup: int) -> None: ...

    def getattr(self, ino: int) -> Attr: ...

    def setattr(self, ino: int, size: int | None) -> Attr:
        """Only a change of size is passed on (O_TRUNC, truncate); times and modes are ignored."""
        ...

    def readdir(self, ino: int) -> Sequence[DirEntry]:
        """The whole listing, without ``.`` and ``..`` (the server adds them)."""
        ...

    def open(self, ino: int, flags: int) -> OpenReply: ...

    def release(self, ino: int, fh: int) -> None: ...

    def read(self, ino: int, fh: int, offset: int, size: int, reply: ReadReply) -> None:
        """Answer the READ through ``reply`` (see snapfs.fuse.reply): at once, from another
        thread, or from ``reply.later``. A FuseErrno raised here is answered by the server."""
        ...

    def write(self, ino: int, fh: int, offset: int, data: bytes) -> int: ...

    async def fallocate(self, ino: int, fh: int, offset: int, length: int, mode: int) -> None: ...

    async def lseek(self, ino: int, fh: int, offset: int, whence: int) -> int: ...

    def statfs(self) -> StatFs: ...

    def destroy(self) -> None:
        """The kernel is done with the mount (DESTROY, or /dev/fuse reports ENODEV)."""
        ...
