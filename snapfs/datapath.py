"""The splice data path: snapshot bytes from QEMU's NBD socket into /dev/fuse, never in Python.

One :class:`DiskReader` per disk owns a worker thread, an :class:`~snapfs.nbd.NBDStream` and
a few pipes. For a READ the trio thread checks the range against the tree (as for every read)
and submits a job; the worker sends the NBD request, splices the payload of each data chunk of
the reply from the socket into the request's pipe (holes become zeros written into it), and
then splices header plus payload into /dev/fuse (:mod:`snapfs.fuse.splice`).
The kernel copies the bytes once, into the reader's pages; libnbd's path copies them twice and
wakes the trio thread for every socket chunk. Workers of different disks run in parallel (the
GIL is released in every syscall).

Read-ahead: a job may name ranges that follow it if the trio thread found them readable when
it submitted the job (a sequential reader). The worker asks QEMU for those it has not asked for
yet right away (as far as :class:`SharedDepth` allows), before it sends the current reply,
keeps their payloads in pipes of their own, and takes them off the socket while it waits for
the next job. QEMU writes whole replies into the socket at once when the stream could widen
its send buffer (:data:`~snapfs.nbd.SERVER_SNDBUF`); where it could not, QEMU puts only
~200 KiB into the socket before it waits for us. A later job for
exactly the first such range uses it. That job passed the tree's checks at its own time, so a
range punched meanwhile is refused as without read-ahead (the snapshot's bytes never change,
and punching only shrinks the readable set). A read-ahead that fails or is no longer wanted is
dropped.

Whenever bytes do not fit the splice way (a full pipe, chunks out of order, more requests in
flight than pipes), that request continues in a buffer and its reply is written by copying.

Errors: an NBD error chunk fails that job with the server's errno (a broken snapshot); a lost
connection or a protocol violation fails the job and every later one with
:class:`~snapfs.nbd.StreamLost`. Callers then read the libnbd way, which reports what happened.

Threads: ``submit``/``read``/``close`` on the trio thread; everything else in the worker. Jobs
cross over through a ``queue.SimpleQueue``; failures come back with ``TrioToken.run_sync_soon``.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import struct
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final

import trio

from snapfs.errors import NBDError, SnapfsError
from snapfs.fuse.splice import Pipe, ReplyPipe
from snapfs.nbd import (
    CHUNK_ERROR_BIT,
    CHUNK_FLAG_DONE,
    CHUNK_NONE,
    CHUNK_OFFSET_DATA,
    CHUNK_OFFSET_HOLE,
    NBDStream,
    StreamLost,
)

log = logging.getLogger(__name__)

#: Bytes a pipe must take: one whole 1 MiB READ reply (and the unprivileged maximum).
PIPE_SIZE: Final = 1 << 20
#: Payload pipes: a request, its read-aheads (two, see fs.DIRECT_READ_AHEAD), and the two
#: read-aheads of the job before if this job dropped them while in flight (any earlier ones
#: are done by then: QEMU answers in order, and a job waits for its reply). Beyond that,
#: payloads go into buffers. An idle pipe costs no payload memory.
PAYLOAD_PIPES: Final = 5
#: One read of this many bytes when the first reader of a QEMU starts, its bytes thrown away
#: (see SharedDepth.warmed_up). Why: QEMU's NBD server allocates every request's buffer with
#: posix_memalign (4 KiB aligned), and glibc 2.36 can get stuck mapping each 1 MiB buffer
#: anew: the dynamic mmap threshold it raises when such a buffer is freed stays just below the
#: next request's padded size. QEMU then faults in all 256 pages of every buffer. Freeing one
#: larger buffer raises the threshold above 1 MiB for good, so later buffers come from the heap
#: and are reused. In the benchmark QEMU spent about 0.35 s of CPU per GiB served without those
#: faults and 0.85-2.3 s with them (263,000 faults per GiB). The price: QEMU's heap may keep up
#: to twice this much freed memory.
WARM_UP: Final = 8 << 20
_ZEROS: Final = bytes(1 << 16)
_OFFSET: Final = struct.Struct(">Q")
_HOLE: Final = struct.Struct(">QI")
_ERROR: Final = struct.Struct(">IH")

#: NBD reads the readers of one QEMU keep outstanding at most when they read ahead: WARM_UP's
#: worth of 1 MiB requests (see SharedDepth).
QEMU_DEPTH: Final = WARM_UP // (1 << 20)

ReplyPipeFactory = Callable[[int], ReplyPipe]
"""Makes a ReplyPipe of the given size on the mounted FUSE connection."""


Done = Callable[[NBDError | None], None]
"""Told on the trio thread how a read ended: None (answered) or why not."""


class _Job:
    __slots__ = ("ahead", "done", "length", "offset", "result", "tell_success", "unique")

    def __init__(self, unique: int, offset: int, length: int, ahead: Sequence[tuple[int, int]],
                 done: Done, tell_success: bool) -> None:
        self.unique = unique
        self.offset = offset
        self.length = length
        self.ahead = ahead
        self.done = done
        self.tell_success = tell_success
        self.result: NBDError | None = None


class _Request:
    """One NBD read in flight or answered, reassembled from its reply chunks.

    Invariant: in pipe mode (``buf`` None) the pipe holds exactly the first ``filled`` bytes of
    the payload; in buffer mode ``buf`` holds every byte received so far at its place (holes
    are the buffer's zeros). ``wanted`` is false for a read-ahead nobody will use.
    """

    __slots__ = ("buf", "done", "error", "filled", "handle", "length", "offset", "pipe",
                 "wanted")

    def __init__(self, handle: int, offset: int, length: int, pipe: Pipe | None) -> None:
        self.handle = handle
        self.offset = offset
        self.length = length
        self.pipe = pipe
        self.buf: bytearray | None = None if pipe is not None else bytearray(length)
        self.filled = 0
        self.error = 0
        self.done = False
        self.wanted = True

    def to_buffer(self) -> bytearray:
        """Switch to buffer mode (the pipe's bytes move into the buffer)."""
        if self.buf is None:
            assert self.pipe is not None
            self.buf = bytearray(self.length)
            self.pipe.read_exact(memoryview(self.buf)[: self.filled])
        return self.buf


class SharedDepth:
    """Caps the NBD reads outstanding at one QEMU over all its readers, for read-aheads.

    A reader always asks for the range a READ wants; it asks for read-aheads only while the
    readers sharing this have fewer than ``limit`` requests outstanding in all. Why: QEMU's
    NBD server allocates a buffer per request in flight. After the WARM_UP read its allocator
    keeps freed buffers for reuse as long as less than twice WARM_UP of them is free at once,
    which holds while at most WARM_UP bytes are outstanding. Before the warm-up existed, four
    disks read at once with two read-aheads each made QEMU (one thread, the bottleneck there)
    map 2,000 fresh 1 MiB buffers per 4 GiB instead of 1,200 and spend about a quarter more CPU
    per GiB. Several readers keep QEMU busy without read-ahead; one sequential reader needs it.

    Threads: ``room`` runs in the workers without a lock. Each term is one ``len()`` of a
    reader's dict, atomic under the GIL; a sum that is stale by a request only moves the cap by
    one.
    """

    def __init__(self, limit: int = QEMU_DEPTH) -> None:
        self.limit = limit
        #: Whether a reader sharing this made QEMU's WARM_UP read: once per QEMU is enough.
        self.warmed_up = False
        self._readers: list[DiskReader] = []

    def join(self, reader: DiskReader) -> None:
        self._readers.append(reader)

    def room(self) -> bool:
        return sum(r.outstanding for r in self._readers) < self.limit


class DiskReader:
    """Serves READs of one disk through its own NBD connection in a worker thread.

    Lifecycle: ``await run(task_status)`` in a nursery connects (in the thread) and serves until
    :meth:`close`; ``read`` may be called once ``run`` has started. After a lost connection or
    an unexpected failure the reader is ``alive`` no more and callers should read another way.
    """

    def __init__(self, socket_path: str, export: str, reply_pipe: ReplyPipeFactory,
                 *, pipe_size: int = PIPE_SIZE, depth: SharedDepth | None = None) -> None:
        self.name = f"{socket_path}:{export}"
        self._socket_path = socket_path
        self._export = export
        self._reply_pipe = reply_pipe
        self._pipe_size = pipe_size
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stream: NBDStream | None = None
        self._alive = False
        self._closed = False
        # Worker state.
        self._handle = 0
        self._inflight: dict[int, _Request] = {}
        self._aheads: deque[_Request] = deque()  # in the order a sequential reader wants them
        self._pipes: list[Pipe] = []  # all of them, to close
        self._free: list[Pipe] = []
        self._reply: ReplyPipe | None = None
        #: Counters for tests and the log: read-aheads used, and replies sent by copying.
        self.hits = 0
        self.copied = 0
        #: Whether this reader made the WARM_UP read and it was answered (data or an error).
        self.warmed_up = False
        self._depth = depth if depth is not None else SharedDepth()
        self._depth.join(self)

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def outstanding(self) -> int:
        """NBD reads sent and not yet answered in full (any thread may ask)."""
        return len(self._inflight)

    # -- trio side ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, report started, serve in the worker thread until ``close``. Raises
        NBDError or FuseError if the connection or the pipes cannot be set up."""
        self._token = trio.lowlevel.current_trio_token()
        await trio.to_thread.run_sync(self._setup, abandon_on_cancel=False)
        self._alive = True
        task_status.started()
        try:
            with trio.CancelScope(shield=True):  # the thread ends only through close()
                await trio.to_thread.run_sync(self._serve, abandon_on_cancel=False)
        finally:
            self._alive = False

    def submit(self, unique: int, offset: int, length: int, ahead: Sequence[tuple[int, int]],
               done: Done, *, tell_success: bool = False) -> None:
        """Answer READ ``unique`` with ``length`` bytes at ``offset``, reading ``ahead``
        ahead. If that fails, ``done`` gets the NBDError (the server's errno, or StreamLost)
        on the trio thread; a reply that went out is not reported unless ``tell_success``
        (``done(None)``): sparing the trio thread a wakeup per read is much of the point.
        A job cannot be cancelled; one that ends after its request was interrupted finds it
        gone. ``done`` may be called before ``submit`` returns.
        """
        if not self._alive:
            done(StreamLost(f"{self.name}: the splice reader is not running"))
            return
        self._jobs.put(_Job(unique, offset, length, ahead, done, tell_success))

    async def read(self, unique: int, offset: int, length: int,
                   ahead: Sequence[tuple[int, int]]) -> None:
        """``submit`` and wait; raises what ``done`` would get."""
        finished = trio.Event()
        outcome: list[NBDError | None] = []

        def done(err: NBDError | None) -> None:
            outcome.append(err)
            finished.set()

        self.submit(unique, offset, length, ahead, done, tell_success=True)
        await finished.wait()
        if outcome[0] is not None:
            raise outcome[0]

    def close(self) -> None:
        """Stop the worker: jobs still queued fail, a blocked receive is broken off."""
        if self._closed:
            return
        self._closed = True
        self._alive = False
        self._jobs.put(None)
        if self._stream is not None:
            self._stream.shutdown()

    # -- worker side --------------------------------------------------------------------------

    def _setup(self) -> None:
        self._stream = NBDStream.connect(self._socket_path, self._export)
        try:
            self._reply = self._reply_pipe(self._pipe_size)
            for _ in range(PAYLOAD_PIPES):
                pipe = Pipe(self._pipe_size)
                self._pipes.append(pipe)
                os.set_blocking(pipe.w, False)  # holes are written; a full pipe must not block
            self._free = list(self._pipes)
            if not self._depth.warmed_up:  # readers start one after the other: no race
                self._warm_up()
        except BaseException:
            self._release()
            raise

    def _warm_up(self) -> None:
        """Read up to WARM_UP bytes at offset 0 and throw them away (see WARM_UP). An error
        reply is fine (the range may be outside the backup): QEMU allocated the buffer."""
        stream = self._stream
        assert stream is not None
        length = min(WARM_UP, stream.size)
        if length <= PIPE_SIZE:
            return  # no larger than a request: it would not raise anything
        self._handle += 1
        stream.send_read(self._handle, 0, length)
        scratch = memoryview(bytearray(_ZEROS))
        while True:
            handle, _, flags, size = stream.recv_chunk()
            if handle != self._handle:
                raise StreamLost(f"{self.name}: a reply to unknown request {handle}")
            while size:  # whatever the chunk holds: it is not needed
                n = min(size, len(scratch))
                stream.recv_into(scratch[:n])
                size -= n
            if flags & CHUNK_FLAG_DONE:
                self.warmed_up = self._depth.warmed_up = True
                return

    def _release(self) -> None:
        for pipe in self._pipes:
            pipe.close()
        if self._reply is not None:
            self._reply.close()
        self._pipes = self._free = []
        self._reply = None
        self._inflight.clear()
        self._aheads.clear()
        if self._stream is not None:
            self._stream.close()

    def _serve(self) -> None:
        token = self._token
        assert token is not None
        failure: StreamLost | None = None
        try:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    if failure is None and self._inflight:
                        # Idle with a read-ahead on its way: take it off the socket now. If
                        # QEMU's send buffer could not be widened, QEMU puts only ~200 KiB
                        # into the socket before it waits for us, and this is what makes the
                        # read-ahead a whole request deep.
                        try:
                            self._receive()
                        except (OSError, SnapfsError) as err:
                            failure = self._failed(err)
                        continue
                    job = self._jobs.get()
                if job is None:
                    return
                if failure is None:
                    try:
                        self._serve_job(job)
                    except NBDError as err:
                        job.result = err
                        if isinstance(err, StreamLost):
                            failure = err
                    except (OSError, SnapfsError) as err:
                        failure = job.result = self._failed(err)
                else:
                    job.result = failure
                if failure is not None:
                    self._alive = False  # read by the trio thread: a plain bool store
                if job.result is not None or job.tell_success:
                    token.run_sync_soon(job.done, job.result)
        finally:
            self._release()
            # Jobs queued after the end fail; close() put the None that ended the loop.
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.result = StreamLost(f"{self.name}: the splice reader stopped")
                    token.run_sync_soon(job.done, job.result)

    def _failed(self, err: BaseException) -> StreamLost:
        """What ends the data path, as StreamLost; anything but a lost stream is a bug."""
        if isinstance(err, StreamLost):
            return err
        log.error("%s: the splice data path failed: %s", self.name, err)
        return StreamLost(f"{self.name}: {err}")

    def _request(self, offset: int, length: int) -> _Request:
        assert self._stream is not None
        self._handle += 1
        req = _Request(self._handle, offset, length, self._free.pop() if self._free else None)
        self._inflight[req.handle] = req
        self._stream.send_read(req.handle, offset, length)
        return req

    def _serve_job(self, job: _Job) -> None:
        aheads, self._aheads = self._aheads, deque()
        used = None
        if aheads and (aheads[0].offset, aheads[0].length) == (job.offset, job.length):
            used = aheads.popleft()
        # Read-aheads this job still wants stay, in order; the rest are dropped.
        wanted = list(job.ahead)
        while aheads:
            req = aheads.popleft()
            if wanted and (req.offset, req.length) == wanted[0] and not req.error:
                self._aheads.append(req)
                del wanted[0]
            else:
                self._drop(req)
        if used is not None and used.error:
            self._drop(used)  # failed after all (punched meanwhile?): read it the plain way
            used = None
        current = used if used is not None else self._request(job.offset, job.length)
        for offset, length in wanted:
            if not self._depth.room():
                break  # in order: a later range alone would never be used
            # Asked for now, so QEMU reads them while this reply goes out.
            self._aheads.append(self._request(offset, length))
        while not current.done:
            self._receive()
        if current.error and current is used:
            self._free_pipe(current)
            current = self._request(job.offset, job.length)
            while not current.done:
                self._receive()
        elif current is used:
            self.hits += 1
        try:
            if current.error:
                raise NBDError(f"{self.name}: read of {job.length} bytes at {job.offset}: "
                               f"{os.strerror(current.error)}", current.error)
            self._send(job.unique, current)
        finally:
            self._free_pipe(current)

    def _receive(self) -> None:
        """Take one reply chunk off the socket and put it where it belongs."""
        stream = self._stream
        assert stream is not None
        handle, ctype, flags, length = stream.recv_chunk()
        req = self._inflight.get(handle)
        if req is None:
            raise StreamLost(f"{self.name}: a reply to unknown request {handle}")
        if ctype == CHUNK_OFFSET_DATA and length >= _OFFSET.size:
            (offset,) = _OFFSET.unpack(stream.read_exact(_OFFSET.size))
            self._data(req, offset - req.offset, length - _OFFSET.size)
        elif ctype == CHUNK_OFFSET_HOLE and length == _HOLE.size:
            offset, size = _HOLE.unpack(stream.read_exact(_HOLE.size))
            self._hole(req, offset - req.offset, size)
        elif ctype & CHUNK_ERROR_BIT and length >= _ERROR.size:
            error, _ = _ERROR.unpack(stream.read_exact(_ERROR.size))
            stream.read_exact(length - _ERROR.size)  # message (and offset): not needed
            req.error = req.error or error or errno.EIO
        elif ctype != CHUNK_NONE or length:
            raise StreamLost(f"{self.name}: unexpected reply chunk type {ctype}")
        if flags & CHUNK_FLAG_DONE:
            del self._inflight[handle]
            req.done = True
            if not req.error and req.buf is None and req.filled != req.length:
                raise StreamLost(f"{self.name}: a reply covered {req.filled} of {req.length} "
                                 "bytes")
            if not req.wanted:
                self._free_pipe(req)

    def _data(self, req: _Request, at: int, size: int) -> None:
        stream = self._stream
        assert stream is not None
        if at < 0 or at + size > req.length:
            raise StreamLost(f"{self.name}: a reply chunk outside its request")
        if req.buf is None and at == req.filled:
            assert req.pipe is not None
            moved = stream.splice_into(req.pipe.w, size)
            req.filled += moved
            if moved == size:
                return
            at += moved
            size -= moved
        stream.recv_into(memoryview(req.to_buffer())[at : at + size])

    def _hole(self, req: _Request, at: int, size: int) -> None:
        if at < 0 or at + size > req.length:
            raise StreamLost(f"{self.name}: a reply chunk outside its request")
        if req.buf is not None:
            return  # a fresh buffer is zeros already
        if at != req.filled:
            req.to_buffer()
            return
        assert req.pipe is not None
        while size:
            try:
                n = os.write(req.pipe.w, _ZEROS[: min(size, len(_ZEROS))])
            except BlockingIOError:
                req.to_buffer()
                return
            req.filled += n
            size -= n

    def _send(self, unique: int, req: _Request) -> None:
        reply = self._reply
        assert reply is not None
        length = req.length
        if req.buf is not None:
            self.copied += 1
            reply.write_copy(unique, req.buf)
            return
        assert req.pipe is not None
        moved = req.pipe.move_to(reply.start(unique, length), length)
        if moved == length:
            req.filled = 0  # the pipe is empty now
            reply.finish(length)
            return
        # The reply pipe ran out of slots: take it all back and copy.
        buf = bytearray(length)
        view = memoryview(buf)
        reply.take_back(view[:moved])
        req.pipe.read_exact(view[moved:])
        req.filled = 0
        self.copied += 1
        reply.write_copy(unique, buf)

    def _drop(self, req: _Request) -> None:
        """A read-ahead nobody will use: free it now, or when its reply is complete."""
        req.wanted = False
        if req.done:
            self._free_pipe(req)

    def _free_pipe(self, req: _Request) -> None:
        """Give the request's pipe back, emptied. Idempotent."""
        pipe, req.pipe = req.pipe, None
        if pipe is None:
            return
        if req.buf is None and req.filled:
            pipe.discard(req.filled)
        req.filled = 0
        self._free.append(pipe)
