"""Tuning QEMU's NBD server from the outside, where its interface offers no way: its end of a
connection's send buffer, and one large read that makes its allocator reuse request buffers.
Both are optional (``snapfs mount --no-tune``): without them reads are slower, never wrong.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from typing import TYPE_CHECKING, Final

from snapfs import libc

if TYPE_CHECKING:
    from snapfs.nbd.wire import NBDStream

log = logging.getLogger(__name__)

#: Send buffer an NBDStream gives the server's end of its connection (the kernel doubles it).
#: Why: see widen_server_sndbuf.
SERVER_SNDBUF: Final = 4 << 20
#: One read of this many bytes when the first reader of a QEMU starts, its bytes thrown away.
#: Why: QEMU's NBD server allocates every request's buffer with posix_memalign (4 KiB aligned),
#: and glibc 2.36 can get stuck mapping each 1 MiB buffer anew: the dynamic mmap threshold it
#: raises when such a buffer is freed stays just below the next request's padded size. QEMU
#: then faults in all 256 pages of every buffer. Freeing one larger buffer raises the threshold
#: above 1 MiB for good, so later buffers come from the heap and are reused. The price: QEMU's
#: heap may keep up to twice this much freed memory.
WARM_UP: Final = 8 << 20
_SO_SNDBUFFORCE: Final = getattr(socket, "SO_SNDBUFFORCE", 32)
_UCRED: Final = struct.Struct("3i")


def _widen_if_peer(fd: int, ours: object) -> int | None:
    """If ``fd`` (a duplicate, always closed here) is the unix socket connected to the address
    ``ours``, widen its send buffer and return the size it has now (0: it could not be
    widened); None if it is another descriptor."""
    try:
        peer = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return None
    with peer:
        try:
            if peer.family != socket.AF_UNIX or peer.getpeername() != ours:
                return None
        except OSError:
            return None  # a listening or unconnected socket
        try:
            try:
                peer.setsockopt(socket.SOL_SOCKET, _SO_SNDBUFFORCE, SERVER_SNDBUF)
            except PermissionError:  # no CAP_NET_ADMIN: up to net.core.wmem_max
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SERVER_SNDBUF)
            return int(peer.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        except OSError:
            return 0


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    """pidfd_getfd(2) (a seam for tests that refuse it)."""
    return libc.pidfd_getfd(pidfd, fd)


def _not_widened(name: str, err: OSError) -> int:
    log.warning("%s: cannot widen QEMU's send buffer (reads are slower): %s", name, err.strerror)
    return 0


def widen_server_sndbuf(sock: socket.socket, name: str) -> int:
    """Give the server's end of the connected unix socket ``sock`` a send buffer of
    SERVER_SNDBUF; return its size now, or 0 if that cannot be done here (nothing changed).

    Why: a server writes a reply only as fast as its end's send buffer drains, and the
    default (``net.core.wmem_default``, 208 KiB) holds a fifth of a 1 MiB reply, so QEMU and
    the reader take turns about six times per request (the benchmark's four parallel readers
    caused 16 context switches per MiB). With the buffer widened, QEMU 7.2 writes whole replies
    at once: snapfs read 4 disks in parallel a third faster, at less CPU in QEMU and in snapfs.
    For unix stream sockets only the sender's buffer counts, and an accepted socket does not
    inherit its listener's, so the one way in is pidfd_getfd(2): it needs root (or ptrace
    rights over the server) and Linux 5.6. The server's end is the socket whose peer is ours
    (bound to a unique abstract name); no other socket is touched, and the duplicates are
    closed at once. QEMU's copy of the descriptor is unchanged apart from the buffer size.
    """
    ours = sock.getsockname()
    pid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as err:
        return _not_widened(name, err)
    try:
        with os.scandir(f"/proc/{pid}/fd") as entries:
            for entry in entries:
                try:
                    if not os.readlink(entry.path).startswith("socket:"):
                        continue
                    dup = _pidfd_getfd(pidfd, int(entry.name))
                except OSError as err:
                    if err.errno in (errno.EPERM, errno.ENOSYS, errno.ESRCH):
                        return _not_widened(name, err)
                    continue  # closed meanwhile
                size = _widen_if_peer(dup, ours)
                if size is not None:
                    return size
    except OSError as err:
        return _not_widened(name, err)
    finally:
        os.close(pidfd)
    return 0


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A unix stream socket connected to ``path`` in at most ``timeout`` seconds, bound to a
    unique abstract name first: by that name ``widen_server_sndbuf`` finds the server's end.
    The socket is returned blocking; raises OSError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind("")
        sock.settimeout(timeout)
        sock.connect(path)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    return sock


def warm_up(stream: NBDStream, handle: int) -> None:
    """Read up to WARM_UP bytes at offset 0 with request ``handle`` and throw them away (see
    WARM_UP). An error reply is fine (the range may be outside the backup): QEMU allocated the
    buffer. The bytes may be wrong where reads must be confined (snapfs.qmp.confine_reads):
    nobody looks at them. Raises StreamLost if the stream breaks."""
    from snapfs.nbd.wire import CHUNK_FLAG_DONE, CHUNK_SIMPLE, StreamLost

    length = min(WARM_UP, stream.size)
    stream.send_reads([(handle, 0, length)])
    scratch = memoryview(bytearray(1 << 16))
    while True:
        got, ctype, flags, size = stream.recv_chunk()
        if got != handle:
            raise StreamLost(f"{stream.name}: a reply to unknown request {got}")
        if ctype == CHUNK_SIMPLE:
            size = 0 if size else length  # an error, or the whole payload
        while size:  # whatever the chunk holds: it is not needed
            n = min(size, len(scratch))
            stream.recv_into(scratch[:n])
            size -= n
        if flags & CHUNK_FLAG_DONE:
            return
