"""READ replies moved into /dev/fuse with splice(2), from any thread.

A :class:`ReplyPipe` lets a worker thread answer a READ without the bytes passing through
Python: it writes the reply header into a pipe, puts the payload behind it (spliced from a
socket or from another pipe: only page references move), and splices the whole reply into
/dev/fuse, where the kernel copies it straight into the reader's pages.

The kernel takes a spliced reply only whole, so header and payload must fit into the pipe at
once. A pipe holds at most ``/proc/sys/fs/pipe-max-size`` bytes' worth of slots (1 MiB unless
raised, even for root in a container); a socket's pages usually come in chunks larger than a
page, so a 1 MiB payload fits, but that is not guaranteed: whoever fills the pipe stops at a
full pipe (non-blocking splice) and sends the reply by copying instead (:meth:`take_back`,
:meth:`write_copy`).

Each ReplyPipe owns a ``dup`` of the /dev/fuse descriptor, so a reply written after the server
closed its own descriptor can never reach an unrelated file that reused the number; once the
connection is gone, writes fail with ENODEV and are dropped.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Final

from snapfs.errors import FuseError
from snapfs.fuse import protocol as p

F_SETPIPE_SZ: Final = 1031
SPLICE_F_NONBLOCK: Final = getattr(os, "SPLICE_F_NONBLOCK", 2)
_HEADER: Final = p.OUT_HEADER
# The request was interrupted (ENOENT) or the connection is gone: the reply has no reader.
_UNDELIVERABLE: Final = (errno.ENOENT, errno.ENODEV, errno.ECONNABORTED)


class Pipe:
    """A pipe of ``size`` bytes (as the kernel rounds it); both ends close with ``close``."""

    def __init__(self, size: int) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.w, F_SETPIPE_SZ, size)
        except OSError as err:
            self.close()
            raise FuseError(f"cannot make a pipe of {size} bytes: {err.strerror}") from err

    def move_to(self, dst_w: int, length: int) -> int:
        """Splice up to ``length`` bytes into the pipe ``dst_w``; fewer only if it is full."""
        moved = 0
        while moved < length:
            try:
                moved += os.splice(self.r, dst_w, length - moved, flags=SPLICE_F_NONBLOCK)
            except BlockingIOError:
                break
        return moved

    def read_exact(self, view: memoryview) -> None:
        """Read exactly ``len(view)`` bytes that are known to be in the pipe."""
        got = 0
        while got < len(view):
            got += os.readv(self.r, [view[got:]])

    def discard(self, length: int) -> None:
        """Drop ``length`` bytes that are known to be in the pipe."""
        scratch = bytearray(min(length, 1 << 16))
        view = memoryview(scratch)
        while length:
            length -= os.readv(self.r, [view[: min(length, len(view))]])

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.r = self.w = -1


class ReplyPipe(Pipe):
    """Carries one READ reply at a time into /dev/fuse. One thread at a time uses it."""

    def __init__(self, fuse_fd: int, size: int) -> None:
        super().__init__(size)
        self._fuse = os.dup(fuse_fd)

    def start(self, header: bytes) -> int:
        """Write a reply's header (``ReadReply.header``); return the end to splice the payload
        into. The pipe must be empty."""
        os.write(self.w, header)
        return self.w

    def finish(self, length: int) -> None:
        """Hand header and ``length`` payload bytes to the kernel in one splice. A reply
        nobody waits for any more is dropped (the kernel empties the pipe either way)."""
        left = _HEADER.size + length
        try:
            # /dev/fuse takes a reply whole in one call; a pipe (in tests) may take less.
            while left:
                left -= os.splice(self.r, self._fuse, left)
        except OSError as err:
            if err.errno not in _UNDELIVERABLE:
                raise

    def take_back(self, view: memoryview) -> None:
        """Undo ``start`` and a partial payload: drop the header and read the ``len(view)``
        payload bytes in the pipe into ``view``, leaving the pipe empty."""
        self.discard(_HEADER.size)
        self.read_exact(view)

    def write_copy(self, header: bytes, payload: memoryview | bytearray) -> None:
        """Send a reply the copying way (header and payload in one writev)."""
        try:
            os.writev(self._fuse, [header, payload])
        except OSError as err:
            if err.errno not in _UNDELIVERABLE:
                raise

    def close(self) -> None:
        super().close()
        with contextlib.suppress(OSError):
            os.close(self._fuse)
        self._fuse = -1
