"""The NBD wire format, for the raw read stream of the splice data path: the fixed-newstyle
handshake, read requests, block status of one meta context, and every reply they can get
(simple replies, and structured replies' data, hole, block status, error and none chunks).
libnbd (snapfs.nbd.client) speaks for everything else.

libnbd receives every reply into a buffer of ours, so a byte costs two copies in this process
(socket -> buffer -> /dev/fuse) and the trio thread wakes once per socket chunk. An NBDStream is
a second, read-only connection to the same export whose READ payloads a worker thread moves
from the socket into a pipe with splice(2), without a copy or a wakeup of the trio thread; see
snapfs.datapath.

It negotiates structured replies, as libnbd does: QEMU 7.2 then serves a read of a
snapshot-access node extent by extent (block status first). With simple replies QEMU reads a
request in one piece: right for a snapshot only inside one copy-before-write cluster (see
snapfs.qmp.confine_reads), where it is cheaper. So are structured replies to reads flagged
"don't fragment" (``context``: a stream that asks block status as well).
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
from collections.abc import Sequence
from typing import Final

from snapfs.errors import NBDError
from snapfs.nbd import tuning

_NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
_IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
_OPT_REPLY_MAGIC: Final = 0x3E889045565A9
_REQUEST_MAGIC: Final = 0x25609513
_STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF
_FLAG_FIXED_NEWSTYLE: Final = 1
_FLAG_NO_ZEROES: Final = 2
_OPT_GO: Final = 7
_OPT_STRUCTURED_REPLY: Final = 8
_OPT_SET_META_CONTEXT: Final = 10
_REP_ACK: Final = 1
_REP_INFO: Final = 3
_REP_META_CONTEXT: Final = 4
_REP_FLAG_ERROR: Final = 1 << 31
_INFO_EXPORT: Final = 0
_CMD_READ: Final = 0
_CMD_DISC: Final = 2
_CMD_BLOCK_STATUS: Final = 7
_CMD_FLAG_DF: Final = 1 << 2
_FLAG_SEND_DF: Final = 1 << 7  # transmission flag: the server takes _CMD_FLAG_DF
#: Extent flags of block status: base:allocation's ZERO (the block reads as zeros), and a
#: qemu:dirty-bitmap:NAME context's DIRTY (QEMU's docs/interop/nbd.txt).
STATE_ZERO: Final = 2
STATE_DIRTY: Final = 1
#: Structured reply chunk types and flags.
CHUNK_NONE: Final = 0
CHUNK_OFFSET_DATA: Final = 1
CHUNK_OFFSET_HOLE: Final = 2
CHUNK_BLOCK_STATUS: Final = 5
CHUNK_ERROR_BIT: Final = 1 << 15
#: Not on the wire: what NBDStream.recv_chunk reports for a simple reply.
CHUNK_SIMPLE: Final = 0x10000
CHUNK_FLAG_DONE: Final = 1
_REQUEST: Final = struct.Struct(">IHHQQI")
_OPT_REPLY: Final = struct.Struct(">QIII")
_STRUCTURED: Final = struct.Struct(">IHHQI")  # magic, flags, type, handle, length
_SIMPLE: Final = struct.Struct(">IIQ")  # magic, error, handle
_SIMPLE_REPLY_MAGIC: Final = 0x67446698
_SPLICE_F_NONBLOCK: Final = getattr(os, "SPLICE_F_NONBLOCK", 2)


_OFFSET: Final = struct.Struct(">Q")
_HOLE: Final = struct.Struct(">QI")
_ERROR: Final = struct.Struct(">IH")
_CONTEXT_ID: Final = struct.Struct(">I")
_EXTENT: Final = struct.Struct(">II")  # length, flags
#: The longest block status payload taken: far more extents than a request of MAX_STATUS
#: bytes at the smallest granularity QEMU's bitmaps have (512 bytes) can give.
_MAX_STATUS_PAYLOAD: Final = _CONTEXT_ID.size + _EXTENT.size * 4096
#: The longest range one block status request may ask for.
MAX_STATUS: Final = 1 << 21


class StreamLost(NBDError):
    """The NBDStream cannot go on: the server went away, broke the protocol, or ``shutdown``
    was called."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno.EIO)


class _Refused(NBDError):
    """The server answered an option with an error reply."""

    def __init__(self, message: str) -> None:
        super().__init__(message, errno.ENOTSUP)


class NBDStream:
    """A blocking, read-only NBD connection for ONE worker thread, read with splice(2).

    Requests may be pipelined; reply chunks of different requests may interleave, so the caller
    matches them by handle. After :meth:`recv_chunk` the caller takes exactly the chunk's
    ``length`` bytes with the other receive methods before the next header. Every method but
    ``shutdown`` must be called from the owning thread; ``shutdown`` may be called from any
    thread and makes a blocked call raise StreamLost.
    """

    def __init__(self, sock: socket.socket, name: str, size: int, structured: bool = True) -> None:
        # Private: use connect().
        self.structured = structured
        #: The id the server gave the ``context`` asked for at connect(); None: not agreed.
        self.context_id: int | None = None
        self._read_flags = 0
        self._sock = sock
        self._fd = sock.fileno()
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        # Reply headers and the small fields behind them are received into this, once per
        # chunk: no buffer or bytes object per field.
        self._head = bytearray(_STRUCTURED.size)
        head = memoryview(self._head)
        self._simple_head = head[: _SIMPLE.size]
        self._offset_field = head[: _OFFSET.size]
        self._structured_head = head
        self.name = name
        self.size = size
        #: The send buffer of the server's end, if connect() could widen it; else 0.
        self.server_sndbuf = 0

    @classmethod
    def connect(
        cls,
        socket_path: str,
        export: str,
        timeout: float = 10.0,
        *,
        structured: bool = True,
        tune: bool = True,
        context: str = "",
    ) -> NBDStream:
        """Connect and negotiate; raises NBDError naming what the server refused.

        ``tune``: widen the server's send buffer (snapfs.nbd.tuning).

        ``context``: a meta context to ask block status of (``send_reads``), with structured
        replies; reads are then flagged "don't fragment" where the server takes that (one data
        chunk, read as one piece, as with simple replies). ``context_id`` stays None if the
        server does not offer the context.

        ``structured=False``: simple replies (the whole payload after a 16-byte header; holes
        come as zeros). QEMU then reads a request as one piece, without asking for its block
        status first: cheaper for many small requests, and right for a snapshot only when
        every request stays inside one copy-before-write cluster (see qmp.confine_reads).
        """
        name = f"{socket_path}:{export}"
        sock: socket.socket | None = None
        try:
            sock = tuning.connect_unix(socket_path, timeout)
            sock.settimeout(timeout)  # bounds the handshake only
            stream = cls(sock, name, 0, structured or bool(context))
            stream.size = stream._handshake(export, context)
            sock.settimeout(None)
            stream.server_sndbuf = tuning.widen_server_sndbuf(sock, name) if tune else 0
        except BaseException as err:
            if sock is not None:
                sock.close()
            if isinstance(err, OSError):
                raise NBDError(
                    f"cannot connect to NBD export {export!r} at {socket_path}: "
                    f"{err.strerror or err}",
                    err.errno or errno.EIO,
                ) from err
            raise
        return stream

    def _option(self, option: int, data: bytes) -> list[tuple[int, bytes]]:
        """Send an option; its replies up to the final one, as ``(type, payload)``."""
        self._sock.sendall(struct.pack(">QII", _IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            magic, opt, rtype, rlen = _OPT_REPLY.unpack(self.read_exact(_OPT_REPLY.size))
            if magic != _OPT_REPLY_MAGIC or opt != option or rlen > 1 << 16:
                raise NBDError(f"{self.name}: bad option reply in the handshake", errno.EPROTO)
            payload = self.read_exact(rlen) if rlen else b""
            if rtype & _REP_FLAG_ERROR:
                text = payload.decode(errors="replace") or f"error {rtype & ~_REP_FLAG_ERROR:#x}"
                raise _Refused(f"{self.name}: the server refused option {option}: {text}")
            replies.append((rtype, payload))
            if rtype == _REP_ACK:
                return replies

    def _handshake(self, export: str, context: str) -> int:
        magic, opt, flags = struct.unpack(">QQH", self.read_exact(18))
        if magic != _NBDMAGIC or opt != _IHAVEOPT or not flags & _FLAG_FIXED_NEWSTYLE:
            raise NBDError(f"{self.name}: not a fixed-newstyle NBD server", errno.EPROTO)
        self._sock.sendall(struct.pack(">I", _FLAG_FIXED_NEWSTYLE | (flags & _FLAG_NO_ZEROES)))
        if self.structured:
            self._option(_OPT_STRUCTURED_REPLY, b"")
        encoded = export.encode()
        named = struct.pack(">I", len(encoded)) + encoded
        if context:
            query = context.encode()
            asked = named + struct.pack(">II", 1, len(query)) + query
            with contextlib.suppress(_Refused):  # then the context is not offered
                for rtype, payload in self._option(_OPT_SET_META_CONTEXT, asked):
                    if rtype == _REP_META_CONTEXT and payload[4:] == query:
                        (self.context_id,) = _CONTEXT_ID.unpack_from(payload)
        size = -1
        flags = 0
        for rtype, payload in self._option(_OPT_GO, named + struct.pack(">H", 0)):
            if rtype == _REP_INFO and len(payload) >= 12:
                (info,) = struct.unpack_from(">H", payload)
                if info == _INFO_EXPORT:
                    size, flags = struct.unpack_from(">QH", payload, 2)
        if size < 0:
            raise NBDError(f"{self.name}: the server did not say the export's size", errno.EPROTO)
        if context and flags & _FLAG_SEND_DF:
            self._read_flags = _CMD_FLAG_DF
        return size

    @property
    def fileno(self) -> int:
        """The socket's descriptor, to wait on (owned by the stream)."""
        return self._fd

    def send_read(self, handle: int, offset: int, length: int) -> None:
        """Ask for ``length`` (at most 32 MiB) bytes at ``offset``."""
        self.send_reads([(handle, offset, length)])

    def send_reads(
        self,
        requests: Sequence[tuple[int, int, int]],
        statuses: Sequence[tuple[int, int, int]] = (),
    ) -> None:
        """Ask for several ``(handle, offset, length)`` reads, and block status of the
        ``context`` (each at most MAX_STATUS bytes), with one send."""
        flags = self._read_flags
        # A list, not a generator; join returns a single request's bytes as they are.
        data = b"".join(
            [
                *[
                    _REQUEST.pack(_REQUEST_MAGIC, flags, _CMD_READ, handle, offset, length)
                    for handle, offset, length in requests
                ],
                *[
                    _REQUEST.pack(_REQUEST_MAGIC, 0, _CMD_BLOCK_STATUS, handle, offset, length)
                    for handle, offset, length in statuses
                ],
            ]
        )
        try:
            self._sock.sendall(data)
        except OSError as err:
            raise StreamLost(f"{self.name}: sending a request failed: {err.strerror}") from err

    def recv_chunk(self) -> tuple[int, int, int, int]:
        """The next reply chunk's header: ``(handle, type, flags, length)``.

        A simple reply (a stream without structured replies) comes as a chunk of type
        CHUNK_SIMPLE with CHUNK_FLAG_DONE whose ``length`` is the server's error (0: the whole
        payload the request asked for follows; otherwise none does)."""
        if not self.structured:
            self.recv_into(self._simple_head)
            magic, error, handle = _SIMPLE.unpack_from(self._head)
            if magic != _SIMPLE_REPLY_MAGIC:
                raise StreamLost(f"{self.name}: bad reply magic {magic:#x}")
            return handle, CHUNK_SIMPLE, CHUNK_FLAG_DONE, error
        self.recv_into(self._structured_head)
        magic, flags, ctype, handle, length = _STRUCTURED.unpack_from(self._head)
        if magic != _STRUCTURED_REPLY_MAGIC:
            # Simple replies to reads are not allowed once structured replies are agreed.
            raise StreamLost(f"{self.name}: bad reply magic {magic:#x}")
        return handle, ctype, flags, length

    def recv_offset(self, length: int) -> tuple[int, int]:
        """The start of a data chunk of ``length`` bytes: ``(offset, data bytes that follow)``."""
        self.recv_into(self._offset_field)
        (offset,) = _OFFSET.unpack_from(self._head)
        return int(offset), length - _OFFSET.size

    def recv_hole(self) -> tuple[int, int]:
        """A hole chunk's payload: ``(offset, length)``."""
        offset, length = _HOLE.unpack(self.read_exact(_HOLE.size))
        return int(offset), int(length)

    def recv_status(self, length: int) -> tuple[int, list[tuple[int, int]]]:
        """A block status chunk's payload of ``length`` bytes: ``(context id, [(length,
        flags), ...])``, the extents in order from the request's offset."""
        payload = self.read_exact(length)
        (context,) = _CONTEXT_ID.unpack_from(payload)
        return int(context), [
            (int(n), int(f)) for n, f in _EXTENT.iter_unpack(payload[_CONTEXT_ID.size :])
        ]

    def recv_error(self, length: int) -> int:
        """An error chunk's payload of ``length`` bytes: the errno (the message is not kept)."""
        error, _ = _ERROR.unpack(self.read_exact(_ERROR.size))
        self.read_exact(length - _ERROR.size)
        return int(error) or errno.EIO

    @staticmethod
    def chunk_fits(ctype: int, length: int) -> bool:
        """Whether a chunk of this type may have a payload of this length."""
        if ctype == CHUNK_OFFSET_DATA:
            return length >= _OFFSET.size
        if ctype == CHUNK_OFFSET_HOLE:
            return length == _HOLE.size
        if ctype == CHUNK_BLOCK_STATUS:
            return (
                _CONTEXT_ID.size + _EXTENT.size <= length <= _MAX_STATUS_PAYLOAD
                and (length - _CONTEXT_ID.size) % _EXTENT.size == 0
            )
        if ctype & CHUNK_ERROR_BIT:
            return length >= _ERROR.size
        return ctype == CHUNK_SIMPLE or (ctype == CHUNK_NONE and length == 0)

    def read_exact(self, n: int) -> bytes:
        """Exactly ``n`` bytes (small fields; payloads go through splice_into/recv_into)."""
        buf = bytearray(n)
        self.recv_into(memoryview(buf))
        return bytes(buf)

    def splice_into(self, pipe_w: int, length: int) -> int:
        """Move up to ``length`` bytes into the pipe ``pipe_w`` without copying them; return
        how many were moved: fewer only if the pipe is full (the rest stays in the socket)."""
        moved = 0
        ready = False  # the socket is known to have data (nobody else takes it)
        while moved < length:
            # A non-blocking splice is the only way to learn that the pipe is full, and it
            # makes the socket side non-blocking too: EAGAIN means a full pipe only once the
            # socket is known to have data. Waiting only after an EAGAIN spares a poll(2) per
            # chunk, whose bytes are usually there already.
            try:
                n = os.splice(self._fd, pipe_w, length - moved, flags=_SPLICE_F_NONBLOCK)
            except BlockingIOError:
                if ready:
                    return moved  # the socket has data, so the pipe is full
                self._poll.poll()
                ready = True
                continue
            except OSError as err:
                raise StreamLost(f"{self.name}: receiving failed: {err.strerror}") from err
            if n == 0:
                raise StreamLost(f"{self.name}: the NBD server went away")
            moved += n
            ready = False
        return moved

    def recv_into(self, view: memoryview) -> None:
        """Receive exactly ``len(view)`` bytes into ``view`` (the copying way)."""
        got = 0
        want = len(view)
        while got < want:
            try:
                n = self._sock.recv_into(view[got:] if got else view)
            except TimeoutError as err:  # only the handshake has a timeout
                raise StreamLost(f"{self.name}: the NBD server did not answer in time") from err
            except OSError as err:
                raise StreamLost(f"{self.name}: receiving failed: {err.strerror}") from err
            if n == 0:
                raise StreamLost(f"{self.name}: the NBD server went away")
            got += n

    def shutdown(self) -> None:
        """Make every blocked or later call raise StreamLost. Any thread; idempotent."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Say goodbye if the connection still works, then close it. Owning thread only."""
        with contextlib.suppress(OSError):
            self._sock.sendall(_REQUEST.pack(_REQUEST_MAGIC, 0, _CMD_DISC, 0, 0, 0))
        self._sock.close()
