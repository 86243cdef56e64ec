"""A FAKE NBD server, in-process, for the data path's fast test tier (no QEMU needed).

It speaks enough of the NBD protocol for ``snapfs.nbd.wire.NBDStream``: the fixed-newstyle
handshake, ``NBD_OPT_STRUCTURED_REPLY`` (optional), ``NBD_OPT_SET_META_CONTEXT`` (one context,
``copied``), ``NBD_OPT_GO``, ``NBD_CMD_READ`` (``NBD_CMD_FLAG_DF`` too), ``NBD_CMD_BLOCK_STATUS``
and ``NBD_CMD_DISC``, over a unix socket, serving bytes held in memory. What real servers do and
the tests want to provoke, it does on purpose:

- ``shuffle``: answers the requests that are pending at once in a random order, and with
  structured replies interleaves their chunks (QEMU may do both);
- ``chunk``: structured replies split a read into data chunks of this size, and every run of
  zeros of ``hole_min`` bytes or more into a hole chunk;
- ``fail``: reads that touch one of these ranges get an error reply (EIO);
- ``break_after``: after that many replies, the server sends garbage and closes.
- ``copied``: offers this context, QEMU's bitmap of the copy-before-write clusters
  (``cluster`` bytes) saved, which are ``saved``; and misreads as QEMU before 8.0 does: a read
  across clusters returns every saved cluster in it wrong (inverted bytes: the live disk's);
  ``status_fail``: block status gets an error reply.

Real QEMU is what the integration tests use; this stands in only where QEMU cannot be made to
misbehave on purpose.
"""

from __future__ import annotations

import contextlib
import errno
import random
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_MAGIC = 0x67446698
STRUCTURED_MAGIC = 0x668E33EF
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10
REP_ACK = 1
REP_INFO = 3
REP_META_CONTEXT = 4
CONTEXT_ID = 7
REP_ERR_UNSUP = (1 << 31) | 1
CMD_READ = 0
CMD_DISC = 2
CMD_BLOCK_STATUS = 7
CMD_FLAG_DF = 1 << 2
CHUNK_NONE = 0
CHUNK_DATA = 1
CHUNK_HOLE = 2
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR = (1 << 15) | 1
FLAG_DONE = 1


@dataclass
class FakeNBD:
    """Serves ``data`` as export ``name`` on ``path`` until ``close``; see the module doc."""

    path: Path
    data: bytes
    name: str = "disk"
    shuffle: bool = False
    chunk: int = 1 << 20
    hole_min: int = 4096
    fail: list[tuple[int, int]] = field(default_factory=list)
    break_after: int | None = None
    seed: int = 1
    #: While not set, requests are taken in and not answered (bounded: 30 s, then the
    #: connection is dropped).
    hold: threading.Event | None = None
    copied: str = ""
    cluster: int = 1 << 16
    saved: set[int] = field(default_factory=set)
    status_fail: bool = False
    #: What was asked, as (offset, length), in order of arrival: reads (those flagged "don't
    #: fragment" in ``unfragmented`` as well) and block status.
    reads: list[tuple[int, int]] = field(default_factory=list)
    unfragmented: list[tuple[int, int]] = field(default_factory=list)
    statuses: list[tuple[int, int]] = field(default_factory=list)
    #: ``("read", offset, length)`` once a read's reply is sent in full, ``("status", offset,
    #: length)`` when a block status request comes in: in the order they happened.
    events: list[tuple[str, int, int]] = field(default_factory=list)
    _server: socket.socket | None = field(default=None, init=False)
    _threads: list[threading.Thread] = field(default_factory=list, init=False)
    _replies: int = field(default=0, init=False)

    def start(self) -> FakeNBD:
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(self.path))
        self._server.listen(8)
        t = threading.Thread(target=self._accept, name="fake-nbd", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def close(self) -> None:
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
        for t in self._threads:
            t.join(10)

    def __enter__(self) -> FakeNBD:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the connection ------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._server is not None
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                structured = self._handshake(conn)
                if structured is not None:
                    self._transmission(conn, structured)
            except (OSError, EOFError):
                return

    def _handshake(self, conn: socket.socket) -> bool | None:
        """Whether the connection uses structured replies (None: it ended)."""
        structured = False
        conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
        _recv(conn, 4)  # client flags
        while True:
            magic, opt, length = struct.unpack(">QII", _recv(conn, 16))
            assert magic == IHAVEOPT
            payload = _recv(conn, length)
            if opt == OPT_STRUCTURED_REPLY:
                structured = True
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, REP_ACK, 0))
            elif opt == OPT_SET_META_CONTEXT and self.copied:
                (n,) = struct.unpack_from(">I", payload)
                (count,) = struct.unpack_from(">I", payload, 4 + n)
                at = 8 + n
                for _ in range(count):
                    (q,) = struct.unpack_from(">I", payload, at)
                    query = payload[at + 4 : at + 4 + q]
                    at += 4 + q
                    if query.decode() == self.copied:
                        body = struct.pack(">I", CONTEXT_ID) + query
                        conn.sendall(
                            struct.pack(">QIII", OPT_REPLY_MAGIC, opt, REP_META_CONTEXT, len(body))
                            + body
                        )
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, REP_ACK, 0))
            elif opt == OPT_GO:
                (n,) = struct.unpack_from(">I", payload)
                if payload[4 : 4 + n].decode() != self.name:
                    text = b"no such export"
                    conn.sendall(
                        struct.pack(">QIII", OPT_REPLY_MAGIC, opt, (1 << 31) | 6, len(text)) + text
                    )
                    continue
                info = struct.pack(">HQH", 0, len(self.data), 1 | (1 << 7))  # takes DF
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, REP_INFO, len(info)) + info)
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, REP_ACK, 0))
                return structured
            else:
                conn.sendall(struct.pack(">QIII", OPT_REPLY_MAGIC, opt, REP_ERR_UNSUP, 0))

    def _transmission(self, conn: socket.socket, structured: bool) -> None:
        rng = random.Random(self.seed)
        conn.setblocking(True)
        while True:
            batch = [self._request(conn)]
            # Everything else already sent: answered together (in a shuffled order).
            conn.setblocking(False)
            try:
                while True:
                    batch.append(self._request(conn))
            except (BlockingIOError, EOFError):
                pass
            finally:
                conn.setblocking(True)
            if any(r is None for r in batch):
                return
            if self.hold is not None and not self.hold.wait(30):
                return
            replies = [
                (request, self._reply(*request, structured=structured))
                for request in batch
                if request is not None
            ]
            if self.shuffle:
                rng.shuffle(replies)
            if structured and self.shuffle:
                # Interleave the chunks of the replies, keeping each reply's order.
                queues = [(request, list(r)) for request, r in replies]
                while queues:
                    request, q = rng.choice(queues)
                    conn.sendall(q.pop(0))
                    if not q:
                        queues.remove((request, q))
                        self._sent(request)
            else:
                for request, r in replies:
                    conn.sendall(b"".join(r))
                    self._sent(request)
            self._replies += len(replies)
            if self.break_after is not None and self._replies >= self.break_after:
                conn.sendall(b"\xde\xad\xbe\xef" * 8)
                return

    def _request(self, conn: socket.socket) -> tuple[int, int, int, int, int] | None:
        """The next request as ``(command, flags, handle, offset, length)``; None: goodbye."""
        header = conn.recv(28, socket.MSG_PEEK)
        if not header:
            raise EOFError
        if len(header) < 28:
            if conn.getblocking() is False:
                raise BlockingIOError
            header = _recv(conn, 28)
        else:
            header = _recv(conn, 28)
        magic, flags, cmd, handle, offset, length = struct.unpack(">IHHQQI", header)
        assert magic == REQUEST_MAGIC
        if cmd == CMD_DISC:
            return None
        if cmd == CMD_BLOCK_STATUS:
            self.statuses.append((offset, length))
            self.events.append(("status", offset, length))
        else:
            assert cmd == CMD_READ, cmd
            self.reads.append((offset, length))
            if flags & CMD_FLAG_DF:
                self.unfragmented.append((offset, length))
        return cmd, flags, handle, offset, length

    def _sent(self, request: tuple[int, int, int, int, int]) -> None:
        cmd, _, _, offset, length = request
        if cmd == CMD_READ:
            self.events.append(("read", offset, length))

    def _read(self, offset: int, length: int) -> bytes:
        """The bytes a read gets: misread where QEMU before 8.0 would (see ``copied``)."""
        data = self.data[offset : offset + length]
        c = self.cluster
        first, last = offset // c, (offset + length - 1) // c
        if not self.copied or first == last:
            return data
        out = bytearray(data)
        for i in range(first, last + 1):
            if i in self.saved:
                lo, hi = max(offset, i * c), min(offset + length, (i + 1) * c)
                out[lo - offset : hi - offset] = bytes(
                    b ^ 0xFF for b in data[lo - offset : hi - offset]
                )
        return bytes(out)

    def _status(self, handle: int, offset: int, length: int) -> list[bytes]:
        """The ``copied`` context's extents of the range: runs of saved and unsaved clusters."""
        if self.status_fail:
            return [self._error(handle)]
        c = self.cluster
        extents = []
        pos, end = offset, offset + length
        while pos < end:
            saved = pos // c in self.saved
            stop = min(end, (pos // c + 1) * c)
            while stop < end and ((stop // c) in self.saved) == saved:
                stop = min(end, stop + c)
            extents.append(struct.pack(">II", stop - pos, 1 if saved else 0))
            pos = stop
        body = struct.pack(">I", CONTEXT_ID) + b"".join(extents)
        head = struct.pack(
            ">IHHQI", STRUCTURED_MAGIC, FLAG_DONE, CHUNK_BLOCK_STATUS, handle, len(body)
        )
        return [head + body]

    @staticmethod
    def _error(handle: int) -> bytes:
        msg = b"injected"
        return (
            struct.pack(">IHHQI", STRUCTURED_MAGIC, FLAG_DONE, CHUNK_ERROR, handle, 6 + len(msg))
            + struct.pack(">IH", errno.EIO, len(msg))
            + msg
        )

    def _reply(
        self, cmd: int, flags: int, handle: int, offset: int, length: int, *, structured: bool
    ) -> list[bytes]:
        """The reply's pieces (one per chunk), each sent whole."""
        if cmd == CMD_BLOCK_STATUS:
            return self._status(handle, offset, length)
        failed = offset + length > len(self.data) or any(
            offset < s + n and s < offset + length for s, n in self.fail
        )
        if not structured:
            if failed:
                return [struct.pack(">IIQ", SIMPLE_MAGIC, errno.EIO, handle)]
            return [struct.pack(">IIQ", SIMPLE_MAGIC, 0, handle) + self._read(offset, length)]
        if failed:
            return [self._error(handle)]
        if flags & CMD_FLAG_DF:  # one data chunk, as QEMU sends it
            return [
                struct.pack(">IHHQI", STRUCTURED_MAGIC, FLAG_DONE, CHUNK_DATA, handle, 8 + length)
                + struct.pack(">Q", offset)
                + self._read(offset, length)
            ]
        chunks = []
        data = self._read(offset, length)
        for start, size, zero in self._extents(offset, length):
            if zero:
                chunks.append(
                    struct.pack(">IHHQI", STRUCTURED_MAGIC, 0, CHUNK_HOLE, handle, 12)
                    + struct.pack(">QI", start, size)
                )
            else:
                chunks.append(
                    struct.pack(">IHHQI", STRUCTURED_MAGIC, 0, CHUNK_DATA, handle, 8 + size)
                    + struct.pack(">Q", start)
                    + data[start - offset : start - offset + size]
                )
        chunks.append(struct.pack(">IHHQI", STRUCTURED_MAGIC, FLAG_DONE, CHUNK_NONE, handle, 0))
        return chunks

    def _extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(start, size, is_hole) pieces of a read: zero runs of hole_min or more are holes,
        data comes in pieces of at most ``chunk`` bytes."""
        end = offset + length
        pos = offset
        zeros = bytes(self.hole_min)
        while pos < end:
            if self.data[pos : pos + self.hole_min] == zeros[: min(self.hole_min, end - pos)]:
                rest = self.data[pos:end]
                stop = pos + len(rest) - len(rest.lstrip(b"\0"))
                if stop - pos >= self.hole_min or stop == end:
                    yield pos, stop - pos, True
                    pos = stop
                    continue
            stop = min(end, pos + self.chunk)
            yield pos, stop - pos, False
            pos = stop


def _recv(conn: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = conn.recv(n - len(out))
        if not got:
            raise EOFError
        out += got
    return bytes(out)
