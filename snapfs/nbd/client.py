"""The only importer of libnbd: reads, block status and trim on one NBD export, driven by trio.

One :class:`NBDClient` owns one libnbd handle and one connection. libnbd's asynchronous API is
driven from the trio thread, with no thread per call:

* a *reader* task waits for the socket to become readable whenever libnbd wants to read (after
  the handshake, always: replies may arrive at any time) and calls ``aio_notify_read``;
* a *writer* task sleeps until somebody sees libnbd wanting to write (a request that did not fit
  in the socket buffer, or the handshake), then waits for writability and calls
  ``aio_notify_write`` until libnbd no longer wants to write.

Issuing a command (``aio_pread`` and friends) runs libnbd's state machine synchronously: the
request is usually sent at once. If it is not, the issuer pokes the writer. Replies are read by
the reader; a reply can also free the state machine to send queued requests, so the reader pokes
the writer too. The writer is a task of its own rather than the issuer, so a cancelled issuer
can never strand a half-sent request. Both tasks look at ``aio_get_direction`` again right
before notifying, because the other task may have moved the state machine meanwhile (there is no
await between the check and the call, so the check holds).

Completion callbacks run synchronously inside ``aio_notify_*`` (or inside the ``aio_*`` call) on
the trio thread; they record the result, set a :class:`trio.Event` and return 1, which retires
the command.

The socket is watched through a ``dup`` of libnbd's descriptor: libnbd closes its own descriptor
when the connection dies, inside a notify call, and trio must never watch a descriptor that is
closed under it (or reused by another file).

Everything here runs on one trio thread; none of it is thread-safe.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final

import nbd
import trio

from snapfs.errors import NBDError

log = logging.getLogger(__name__)

_READ: Final = nbd.AIO_DIRECTION_READ
_WRITE: Final = nbd.AIO_DIRECTION_WRITE
# The NBD protocol guarantees 32 MiB payloads when the server states no maximum.
_DEFAULT_MAX_REQUEST: Final = 32 * 1024 * 1024
# Counts of trim and block status are 32-bit on the wire; stay aligned well below that.
_MAX_COUNT: Final = 2**31
# Errnos with which libnbd fails commands of a connection that died.
_CONNECTION_LOST: Final = frozenset(
    {errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNRESET, errno.EPIPE}
)
# How long QEMU may take for the NBD handshake, and for one block status request of the walk
# that builds a view (it reads the image's metadata: slow storage can take seconds). A stopped
# or hung QEMU fails the mount with an NBDError instead of keeping it waiting. Reads have no
# timeout: like a disk's, they wait for QEMU (a process reading can be interrupted).
CONNECT_TIMEOUT: Final = 10.0
STATUS_TIMEOUT: Final = 30.0

Extent = tuple[int, int, int]
"""``(offset, length, flags)``; the flags' meaning depends on the metadata context."""


class Extents:
    """One reply's extents of one context in bulk: where the first starts, then every
    extent's length and flags."""

    __slots__ = ("flags", "lengths", "start")

    def __init__(self, start: int, lengths: list[int], flags: list[int]) -> None:
        self.start = start
        self.lengths = lengths
        self.flags = flags

    @property
    def end(self) -> int:
        return self.start + sum(self.lengths)

    def __iter__(self) -> Iterator[Extent]:
        pos = self.start
        for length, flags in zip(self.lengths, self.flags, strict=True):
            yield pos, length, flags
            pos += length

    def selected(self, mask: int) -> tuple[list[int], list[int]]:
        """Starts and lengths of the extents with any of the ``mask`` bits set, in bulk."""
        starts = list(itertools.accumulate(self.lengths[:-1], initial=self.start))
        keep = [f & mask for f in self.flags]
        return list(itertools.compress(starts, keep)), list(itertools.compress(self.lengths, keep))


class _Op:
    """One command in flight. It keeps the buffer alive until libnbd is done with it.

    ``done`` is set exactly once, by libnbd's completion callback or by the client when the
    connection is lost or closed; the first result wins.
    """

    __slots__ = ("done", "error", "extents", "keep", "pending", "reason")

    def __init__(self, pending: set[_Op], keep: Any = None) -> None:
        # ``pending`` is the client's set of ops in flight (not the client: libnbd holds this
        # op through the callback, and must not keep the handle alive through it).
        self.pending = pending
        self.keep = keep
        self.done = trio.Event()
        pending.add(self)
        self.error = 0
        self.reason = ""
        self.extents: list[Extent] | None = None

    def complete(self, err: Any) -> int:
        # ``err`` is a ctypes.c_int only valid during the callback. Never raise in here: the
        # binding would only print the exception.
        if not self.done.is_set():
            self.error = err.value
            self.done.set()
            self.pending.discard(self)
        return 1  # retire the command

    def fail(self, error: int, reason: str) -> None:
        if not self.done.is_set():
            self.error = error
            self.reason = reason
            self.done.set()
            self.pending.discard(self)


class NBDClient:
    """One libnbd connection to one export, driven by trio (no thread per call).

    Open it with :meth:`open` (an async context manager that owns the driver tasks). All
    methods may be called concurrently from many tasks; requests are pipelined on the one
    connection. Once the connection is lost every pending and later call raises
    :class:`NBDError` with ``EIO``.
    """

    def __init__(self, handle: Any, fd: int, socket_path: str, export: str) -> None:
        # Private: use open(). ``fd`` is our own dup of libnbd's socket.
        self._h: Any = handle
        self._fd = fd
        self._name = f"{socket_path}:{export}"
        self._ops: set[_Op] = set()
        # Ops of cancelled reads, by id() of the caller's buffer: libnbd may still write into
        # that buffer, so a later read into the same buffer first waits for them.
        self._orphans: dict[int, list[_Op]] = {}
        # Set when libnbd may want to write; the writer task clears it.
        self._want_write = trio.Event()
        # Set (and replaced) whenever the state machine may have moved and somebody waits.
        self._progress = trio.Event()
        self._dead: str | None = None
        self._lost = trio.Event()  # set with _dead
        self._closing = False
        self._ready = False  # the handshake completed once
        self._closed = False
        self.size = 0
        self.can_trim = False
        self._max_request = _DEFAULT_MAX_REQUEST

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(
        cls, socket_path: str, export: str, *, meta_contexts: Sequence[str] = ()
    ) -> AsyncIterator[NBDClient]:
        """Connect, run the driver tasks while the block runs, then close the connection.

        Exceptions of the block (and NBDError of the connect) come out as they are, not
        wrapped in an exception group: the driver tasks never raise.
        """
        single: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                client = await cls.connect(
                    socket_path, export, meta_contexts=meta_contexts, nursery=nursery
                )
                try:
                    yield client
                finally:
                    with trio.CancelScope(shield=True):
                        await client.close()
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            if len(group.exceptions) != 1:
                raise
            single = group.exceptions[0]
        if single is not None:
            # Raised outside the handler, so it does not get the group as its context.
            raise single

    @classmethod
    async def connect(
        cls,
        socket_path: str,
        export: str,
        *,
        meta_contexts: Sequence[str] = (),
        nursery: trio.Nursery,
    ) -> NBDClient:
        """Connect to ``export`` on the unix socket and start the driver tasks in ``nursery``.

        The caller must :meth:`close` the client before the nursery ends (``open`` does).
        """
        h = nbd.NBD()
        try:
            h.set_handle_name(f"snapfs:{export}")
            h.set_export_name(export)
            # Buffers are ours and never read after a failed read: skip libnbd's memset.
            h.set_pread_initialize(False)
            for ctx in meta_contexts:
                h.add_meta_context(ctx)
            h.aio_connect_unix(socket_path)
            fd = os.dup(h.aio_get_fd())
        except nbd.Error as err:
            raise NBDError(
                f"cannot connect to NBD export {export!r} at {socket_path}: {err.string}",
                err.errnum or errno.EIO,
            ) from err
        client = cls(h, fd, socket_path, export)
        nursery.start_soon(client._reader)
        nursery.start_soon(client._writer)
        client._poke()
        try:
            with trio.move_on_after(CONNECT_TIMEOUT) as scope:
                while not h.aio_is_ready():
                    if client._dead is not None:
                        raise NBDError(
                            f"cannot connect to NBD export {export!r} at {socket_path}: "
                            f"{client._dead}",
                            errno.EIO,
                        )
                    await client._progress.wait()
            if scope.cancelled_caught:
                raise NBDError(
                    f"cannot connect to NBD export {export!r} at {socket_path}: no handshake "
                    f"within {CONNECT_TIMEOUT:g}s (QEMU stopped?)",
                    errno.ETIMEDOUT,
                )
            client._ready = True
            client.size = h.get_size()
            client.can_trim = bool(h.can_trim())
            client._max_request = h.get_block_size(nbd.SIZE_MAXIMUM) or _DEFAULT_MAX_REQUEST
        except BaseException:
            with trio.CancelScope(shield=True):
                await client.close()
            raise
        log.debug("connected to %s: %d bytes, trim=%s", client._name, client.size, client.can_trim)
        return client

    async def close(self) -> None:
        """Disconnect politely if possible, fail what is still pending, free the handle.

        Idempotent. Waits at most a second for the server to acknowledge the disconnect.
        """
        if self._closed:
            return
        h = self._h
        self._closing = True
        if self._dead is None and self._ready:
            try:
                h.aio_disconnect(0)
                self._poke()
                with trio.move_on_after(1):
                    while self._dead is None:
                        await self._progress.wait()
            except nbd.Error as err:
                log.debug("disconnect from %s: %s", self._name, err)
        self._closed = True
        self._lose("the NBD client was closed", errno.EIO)
        trio.lowlevel.notify_closing(self._fd)
        os.close(self._fd)
        self._fd = -1
        del h
        # libnbd closes the handle in NBD.__del__: drop the last reference.
        self._h = None

    @property
    def fileno(self) -> int:
        """A descriptor of the connection's socket (-1 once closed)."""
        return self._fd

    def expect_loss(self) -> None:
        """The server is about to close the connection (its export goes): losing it then is
        what was meant, not worth a warning."""
        self._closing = True

    @property
    def alive(self) -> bool:
        """False once the connection was lost or closed: every call would raise NBDError."""
        return self._dead is None

    async def wait_lost(self) -> None:
        """Return once the connection is lost (the server went away) or closed."""
        await self._lost.wait()

    # -- the driver --------------------------------------------------------------------------

    def _poke(self) -> None:
        """Wake the driver task(s) that libnbd's current direction needs; call after any
        libnbd call that can move the state machine."""
        if self._dead is not None:
            return
        h = self._h
        if h.aio_is_dead() or h.aio_is_closed():
            self._lose(self._death_reason(), errno.EIO)
            return
        if h.aio_get_direction() & _WRITE:
            self._want_write.set()
        if self._progress.statistics().tasks_waiting:
            self._progress.set()
            self._progress = trio.Event()

    def _death_reason(self) -> str:
        h = self._h
        if not self._ready:
            return "the handshake failed"
        if h.aio_is_closed():
            return "the NBD connection was closed"
        return "the NBD server went away"

    def _lose(self, reason: str, error: int) -> None:
        """The connection is gone: fail every pending op and wake every waiter."""
        if self._dead is None:
            self._dead = reason
            if self._ready and not self._closing:
                log.warning("NBD connection to %s lost: %s", self._name, reason)
        for op in list(self._ops):
            op.fail(error, reason)
        self._orphans.clear()
        self._lost.set()
        self._want_write.set()
        self._progress.set()

    async def _reader(self) -> None:
        h = self._h
        while self._dead is None:
            if h.aio_get_direction() & _READ:
                try:
                    await trio.lowlevel.wait_readable(self._fd)
                except trio.ClosedResourceError:
                    return
                if self._dead is not None:
                    return
                if h.aio_get_direction() & _READ:
                    self._notify(h.aio_notify_read)
            else:
                await self._progress.wait()
            self._poke()

    async def _writer(self) -> None:
        h = self._h
        while self._dead is None:
            if h.aio_get_direction() & _WRITE:
                try:
                    await trio.lowlevel.wait_writable(self._fd)
                except trio.ClosedResourceError:
                    return
                if self._dead is not None:
                    return
                if h.aio_get_direction() & _WRITE:
                    self._notify(h.aio_notify_write)
            else:
                await self._want_write.wait()
                self._want_write = trio.Event()
            self._poke()

    def _notify(self, notify: Any) -> None:
        try:
            notify()
        except nbd.Error as err:
            # A dead connection makes the notify fail; anything else leaves the state machine
            # in an unknown state, so treat it the same way.
            reason = f"{self._death_reason()}: {err.string}"
            if not self._h.aio_is_dead():
                log.error("libnbd state machine failed on %s: %s", self._name, err)
            self._lose(reason, errno.EIO)

    # -- commands ----------------------------------------------------------------------------

    def _check(self) -> None:
        if self._dead is not None:
            raise NBDError(f"NBD export {self._name}: {self._dead}", errno.EIO)

    def _issue_failed(self, what: str, err: nbd.Error) -> NBDError:
        self._poke()
        if self._dead is not None:
            return NBDError(f"{what} on {self._name}: {self._dead}", errno.EIO)
        return NBDError(f"{what} on {self._name}: {err.string}", err.errnum or errno.EIO)

    async def _wait(self, op: _Op, what: str) -> None:
        """Wait for ``op``; raise NBDError with the server's errno if it failed."""
        await op.done.wait()
        if op.error:
            if op.reason:
                raise NBDError(f"{what} on {self._name}: {op.reason}", op.error)
            if op.error in _CONNECTION_LOST:
                raise NBDError(f"{what} on {self._name}: the NBD server went away", errno.EIO)
            raise NBDError(f"{what} on {self._name}: {os.strerror(op.error)}", op.error)

    def _start_read(self, buf: bytearray, view: memoryview, offset: int) -> _Op:
        # The op keeps both the view libnbd writes through and the caller's buffer alive (the
        # latter so that id(buf) stays unique while the op is an orphan).
        op = _Op(self._ops, (view, buf))
        try:
            self._h.aio_pread(nbd.Buffer.from_buffer(view), offset, op.complete)
        except nbd.Error as err:
            op.fail(errno.EIO, "not issued")
            raise self._issue_failed(f"read of {len(view)} bytes at {offset}", err) from err
        return op

    async def pread_into(
        self, buf: bytearray, offset: int, length: int | None = None, *, confine: int = 0
    ) -> None:
        """Read ``length`` (default ``len(buf)``) bytes at ``offset`` into the start of ``buf``.

        No allocation per read: libnbd writes straight into ``buf``. Requests larger than the
        server's maximum are split and pipelined, and so are requests that would cross a
        multiple of ``confine`` (> 0). Raises NBDError with the server's errno (EINVAL outside a
        copy-before-write access bitmap, EIO when the snapshot broke or the server went away).
        If the caller is cancelled, libnbd may still write into ``buf`` until the command
        completes; a later ``pread_into`` on the same buffer waits for that first.
        """
        self._check()
        if length is None:
            length = len(buf)
        if length == 0:
            return
        if self._orphans:
            for old in self._orphans.pop(id(buf), ()):
                await old.done.wait()
        view = memoryview(buf)
        ops: list[_Op] = []
        try:
            pos = 0
            while pos < length:
                end = min(pos + self._max_request, length)
                if confine:
                    end = min(end, (offset + pos) // confine * confine + confine - offset)
                ops.append(self._start_read(buf, view[pos:end], offset + pos))
                pos = end
        except NBDError:
            self._orphan(buf, ops)
            raise
        self._poke()
        try:
            for op in ops:
                await self._wait(op, f"read of {length} bytes at {offset}")
        except BaseException:
            self._orphan(buf, ops)
            raise

    def _orphan(self, buf: bytearray, ops: list[_Op]) -> None:
        """Remember reads into ``buf`` still in flight after their caller gave up."""
        pending = [op for op in ops if not op.done.is_set()]
        if pending:
            if len(self._orphans) > 64:
                self._orphans = {
                    k: v for k, v in self._orphans.items() if not all(op.done.is_set() for op in v)
                }
            self._orphans.setdefault(id(buf), []).extend(pending)

    async def trim(self, offset: int, length: int) -> None:
        """Discard ``length`` bytes at ``offset`` (in chunks the protocol allows)."""
        self._check()
        if not self.can_trim:
            raise NBDError(f"NBD export {self._name} does not support trim", errno.EOPNOTSUPP)
        ops: list[_Op] = []
        try:
            for pos in range(offset, offset + length, _MAX_COUNT):
                count = min(_MAX_COUNT, offset + length - pos)
                op = _Op(self._ops)
                ops.append(op)
                try:
                    self._h.aio_trim(count, pos, op.complete)
                except nbd.Error as err:
                    op.fail(errno.EIO, "not issued")
                    raise self._issue_failed(f"trim of {count} bytes at {pos}", err) from err
        finally:
            self._poke()
        for op in ops:
            await self._wait(op, f"trim of {length} bytes at {offset}")

    def can_meta_context(self, name: str) -> bool:
        """Whether the server agreed to report metadata context ``name``."""
        self._check()
        return bool(self._h.can_meta_context(name))

    async def block_status(self, offset: int, length: int, context: str) -> list[Extent]:
        """Extents of ``context`` from ``offset``, covering as much as the server returned.

        At least one extent; the last one may end before ``offset + length`` (callers loop,
        see :func:`extents`) or, as the protocol allows, after it.
        """
        return (await self.block_status_all(offset, length, (context,)))[context]

    async def block_status_raw(
        self, offset: int, length: int, contexts: Sequence[str]
    ) -> dict[str, Extents]:
        """One block status request: each context's extents as the server sent them, in bulk
        (``Extents``: no Python object per extent).

        QEMU computes the contexts one after the other, in the order the export lists them
        (base:allocation first, then its bitmaps).
        """
        self._check()
        for context in contexts:
            if not self._h.can_meta_context(context):
                raise NBDError(
                    f"NBD export {self._name} does not report {context!r}", errno.EOPNOTSUPP
                )
        count = min(length, _MAX_COUNT, self.size - offset)
        if count <= 0 or offset < 0:
            raise NBDError(
                f"block status of {length} bytes at {offset} is outside "
                f"{self._name} ({self.size} bytes)",
                errno.EINVAL,
            )
        op = _Op(self._ops)
        found: dict[str, Extents] = {}

        def extent(metacontext: str, start: int, entries: list[int], err: Any) -> int:
            if metacontext in contexts and metacontext not in found and len(entries) >= 2:
                found[metacontext] = Extents(start, entries[0::2], entries[1::2])
            return 0

        try:
            self._h.aio_block_status(count, offset, extent, op.complete)
        except nbd.Error as err:
            op.fail(errno.EIO, "not issued")
            raise self._issue_failed(f"block status at {offset}", err) from err
        self._poke()
        with trio.move_on_after(STATUS_TIMEOUT) as scope:
            await self._wait(op, f"block status of {count} bytes at {offset}")
        if scope.cancelled_caught:
            raise NBDError(
                f"block status of {count} bytes at {offset} on {self._name}: no answer within "
                f"{STATUS_TIMEOUT:g}s (QEMU stopped?)",
                errno.ETIMEDOUT,
            )
        for context in contexts:
            got = found.get(context)
            if got is None or got.lengths[0] <= 0:
                raise NBDError(
                    f"block status at {offset} on {self._name}: the server returned "
                    f"no {context!r} extents",
                    errno.EPROTO,
                )
        return found

    async def block_status_all(
        self, offset: int, length: int, contexts: Sequence[str]
    ) -> dict[str, list[Extent]]:
        """``block_status_raw`` as ``(offset, length, flags)`` tuples."""
        raw = await self.block_status_raw(offset, length, contexts)
        return {context: list(got) for context, got in raw.items()}


async def extents(
    client: NBDClient, context: str, offset: int = 0, end: int | None = None, chunk: int = 1 << 30
) -> AsyncIterator[Extent]:
    """All extents of ``context`` in ``[offset, end)`` (default: to the end of the export).

    Adjacent extents with equal flags are merged, extents are clipped to the range, and only
    one block status reply is held at a time, so this walks a 1 TiB disk with millions of
    extents in bounded memory.
    """
    if end is None:
        end = client.size
    cur: Extent | None = None
    pos = offset
    while pos < end:
        batch = await client.block_status(pos, min(chunk, end - pos), context)
        for start, length, flags in batch:
            if start >= end:
                break
            length = min(length, end - start)
            if cur is not None and cur[2] == flags and cur[0] + cur[1] == start:
                cur = (cur[0], cur[1] + length, flags)
            else:
                if cur is not None:
                    yield cur
                cur = (start, length, flags)
            pos = start + length
    if cur is not None:
        yield cur
