"""Blocking libnbd connections for threads: what ``snapfs copy`` reads QEMU's exports with and
writes restore points through (qemu-nbd).

A ``Pool`` opens at most ``clients`` connections to one export and lends one per request to
whichever thread asks; libnbd releases the GIL while it waits, so as many requests are in
flight as threads use the pool. Errors become the caller's error class, one line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import nbd

from snapfs.errors import SnapfsError
from snapfs.nbd import tuning
from snapfs.nbd.wire import STATE_DIRTY

#: How long a request waits for a free connection (the others' requests are in flight).
WAIT_TIMEOUT = 600.0
#: How long connecting to the server's socket may take, and then the NBD handshake.
CONNECT_TIMEOUT = 10.0
#: How long a block status request may wait for its answer (as in snapfs.nbd.client).
STATUS_TIMEOUT = 30.0
#: The largest write-zeroes request: QEMU's NBD server refuses 4 GiB and more.
MAX_ZERO = 1 << 30


class Pool:
    """Connections to one export on a unix socket (see the module's docstring)."""

    def __init__(
        self,
        socket: str,
        export: str = "",
        *,
        clients: int,
        what: str,
        error: Callable[[str], SnapfsError],
        tune: bool = False,
        contexts: Sequence[str] = (),
    ) -> None:
        self.socket = socket
        self.export = export
        self.what = what
        self.tune = tune
        self.contexts = tuple(contexts)
        self.error = error
        self._slots = threading.BoundedSemaphore(clients)
        self._free: list[nbd.NBD] = []
        self._all: list[nbd.NBD] = []
        self._lock = threading.Lock()

    def connect(self) -> None:
        """Open the first connection now (it raises what a later one would)."""
        with self.connection():
            pass

    def _open(self) -> nbd.NBD:
        h = nbd.NBD()
        try:
            # Every read fills its buffer or raises, and a failed read's buffer is never
            # looked at: libnbd's memset of each buffer before its read is wasted.
            h.set_pread_initialize(False)
            if self.export:
                h.set_export_name(self.export)
            for context in self.contexts:
                h.add_meta_context(context)
            self._connect(h)
            for context in self.contexts:
                if not h.can_meta_context(context):
                    raise self.error(f"{self.what} does not report {context!r}")
        except nbd.Error as err:
            raise self.error(f"connecting to {self.what}: {err}") from err
        except OSError as err:
            raise self.error(f"connecting to {self.what}: {err.strerror or err}") from err
        return h

    def _connect(self, h: nbd.NBD) -> None:
        """Connect ``h`` through a socket of our own and negotiate, each within
        CONNECT_TIMEOUT (a server that accepts and then says nothing must not hold a copy
        forever). With ``tune``, widen the server's end of it (snapfs.nbd.tuning): with the
        default send buffer QEMU stops after a few 64 KiB replies until the reader takes them,
        so it idles while the reader writes what it got."""
        sock = tuning.connect_unix(self.socket, CONNECT_TIMEOUT)
        try:
            # The duplicate only names the connection (its address, the server's pid); libnbd
            # owns the socket from here on and closes it with the handle.
            probe = sock.dup()
        except BaseException:
            sock.close()
            raise
        with probe:
            h.aio_connect_socket(sock.detach())
            deadline = time.monotonic() + CONNECT_TIMEOUT
            while h.aio_is_connecting():
                left = deadline - time.monotonic()
                if left <= 0:  # the handle closes the socket when it is freed
                    raise self.error(
                        f"connecting to {self.what}: no NBD handshake within {CONNECT_TIMEOUT:g} s"
                    )
                h.poll(max(1, int(left * 1000)))
            if not h.aio_is_ready():
                raise self.error(f"connecting to {self.what}: the NBD handshake failed")
            if self.tune:
                tuning.widen_server_sndbuf(probe, self.what)

    @contextlib.contextmanager
    def connection(self) -> Iterator[nbd.NBD]:
        """A connection for one request."""
        if not self._slots.acquire(timeout=WAIT_TIMEOUT):
            raise self.error(f"{self.what} did not answer in {WAIT_TIMEOUT:.0f} s")
        try:
            with self._lock:
                h = self._free.pop() if self._free else None
            if h is None:
                h = self._open()
                with self._lock:
                    self._all.append(h)
            try:
                yield h
            except BaseException:
                self._abort(h)
                raise
            with self._lock:
                self._free.append(h)
        finally:
            self._slots.release()

    def _abort(self, h: nbd.NBD) -> None:
        """Drop a connection whose request failed, cutting its socket: requests may still be
        in flight (a server that stopped answering), and a disconnect in ``close`` would wait
        for their replies. libnbd closes the socket when it frees the handle."""
        with self._lock:
            self._all.remove(h)
        with (
            contextlib.suppress(OSError, nbd.Error),
            socket.socket(fileno=os.dup(h.aio_get_fd())) as sock,
        ):
            sock.shutdown(socket.SHUT_RDWR)

    def size(self) -> int:
        with self.connection() as h:
            return int(h.get_size())

    def pread(self, length: int, offset: int) -> bytearray:
        """``length`` bytes at ``offset``."""
        try:
            with self.connection() as h:
                data: bytearray = h.pread(length, offset)
                return data
        except nbd.Error as err:
            raise self.error(f"reading {self.what} at {offset}: {err}") from err

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        try:
            with self.connection() as h:
                h.pwrite(data, offset)
        except nbd.Error as err:
            raise self.error(f"writing {self.what} at {offset}: {err}") from err

    def zero(self, length: int, offset: int) -> None:
        """Make the range read as zeros, whatever a backing file holds there."""
        try:
            with self.connection() as h:
                while length:
                    n = min(length, MAX_ZERO)
                    h.zero(n, offset)
                    offset += n
                    length -= n
        except nbd.Error as err:
            raise self.error(f"zeroing {self.what} at {offset}: {err}") from err

    def flush(self) -> None:
        try:
            with self.connection() as h:
                h.flush()
        except nbd.Error as err:
            raise self.error(f"flushing {self.what}: {err}") from err

    def close(self) -> None:
        """Disconnect every connection (libnbd frees a handle with its last reference)."""
        with self._lock:
            handles, self._all, self._free = self._all, [], []
        for h in handles:
            with contextlib.suppress(nbd.Error):
                h.shutdown()


def dirty_ranges(h: nbd.NBD, context: str, offset: int, length: int) -> list[tuple[int, int]]:
    """The ``(offset, length)`` pieces of ``[offset, offset + length)`` whose flags in
    ``context`` (a qemu:dirty-bitmap negotiated on ``h``) have the dirty bit set. Other
    requests may be in flight on ``h``: their replies wait to be retired. Each answer within
    STATUS_TIMEOUT; raises nbd.Error, or OSError for a late or malformed answer."""
    found: list[tuple[int, int]] = []
    end = offset + length
    pos = offset
    got: list[tuple[int, list[int]]] = []

    def extent(meta: str, start: int, entries: list[int], err: object) -> int:
        if meta == context:
            got.append((start, list(entries)))
        return 0

    while pos < end:
        got.clear()
        cookie = h.aio_block_status(end - pos, pos, extent)
        deadline = time.monotonic() + STATUS_TIMEOUT
        while not h.aio_command_completed(cookie):
            left = deadline - time.monotonic()
            if left <= 0:
                raise OSError(errno.ETIMEDOUT, f"no block status within {STATUS_TIMEOUT:g} s")
            h.poll(max(1, int(left * 1000)))
        if not got or not got[0][1]:
            raise OSError(errno.EPROTO, f"no {context!r} extents at {pos}")
        start, entries = got[0]
        for n, flags in zip(entries[0::2], entries[1::2], strict=True):
            if flags & STATE_DIRTY and start < end:
                found.append((start, min(n, end - start)))
            start += n
        if start <= pos:
            raise OSError(errno.EPROTO, f"block status at {pos} does not go on")
        pos = start
    return found


class SavedClusters:
    """The copy-before-write clusters (``size`` bytes) known to be saved: a set that only
    grows, as a saved cluster stays saved (see snapfs.qmp.DiskState.copied)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._known: set[int] = set()

    def whole(self, offset: int, length: int) -> bool:
        """Whether ``[offset, offset + length)`` spans clusters and none of them is known to
        be saved: it may be read in one request, then checked with ``dirty_ranges``."""
        c = self.size
        first, last = offset // c, (offset + length - 1) // c
        known = self._known
        return first != last and not (known and any(i in known for i in range(first, last + 1)))

    def note(self, ranges: list[tuple[int, int]]) -> None:
        """Remember the clusters of these ``(offset, length)`` ranges as saved."""
        c = self.size
        for start, length in ranges:
            self._known.update(range(start // c, (start + length - 1) // c + 1))
