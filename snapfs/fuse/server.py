"""The FUSE request loop over ``/dev/fuse``, on trio.

One task reads requests; there is only one reader, so the receive buffer is reused for every
request and nothing decoded from it outlives the dispatch of that request (async handlers get
plain ints, WRITE data is copied). Plain ``Operations`` methods run inline in the reader; the
async ones (read, fallocate, lseek) each run in a task of their own, at most ``max_background``
at once: the reader takes a slot before reading a request and an async request keeps it until
its reply is written, so a full house stops the reader instead of queueing without bound.
A READ is handed to ``ops.read`` with a ``ReadReply`` (snapfs.fuse.reply): the file system
answers it at once, through a ``ReplyPipe`` from another thread (no task, no slot: the kernel
bounds how many READs it sends at once, its own ``max_background`` for async reads and one per
blocked reader otherwise), or from a task of the server (``ReadReply.later``), which keeps the
reader's slot when it is started while the READ is dispatched.

An ``Intake`` (``FuseServer.intake``) lets a thread of the file system read the requests
instead (the splice data path's worker, snapfs.datapath): it answers READs there, without the
trio thread, and hands every other request (and READs it declines) to the trio thread, which
dispatches them as if it had read them itself. While an intake reads, the trio thread does not:
two readers of one /dev/fuse would both be woken for every request. Both may read for a moment
while it takes over or gives back, which the kernel allows (each request goes to one reader,
and its reply to the same descriptor).

Every reply the server writes is ONE ``os.writev`` of the header and the payload (a write to
/dev/fuse completes synchronously, and the kernel wants a whole reply per write). ENOENT from
that write means the request was interrupted meanwhile and is ignored. Replies may reach the
kernel in any order.

INTERRUPT cancels the cancel scope of the in-flight request with that ``unique``; a cancelled
request is answered EINTR. A ``FuseErrno`` from ops is answered with its errno; any other
exception is logged at ERROR and answered EIO, and the server keeps serving.

Only root may punch: FALLOCATE from any other uid (the request header's) is answered EPERM
before ops sees it, whatever the modes say and however the caller got a writable descriptor.
The mount is unmounted only while its path still leads to it (``kernel.unmount``'s ``expect``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import stat
import threading
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import trio

from snapfs.errors import FuseError
from snapfs.fuse import kernel
from snapfs.fuse import protocol as p
from snapfs.fuse.ops import (
    ROOT_INODE,
    Attr,
    DirEntry,
    FuseErrno,
    Operations,
)
from snapfs.fuse.reply import ReadReply
from snapfs.fuse.splice import ReplyPipe

log = logging.getLogger(__name__)

#: Largest request, in 4 KiB pages (FUSE_MAX_PAGES): 1 MiB reads and writes.
MAX_PAGES = 256
MAX_WRITE = MAX_PAGES * p.PAGE_SIZE
#: Requests the kernel may have in flight in the background, and how many async ops we run at
#: once; above the congestion threshold the kernel throttles readahead and async I/O.
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48

#: Names are cached 1 s: the tree of a snapshot does not change while mounted.
ENTRY_VALID = p.split_timeout(1.0)
#: Directory attributes are cached 1 s. Regular files get 0: st_blocks shrinks when a region is
#: punched or released, and a punch need not come through this mount, so ``stat`` always asks.
#: The cost is one GETATTR per stat; reads (direct I/O) never need attributes.
DIR_ATTR_VALID = p.split_timeout(1.0)
FILE_ATTR_VALID = p.split_timeout(0.0)

_INIT_FLAGS = (
    p.FUSE_ASYNC_READ
    | p.FUSE_BIG_WRITES
    | p.FUSE_PARALLEL_DIROPS
    | p.FUSE_MAX_PAGES
    | p.FUSE_DO_READDIRPLUS
)
# Deliberately not requested: FUSE_WRITEBACK_CACHE and FUSE_AUTO_INVAL_DATA (writes and
# invalidation must stay under the file system's control).

#: Requests the compiled part may read in one call: it returns earlier once the reading
#: thread has other work (Taker), so a large batch only spares the round trips to Python.
COMPILED_BATCH = 1024

_OUT_HEADER_SIZE = p.OUT_HEADER.size
_IN_HEADER_SIZE = p.IN_HEADER.size
_ENODEV_LIKE = (errno.ENODEV, errno.ECONNABORTED)

Handler = Callable[[int, int, memoryview], bool]


class Taker(Protocol):
    """Reads an intake's requests before it does (snapfs.fastpath): ``take(limit, wake,
    idle)`` reads up to ``limit`` of them, answers the READs it can (waiting for their data),
    and returns how many it answered, the bytes of every request it did not answer, and the
    errno that ended the connection (0 while it goes on). It reads no more requests once it
    has a batch to hand back or a descriptor in ``wake`` is readable (the reading thread's
    other work). With nothing in flight it returns, or with ``idle`` waits for the next
    request or for ``wake``: the caller must then make sure new work of its own makes a
    ``wake`` descriptor readable."""

    def take(
        self, limit: int, wake: tuple[int, ...], idle: bool = False, /
    ) -> tuple[int, list[bytes], int]: ...

    def close(self) -> None: ...


TakerFactory = Callable[[int], Taker | None]
"""Makes a Taker on a descriptor of /dev/fuse (the intake's own), or None."""

ThreadRead = Callable[[ReadReply, int, int, int, int], bool]
"""``read(reply, nodeid, fh, offset, size)`` in an intake's thread: answer the READ (True) or
leave it to the trio thread (False). A FuseErrno it raises is answered with its errno."""


def _attr_valid(a: Attr) -> tuple[int, int]:
    return FILE_ATTR_VALID if stat.S_ISREG(a.mode) else DIR_ATTR_VALID


class FuseServer:
    """Serves one ``Operations`` at ``mountpoint`` until the kernel lets go of it.

    Lifecycle: ``serve()`` mounts, answers INIT, reports started, and serves until the file
    system is unmounted (by anyone: ``umount``, ``unmount()``) or the kernel sends DESTROY;
    ``ops.destroy()`` runs at the end whatever happened. A server serves once.
    """

    def __init__(
        self,
        ops: Operations,
        mountpoint: str | os.PathLike[str],
        *,
        name: str = "snapfs",
        allow_other: bool = False,
        default_permissions: bool = False,
        max_background: int = MAX_BACKGROUND,
    ) -> None:
        self.ops = ops
        self.mountpoint = Path(mountpoint).absolute()
        self.name = name
        self.allow_other = allow_other
        self.default_permissions = default_permissions
        self.max_background = max_background
        #: Protocol minor agreed at INIT (0 until then).
        self.proto_minor = 0
        self._fd = -1
        self._started = False
        self._mounted = False  # True from mount(2) until the kernel reports the end
        #: The mount made, as mountinfo lists it (None until mounted): unmounts check it.
        self.mount: kernel.Mount | None = None
        self._uid = 0  # of the request being dispatched
        self._buf = bytearray(MAX_PAGES * p.PAGE_SIZE + p.PAGE_SIZE)
        self._slots = trio.Semaphore(max_background)
        self._inflight: dict[int, trio.CancelScope] = {}
        self._dirs: dict[int, list[DirEntry] | None] = {}
        self._next_dir_fh = 1
        self._nursery: trio.Nursery | None = None
        self._destroyed = False
        self._handlers: list[Handler] = self._build_handlers()
        self._dispatching: ReadReply | None = None  # the READ whose ops.read runs now
        self._token: trio.lowlevel.TrioToken | None = None
        self._intake: Intake | None = None  # reading the requests instead of the trio thread
        self._reading: trio.CancelScope | None = None  # the trio thread's wait for a request
        self._turn = trio.Event()  # set when the trio thread should look at _intake again
        self._ended = False  # the connection ended (unmounted, or DESTROY)
        self._forward_send, self._forward_recv = trio.open_memory_channel[bytes](math.inf)

    @property
    def mounted(self) -> bool:
        return self._mounted

    # --- lifecycle -------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Mount, answer INIT, call ``task_status.started()``, then serve until unmounted.

        Returns normally when the kernel ends the connection (unmount) or sends DESTROY. If it
        ends any other way (cancelled, an error), the connection is aborted and a plain unmount
        is tried; should that fail (busy), the dead mount stays visible, answering ENOTCONN,
        rather than leaving an empty directory where backup tools expect the tree.
        """
        if self._started:
            raise FuseError(f"the FUSE server for {self.mountpoint} was already started")
        self._started = True
        try:
            kernel.check_mountpoint(self.mountpoint)
            self._fd = kernel.open_device()
            await trio.to_thread.run_sync(self._mount)
            self._mounted = True
            os.set_blocking(self._fd, False)
            await self._init()
            # 1 MiB of readahead where files go through the page cache (the kernel's 128 KiB
            # would make eight requests of every MiB).
            if self.mount is not None and not kernel.set_readahead(self.mount, MAX_WRITE):
                log.debug("cannot raise the readahead of %s", self.mountpoint)
            self._token = trio.lowlevel.current_trio_token()
            task_status.started()
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._serve_forwarded)
                await self._serve_requests()
                # The connection is gone: replies of requests still running cannot be delivered.
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._forward_send.close()
            self._close(abort=self._mounted)
            if not self._destroyed:
                self._destroyed = True
                try:
                    self.ops.destroy()
                except Exception as err:  # a bug in ops must not hide how serving ended
                    log.error("ops.destroy() failed: %s", err)
                    log.debug("ops.destroy() failed", exc_info=True)

    def reply_pipe(self, size: int) -> ReplyPipe:
        """A pipe through which any thread can answer this server's READs (see
        ``snapfs.fuse.splice``); valid from ``task_status.started()`` on."""
        if self._fd < 0:
            raise FuseError(f"the FUSE server for {self.mountpoint} is not mounted")
        return ReplyPipe(self._fd, size)

    def intake(self, read: ThreadRead, taker: TakerFactory | None = None) -> Intake:
        """An ``Intake`` for another thread to read this server's requests (see the module);
        valid from ``task_status.started()`` on, until ``Intake.start`` it only exists."""
        if self._fd < 0 or self._token is None:
            raise FuseError(f"the FUSE server for {self.mountpoint} is not mounted")
        return Intake(self, self._fd, self._token, read, taker)

    async def unmount(self, *, lazy: bool = False) -> None:
        """Unmount from inside the program; ``serve()`` then returns. Raises FuseError ("busy")
        if a process still uses the tree and ``lazy`` is false."""
        if not self._mounted:
            raise FuseError(f"{self.mountpoint} is not mounted by this server")
        # In a thread: the kernel may wait for this very loop while unmounting.
        await trio.to_thread.run_sync(
            lambda: kernel.unmount(self.mountpoint, lazy=lazy, expect=self.mount)
        )

    def _mount(self) -> None:
        self.mount = kernel.mount(
            self._fd,
            self.mountpoint,
            name=self.name,
            allow_other=self.allow_other,
            default_permissions=self.default_permissions,
        )

    def _close(self, *, abort: bool) -> None:
        """Close the fd; if the mount is still there (we were cancelled or failed), closing
        aborts the connection and we try a plain unmount."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if abort:
            self._mounted = False
            try:
                kernel.unmount(self.mountpoint, expect=self.mount)
            except FuseError as err:
                log.warning("leaving dead mount %s in place: %s", self.mountpoint, err)

    # --- reading and writing /dev/fuse -----------------------------------------------------------

    async def _read_request(self) -> int:
        """Read one request into the buffer; its length, or 0 once the connection is gone."""
        fd = self._fd
        iov = [self._buf]
        while True:
            try:
                return os.readv(fd, iov)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
            except InterruptedError:
                pass
            except OSError as err:
                if err.errno in _ENODEV_LIKE:
                    return 0
                if err.errno == errno.ENOENT:  # the request was interrupted before we read it
                    continue
                raise FuseError(f"reading /dev/fuse failed: {err.strerror}") from err

    def _write(self, iov: Sequence[bytes | bytearray | memoryview]) -> None:
        try:
            os.writev(self._fd, iov)
        except OSError as err:
            # ENOENT: the request was interrupted and is gone; ENODEV: unmounted meanwhile.
            if err.errno != errno.ENOENT and err.errno not in _ENODEV_LIKE:
                log.error("writing a reply to /dev/fuse failed: %s", err)

    def write_reply(self, iov: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write one whole reply (ReadReply answers through this; trio thread)."""
        self._write(iov)

    def reply_err(self, unique: int, err: int) -> None:
        """Answer ``unique`` with an error (ReadReply answers through this; trio thread)."""
        self._reply_err(unique, err)

    def _reply(self, unique: int, payload: bytes = b"") -> None:
        self._write((p.OUT_HEADER.pack(_OUT_HEADER_SIZE + len(payload), 0, unique), payload))

    def _reply_err(self, unique: int, err: int) -> None:
        if not 0 < err < 1000:  # the kernel rejects anything else; answer something it takes
            err = errno.EIO
        self._write((p.OUT_HEADER.pack(_OUT_HEADER_SIZE, -err, unique),))

    def _reply_failure(self, unique: int, opcode: int, exc: Exception) -> None:
        if isinstance(exc, FuseErrno):
            self._reply_err(unique, exc.errno)
            return
        try:
            name = p.Opcode(opcode).name
        except ValueError:
            name = str(opcode)
        log.error("FUSE %s failed, answering EIO: %r", name, exc)
        log.debug("FUSE %s failed", name, exc_info=exc)
        self._reply_err(unique, errno.EIO)

    # --- INIT and the loop -----------------------------------------------------------------------

    async def _init(self) -> None:
        while True:
            n = await self._read_request()
            if n == 0:
                raise FuseError(f"the kernel closed the FUSE connection of {self.mountpoint}")
            _, opcode, unique, _, _, _, _, _, _ = p.IN_HEADER.unpack_from(self._buf)
            if opcode != p.Opcode.INIT:
                raise FuseError(f"the kernel sent opcode {opcode} before INIT")
            init = p.InitIn.unpack(memoryview(self._buf)[_IN_HEADER_SIZE:n])
            if init.major > p.KERNEL_VERSION:
                # The kernel offers a newer major: say which we speak; it sends INIT again.
                self._reply(
                    unique,
                    p.INIT_OUT.pack(
                        p.KERNEL_VERSION, p.KERNEL_MINOR_VERSION, 0, 0, 0, 0, 0, 0, 0, 0, 0
                    )[:8],
                )
                continue
            if init.major < p.KERNEL_VERSION:
                self._reply_err(unique, errno.EPROTO)
                raise FuseError(f"the kernel speaks FUSE {init.major}, snapfs needs 7")
            break
        self.proto_minor = min(init.minor, p.KERNEL_MINOR_VERSION)
        out = p.InitOut(
            major=p.KERNEL_VERSION,
            minor=self.proto_minor,
            max_readahead=min(init.max_readahead, MAX_WRITE),
            flags=_INIT_FLAGS & init.flags,
            max_background=self.max_background,
            congestion_threshold=min(CONGESTION_THRESHOLD, self.max_background),
            max_write=MAX_WRITE,
            time_gran=1,
            max_pages=MAX_PAGES,
        )
        self._reply(unique, out.pack())
        log.debug("FUSE INIT: kernel 7.%d, using 7.%d, flags %#x", init.minor, out.minor, out.flags)

    async def _serve_requests(self) -> None:
        """Read and dispatch until the connection ends (ENODEV) or DESTROY. While an intake
        reads the requests, wait until it gives them back or the connection ends."""
        slots = self._slots
        buf = self._buf
        read_request = self._read_request
        while not self._ended:
            if self._intake is not None:
                # Out of trio's epoll set, not just silenced: trio leaves a cancelled wait
                # registered for EPOLLERR|EPOLLHUP, and the kernel queues every request with a
                # wakeup that carries no event mask, so each one would wake this thread for
                # nothing while the intake reads them. No task waits on the descriptor here.
                trio.lowlevel.notify_closing(self._fd)
                await self._turn.wait()
                self._turn = trio.Event()
                continue
            # Also a checkpoint: lets the request tasks run between two reads.
            await slots.acquire()
            n = -1
            if self._intake is None:
                with trio.CancelScope() as self._reading:
                    n = await read_request()
                self._reading = None
            if n < 0:  # an intake took over meanwhile
                slots.release()
                continue
            if n == 0:
                self._mounted = False  # unmounted, by us or anyone
                slots.release()
                return
            if not self._dispatch(buf, n):
                return

    def _dispatch(self, buf: bytes | bytearray, n: int) -> bool:
        """Dispatch the request in ``buf[:n]``, holding a slot; False after DESTROY."""
        _, opcode, unique, nodeid, self._uid, _, _, _, _ = p.IN_HEADER.unpack_from(buf)
        body = memoryview(buf)[_IN_HEADER_SIZE:n]
        keep_slot = False
        try:
            if opcode == p.Opcode.DESTROY:
                self._mounted = False  # sent while the kernel unmounts
                self._ended = True
                self._reply(unique)
                return False
            handlers = self._handlers
            handler = handlers[opcode] if opcode < len(handlers) else self._op_enosys
            keep_slot = handler(unique, nodeid, body)
        except Exception as exc:
            self._reply_failure(unique, opcode, exc)
        finally:
            if not keep_slot:
                self._slots.release()
        return True

    async def _serve_forwarded(self) -> None:
        """Dispatch the requests an intake handed over, in the order it read them."""
        async with self._forward_recv:
            async for request in self._forward_recv:
                await self._slots.acquire()
                if not self._dispatch(request, len(request)):
                    self._end()

    # --- intakes (any thread calls these through the trio token) ---------------------------------

    def _forwarded(self, request: bytes) -> None:
        with contextlib.suppress(trio.ClosedResourceError):  # serving ended: nobody to answer
            self._forward_send.send_nowait(request)

    def _intake_started(self, intake: Intake) -> None:
        if self._intake is not None or self._ended:
            raise FuseError(f"the requests of {self.mountpoint} are read elsewhere already")
        self._intake = intake
        if self._reading is not None:
            self._reading.cancel()

    def _intake_stopped(self, intake: Intake) -> None:
        if self._intake is intake:
            self._intake = None
            self._turn.set()

    def _end(self) -> None:
        """The connection is gone (seen by an intake, or DESTROY forwarded)."""
        self._mounted = False
        self._ended = True
        self._turn.set()

    # --- async requests --------------------------------------------------------------------------

    def _spawn(
        self,
        unique: int,
        opcode: int,
        call: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        encode: Callable[[Any], bytes],
    ) -> bool:
        """Run ``call(*args)`` in a task of its own and reply ``encode(result)``. Takes over the
        reader's slot (returns True)."""
        assert self._nursery is not None
        scope = trio.CancelScope()
        self._inflight[unique] = scope
        self._nursery.start_soon(self._run_async, unique, opcode, scope, call, args, encode)
        return True

    async def _run_async(
        self,
        unique: int,
        opcode: int,
        scope: trio.CancelScope,
        call: Callable[..., Awaitable[Any]],
        args: tuple[Any, ...],
        encode: Callable[[Any], bytes],
    ) -> None:
        try:
            with scope:
                result = await call(*args)
            if scope.cancelled_caught:
                self._reply_err(unique, errno.EINTR)
            else:
                self._reply(unique, encode(result))
        except Exception as exc:
            self._reply_failure(unique, opcode, exc)
        finally:
            del self._inflight[unique]
            self._slots.release()

    def spawn_read(
        self, unique: int, reply: ReadReply, work: Callable[[], Awaitable[None]]
    ) -> None:
        """Run a READ's ``work()`` in a task (``ReadReply.later``). It keeps the reader's slot
        if it is started while its READ is dispatched (the handler then returns True)."""
        if self._fd < 0 or self._nursery is None:
            return  # the connection is gone: nobody to answer
        scope = trio.CancelScope()
        self._inflight[unique] = scope
        slot = reply is self._dispatching
        self._nursery.start_soon(self._run_read, unique, reply, scope, work, slot)

    async def _run_read(
        self,
        unique: int,
        reply: ReadReply,
        scope: trio.CancelScope,
        work: Callable[[], Awaitable[None]],
        slot: bool,
    ) -> None:
        try:
            with scope:
                await work()
            if scope.cancelled_caught and not reply.answered:
                reply.error(errno.EINTR)
            elif not reply.answered:
                raise RuntimeError("the READ's work ended without an answer")
        except Exception as exc:
            if not reply.answered:
                reply.error(exc.errno if isinstance(exc, FuseErrno) else errno.EIO)
            if not isinstance(exc, FuseErrno):
                log.error("FUSE READ failed, answering EIO: %r", exc)
                log.debug("FUSE READ failed", exc_info=exc)
        finally:
            del self._inflight[unique]
            if slot:
                self._slots.release()

    # --- handlers: (unique, nodeid, body) -> whether the request keeps the reader's slot -------

    def _build_handlers(self) -> list[Handler]:
        table: list[Handler] = [self._op_enosys] * (max(p.Opcode) + 1)
        for opcode, handler in {
            p.Opcode.LOOKUP: self._op_lookup,
            p.Opcode.FORGET: self._op_forget,
            p.Opcode.BATCH_FORGET: self._op_batch_forget,
            p.Opcode.GETATTR: self._op_getattr,
            p.Opcode.SETATTR: self._op_setattr,
            p.Opcode.OPEN: self._op_open,
            p.Opcode.RELEASE: self._op_release,
            p.Opcode.READ: self._op_read,
            p.Opcode.WRITE: self._op_write,
            p.Opcode.FLUSH: self._op_ok,
            p.Opcode.FSYNC: self._op_ok,
            p.Opcode.OPENDIR: self._op_opendir,
            p.Opcode.READDIR: self._op_readdir,
            p.Opcode.READDIRPLUS: self._op_readdirplus,
            p.Opcode.RELEASEDIR: self._op_releasedir,
            p.Opcode.STATFS: self._op_statfs,
            # ENOSYS makes the kernel stop asking and treat access() as granted.
            p.Opcode.ACCESS: self._op_enosys,
            p.Opcode.INTERRUPT: self._op_interrupt,
            p.Opcode.FALLOCATE: self._op_fallocate,
            p.Opcode.LSEEK: self._op_lseek,
        }.items():
            table[opcode] = handler
        return table

    def _op_enosys(self, unique: int, nodeid: int, body: memoryview) -> bool:
        self._reply_err(unique, errno.ENOSYS)
        return False

    def _op_ok(self, unique: int, nodeid: int, body: memoryview) -> bool:
        self._reply(unique)
        return False

    def _op_read(self, unique: int, nodeid: int, body: memoryview) -> bool:
        fh, offset, size, _, _, _, _ = p.READ_IN.unpack_from(body)
        reply = ReadReply(unique, self)
        self._dispatching = reply
        try:
            self.ops.read(nodeid, fh, offset, size, reply)  # what it raises, the loop answers
        finally:
            self._dispatching = None
        return reply.spawned  # a task took over the reader's slot

    def _op_fallocate(self, unique: int, nodeid: int, body: memoryview) -> bool:
        if self._uid != 0:
            self._reply_err(unique, errno.EPERM)
            return False
        fh, offset, length, mode, _ = p.FALLOCATE_IN.unpack_from(body)
        return self._spawn(
            unique, p.Opcode.FALLOCATE, self.ops.fallocate,
            (nodeid, fh, offset, length, mode), _encode_nothing,
        )  # fmt: skip

    def _op_lseek(self, unique: int, nodeid: int, body: memoryview) -> bool:
        fh, offset, whence, _ = p.LSEEK_IN.unpack_from(body)
        return self._spawn(
            unique, p.Opcode.LSEEK, self.ops.lseek,
            (nodeid, fh, offset, whence), p.LSEEK_OUT.pack,
        )  # fmt: skip

    def _op_interrupt(self, unique: int, nodeid: int, body: memoryview) -> bool:
        # No reply. A request that is not in flight any more (answered, or a plain op that ran
        # inline) needs nothing.
        (target,) = p.INTERRUPT_IN.unpack_from(body)
        scope = self._inflight.get(target)
        if scope is not None:
            scope.cancel()
        return False

    def _op_lookup(self, unique: int, nodeid: int, body: memoryview) -> bool:
        name = bytes(body[:-1])  # NUL-terminated
        attr = self.ops.lookup(nodeid, name)
        self._reply(unique, p.pack_entry_out(attr, ENTRY_VALID, _attr_valid(attr)))
        return False

    def _op_forget(self, unique: int, nodeid: int, body: memoryview) -> bool:
        (nlookup,) = p.FORGET_IN.unpack_from(body)
        self._forget(nodeid, nlookup)
        return False

    def _op_batch_forget(self, unique: int, nodeid: int, body: memoryview) -> bool:
        count, _ = p.BATCH_FORGET_IN.unpack_from(body)
        for ino, nlookup in p.FORGET_ONE.iter_unpack(
            body[p.BATCH_FORGET_IN.size : p.BATCH_FORGET_IN.size + count * p.FORGET_ONE.size]
        ):
            self._forget(ino, nlookup)
        return False

    def _forget(self, ino: int, nlookup: int) -> None:
        # FORGET has no reply, so a failure can only be logged.
        try:
            self.ops.forget(ino, nlookup)
        except Exception as exc:
            log.error("ops.forget(%d, %d) failed: %r", ino, nlookup, exc)
            log.debug("ops.forget failed", exc_info=exc)

    def _op_getattr(self, unique: int, nodeid: int, body: memoryview) -> bool:
        attr = self.ops.getattr(nodeid)
        self._reply(unique, p.pack_attr_out(attr, _attr_valid(attr)))
        return False

    def _op_setattr(self, unique: int, nodeid: int, body: memoryview) -> bool:
        valid, _, _, size, *_ = p.SETATTR_IN.unpack_from(body)
        # Only a size change reaches ops; modes, owners and times are ignored.
        attr = self.ops.setattr(nodeid, size) if valid & p.FATTR_SIZE else self.ops.getattr(nodeid)
        self._reply(unique, p.pack_attr_out(attr, _attr_valid(attr)))
        return False

    def _op_open(self, unique: int, nodeid: int, body: memoryview) -> bool:
        flags, _ = p.OPEN_IN.unpack_from(body)
        reply = self.ops.open(nodeid, flags)
        open_flags = (p.FOPEN_DIRECT_IO if reply.direct_io else 0) | (
            p.FOPEN_KEEP_CACHE if reply.keep_cache else 0
        )
        self._reply(unique, p.OPEN_OUT.pack(reply.fh, open_flags, 0))
        return False

    def _op_release(self, unique: int, nodeid: int, body: memoryview) -> bool:
        fh, _, _, _ = p.RELEASE_IN.unpack_from(body)
        self.ops.release(nodeid, fh)
        self._reply(unique)
        return False

    def _op_write(self, unique: int, nodeid: int, body: memoryview) -> bool:
        fh, offset, size, _, _, _, _ = p.WRITE_IN.unpack_from(body)
        data = bytes(body[p.WRITE_IN.size : p.WRITE_IN.size + size])
        written = self.ops.write(nodeid, fh, offset, data)
        self._reply(unique, p.WRITE_OUT.pack(written, 0))
        return False

    def _op_statfs(self, unique: int, nodeid: int, body: memoryview) -> bool:
        s = self.ops.statfs()
        self._reply(
            unique,
            p.STATFS_OUT.pack(
                s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize, 0
            ),
        )
        return False

    # Directories: the listing is taken once per open directory (at the read at offset 0) and
    # served from there, so READDIR continuations see one consistent listing. The offset of an
    # entry is its index + 1.

    def _op_opendir(self, unique: int, nodeid: int, body: memoryview) -> bool:
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = None
        self._reply(unique, p.OPEN_OUT.pack(fh, 0, 0))
        return False

    def _op_releasedir(self, unique: int, nodeid: int, body: memoryview) -> bool:
        fh, _, _, _ = p.RELEASE_IN.unpack_from(body)
        self._dirs.pop(fh, None)
        self._reply(unique)
        return False

    def _listing(self, nodeid: int, fh: int, offset: int) -> list[DirEntry]:
        listing = self._dirs.get(fh)
        if listing is None or offset == 0:
            # d_ino of ".." is not tracked (no parent links here); the kernel resolves ".."
            # itself and never looks it up, so only `ls -i` would show it.
            listing = [
                DirEntry(nodeid, b".", stat.S_IFDIR),
                DirEntry(ROOT_INODE, b"..", stat.S_IFDIR),
                *self.ops.readdir(nodeid),
            ]
            self._dirs[fh] = listing
        return listing

    def _op_readdir(self, unique: int, nodeid: int, body: memoryview) -> bool:
        fh, offset, size, _, _, _, _ = p.READ_IN.unpack_from(body)
        listing = self._listing(nodeid, fh, offset)
        out: list[bytes] = []
        used = 0
        for i in range(offset, len(listing)):
            e = listing[i]
            reclen = p.dirent_size(len(e.name))
            if used + reclen > size:
                break
            out.append(p.pack_dirent(e.ino, i + 1, e.name, p.dirent_type(e.mode)))
            used += reclen
        self._reply(unique, b"".join(out))
        return False

    def _op_readdirplus(self, unique: int, nodeid: int, body: memoryview) -> bool:
        fh, offset, size, _, _, _, _ = p.READ_IN.unpack_from(body)
        listing = self._listing(nodeid, fh, offset)
        out: list[bytes] = []
        used = 0
        for i in range(offset, len(listing)):
            e = listing[i]
            reclen = p.direntplus_size(len(e.name))
            # Checked before the lookup: the kernel counts a lookup for every entry it gets
            # with a nodeid, so ops must see exactly the entries that are sent.
            if used + reclen > size:
                break
            attr: Attr | None = None
            if e.name not in (b".", b".."):
                try:
                    attr = self.ops.lookup(nodeid, e.name)
                except FuseErrno:
                    attr = None  # gone meanwhile: list the name without attributes
            valid = _attr_valid(attr) if attr is not None else FILE_ATTR_VALID
            out.append(
                p.pack_direntplus(
                    attr, ENTRY_VALID, valid, e.ino, i + 1, e.name, p.dirent_type(e.mode)
                )
            )
            used += reclen
        self._reply(unique, b"".join(out))
        return False


def _encode_nothing(_: object) -> bytes:
    return b""


class Intake:
    """Reads a server's requests in a thread other than the trio thread (see the module).

    Lifecycle: ``FuseServer.intake`` makes it; ``start()`` (trio thread) makes the server stop
    reading; the owning thread polls ``fileno`` and calls ``read_some`` when it is readable;
    ``stop()`` (the reading thread, idempotent) gives the requests back to the server and closes the
    descriptor. ``read_some`` returns False once the connection is gone; the server has been
    told then, and the owner stops polling. One thread reads: the buffer is reused, and a READ
    gets plain ints before the next request overwrites it.
    """

    def __init__(
        self,
        server: FuseServer,
        fd: int,
        token: trio.lowlevel.TrioToken,
        read: ThreadRead,
        taker: TakerFactory | None = None,
    ) -> None:
        self._server = server
        self._token = token
        self._read = read
        # A descriptor of its own (the same open file: the kernel takes the replies of what it
        # reads through any of them), so a number reused after the server closed its own can
        # never be read here.
        self.fileno = os.dup(fd)
        #: What reads the requests first and answers the READs it can (snapfs.fastpath),
        #: made on this descriptor; None: every request is read here.
        self.compiled = None if taker is None else taker(self.fileno)
        self._buf = bytearray(MAX_PAGES * p.PAGE_SIZE + p.PAGE_SIZE)
        self._started = False
        self._stopped = False
        self._thread = -1  # the thread that reads
        #: Descriptors of the reading thread's other work: the compiled part returns once
        #: one is readable.
        self.wake: tuple[int, ...] = ()
        #: Requests read, and READs answered in this thread (for tests and the log).
        self.requests = 0
        self.reads = 0

    def start(self) -> None:
        """Take over reading from the server (trio thread)."""
        if self._stopped:
            raise FuseError("a stopped intake cannot start again")
        self._server._intake_started(self)
        self._started = True

    def stop(self) -> None:
        """Give the requests back to the server and close (the thread that reads; idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        if self.compiled is not None:
            self.compiled.close()
        os.close(self.fileno)
        self.fileno = -1
        if self._started:
            self._call(self._server._intake_stopped, self)

    # ReadReply answers through these. In the intake's thread: on its own descriptor (which
    # only that thread uses and closes). A READ whose answer comes later from the trio thread
    # (a failure of the data path) is answered through the server, as if it had read it.

    def write_reply(self, iov: Sequence[bytes | bytearray | memoryview]) -> None:
        if threading.get_ident() != self._thread:
            self._server.write_reply(iov)
            return
        try:
            os.writev(self.fileno, iov)
        except OSError as err:
            if err.errno != errno.ENOENT and err.errno not in _ENODEV_LIKE:
                log.error("writing a reply to /dev/fuse failed: %s", err)

    def reply_err(self, unique: int, err: int) -> None:
        if not 0 < err < 1000:
            err = errno.EIO
        self.write_reply((p.OUT_HEADER.pack(_OUT_HEADER_SIZE, -err, unique),))

    def spawn_read(
        self, unique: int, reply: ReadReply, work: Callable[[], Awaitable[None]]
    ) -> None:
        self._server.spawn_read(unique, reply, work)  # trio thread, like ReadReply.later

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn, *args)

    def read_some(self, limit: int, *, idle: bool = False) -> bool:
        """Read up to ``limit`` requests, without blocking (with ``idle``, the compiled part
        may wait for more until a descriptor in ``wake`` is readable, see Taker); False once
        the connection is gone."""
        self._thread = threading.get_ident()
        if self.compiled is not None:
            return self._read_compiled(limit, idle)
        fd = self.fileno
        iov = [self._buf]
        for _ in range(limit):
            try:
                n = os.readv(fd, iov)
            except BlockingIOError:
                return True
            except InterruptedError:
                continue
            except OSError as err:
                if err.errno == errno.ENOENT:  # interrupted before we read it
                    continue
                if err.errno not in _ENODEV_LIKE:
                    log.error("reading /dev/fuse failed: %s", err.strerror)
                self._call(self._server._end)
                return False
            if n == 0:
                self._call(self._server._end)
                return False
            self.requests += 1
            self._take(n)
        return True

    def _read_compiled(self, limit: int, idle: bool) -> bool:
        """``read_some`` through the compiled part: it answers what READs it can (waiting for
        their replies) and hands the rest back, which is taken here as if read here."""
        assert self.compiled is not None
        answered, back, ended = self.compiled.take(max(limit, COMPILED_BATCH), self.wake, idle)
        self.requests += answered + len(back)
        self.reads += answered
        buf = self._buf
        for request in back:
            n = len(request)
            buf[:n] = request
            self._take(n)
        if ended:
            if ended not in _ENODEV_LIKE:
                log.error("reading /dev/fuse failed: %s", os.strerror(ended))
            self._call(self._server._end)
            return False
        return True

    def _take(self, n: int) -> None:
        buf = self._buf
        _, opcode, unique, nodeid, _, _, _, _, _ = p.IN_HEADER.unpack_from(buf)
        if opcode == p.Opcode.READ:
            fh, offset, size, _, _, _, _ = p.READ_IN.unpack_from(buf, _IN_HEADER_SIZE)
            reply = ReadReply(unique, self)
            try:
                if self._read(reply, nodeid, fh, offset, size):
                    self.reads += 1
                    return
            except FuseErrno as err:
                if not reply.answered:
                    reply.error(err.errno)
                return
            except Exception as exc:
                log.error("FUSE READ failed, answering EIO: %r", exc)
                log.debug("FUSE READ failed", exc_info=exc)
                if not reply.answered:
                    reply.error(errno.EIO)
                return
            if reply.answered:
                return
        self._call(self._server._forwarded, bytes(buf[:n]))
