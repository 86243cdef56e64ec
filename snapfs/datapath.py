"""The splice data path: snapshot bytes from QEMU's NBD socket into /dev/fuse, never in Python.

One :class:`DiskReader` per disk owns a worker thread, an :class:`~snapfs.nbd.wire.NBDStream` and
a few pipes. For a READ the trio thread checks the range against the tree (as for every read)
and submits a job; the worker asks QEMU for the range (a *fetch*: one NBD request, or one per
copy-before-write cluster where QEMU needs that, see ``confine`` and ``copied``), splices the
payload of each data chunk from the socket into the fetch's pipe (holes become zeros written
into it), and then splices header plus payload into /dev/fuse (:mod:`snapfs.fuse.splice`). The
kernel copies the bytes once, into the reader's pages; libnbd's path copies them twice and
wakes the trio thread for every socket chunk. Workers of different disks run in parallel (the
GIL is released in every syscall).

Several READs of one disk are in flight at once (up to ``MAX_JOBS``): QEMU serves their
requests concurrently and may answer in any order, and each READ is answered as soon as its
fetch is complete. A fetch's payload goes through its pipe in order: bytes that arrive ahead of
their turn (a later request of the same fetch answered first) wait in a buffer of their request
and are written into the pipe when their turn comes. Whenever bytes do not fit the splice way
(a full pipe, chunks out of order inside one request, more fetches in flight than pipes), that
fetch continues in a buffer and its reply is written by copying.

Read-ahead: a job may name ranges that follow it if the trio thread found them readable when
it submitted the job (a sequential reader). The worker asks QEMU for those it has not asked for
yet right away (as far as :class:`SharedDepth` allows) and keeps them in fetches of their own.
A later job for exactly the first such range uses it. That job passed the tree's checks at its
own time, so a range punched meanwhile is refused as without read-ahead (the snapshot's bytes
never change, and punching only shrinks the readable set). A read-ahead that fails or is no
longer wanted is dropped.

Errors: an NBD error chunk fails that job with the server's errno (a broken snapshot); a lost
connection or a protocol violation fails every job in flight and every later one with
:class:`~snapfs.nbd.wire.StreamLost`. Callers then read the libnbd way, which reports what happened.

Threads: ``read``/``close`` on the trio thread; ``submit`` there or in the worker that reads
the FUSE requests (a reader's ``intake``: its own READs and other disks'); everything else in
the worker. Jobs cross over through a ``queue.SimpleQueue`` (and an eventfd that wakes a worker
waiting in poll); failures come back with ``TrioToken.run_sync_soon``. Workers run as
``SCHED_BATCH`` (see :func:`snapfs.sched.batch_scheduled`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import trio

from snapfs.errors import FuseError, NBDError, SnapfsError
from snapfs.fuse.reply import ReadReply
from snapfs.fuse.server import Intake
from snapfs.fuse.splice import Pipe, ReplyPipe
from snapfs.nbd import tuning
from snapfs.nbd.pool import SavedClusters
from snapfs.nbd.wire import (
    CHUNK_BLOCK_STATUS,
    CHUNK_ERROR_BIT,
    CHUNK_FLAG_DONE,
    CHUNK_OFFSET_DATA,
    CHUNK_OFFSET_HOLE,
    CHUNK_SIMPLE,
    MAX_STATUS,
    STATE_DIRTY,
    NBDStream,
    StreamLost,
)
from snapfs.sched import batch_scheduled

log = logging.getLogger(__name__)

#: Bytes a pipe must take: one whole 1 MiB READ reply (and the unprivileged maximum).
PIPE_SIZE: Final = 1 << 20
#: READs of one disk in flight at once; later ones wait in the queue.
MAX_JOBS: Final = 16
#: Payload pipes at most: one per READ in flight, its read-aheads (two, see READ_AHEAD), and
#: two read-aheads dropped while still in flight. Beyond that, payloads go into buffers. An
#: idle pipe costs no payload memory.
PAYLOAD_PIPES: Final = MAX_JOBS + 4
_ZEROS: Final = bytes(1 << 16)

#: Fetches the readers of one QEMU keep outstanding at most when they read ahead (see
#: SharedDepth): eight 1 MiB reads, the size of the warm-up read (snapfs.nbd.tuning.WARM_UP).
QEMU_DEPTH: Final = 8

ReplyPipeFactory = Callable[[int], ReplyPipe]
"""Makes a ReplyPipe of the given size on the mounted FUSE connection."""


Done = Callable[[NBDError | None], None]
"""Told on the trio thread how a read ended: None (answered) or why not."""


class _Job:
    __slots__ = (
        "ahead",
        "done",
        "fetch",
        "length",
        "offset",
        "reply",
        "result",
        "retried",
        "tell_success",
    )

    def __init__(
        self,
        reply: ReadReply,
        offset: int,
        length: int,
        ahead: Sequence[tuple[int, int]],
        done: Done,
        tell_success: bool,
    ) -> None:
        self.reply = reply
        self.offset = offset
        self.length = length
        self.ahead = ahead
        self.done = done
        self.tell_success = tell_success
        self.result: NBDError | None = None
        self.fetch: _Fetch | None = None
        # True once the job has a fetch of its own (not a read-ahead): not retried on failure.
        self.retried = False


class _Part:
    """One NBD read request: bytes ``[start, start + length)`` of its fetch.

    ``got`` counts the bytes received so far; QEMU sends a request's chunks in ascending order,
    so they are the first ``got`` bytes of the part (a part that breaks this puts its fetch
    into buffer mode). ``buf`` holds bytes that arrived before their turn in the fetch's pipe.
    """

    __slots__ = ("buf", "done", "error", "fetch", "got", "length", "start")

    def __init__(self, fetch: _Fetch, start: int, length: int) -> None:
        self.fetch = fetch
        self.start = start
        self.length = length
        self.got = 0
        self.buf: bytearray | None = None
        self.error = 0
        self.done = False


class _Fetch:
    """One range of the disk, read by one or more NBD requests (``parts``, in order).

    Invariant: in pipe mode (``buf`` None) the pipe holds exactly the first ``filled`` bytes of
    the range, and bytes received past ``filled`` wait in their part's ``buf``; in buffer mode
    ``buf`` holds every byte received so far at its place (holes are the buffer's zeros).
    ``wanted`` is false for a read-ahead nobody will use; ``job`` is the READ it answers.
    """

    __slots__ = (
        "buf",
        "clean",
        "cur",
        "error",
        "filled",
        "job",
        "length",
        "offset",
        "parts",
        "pending",
        "pipe",
        "verify",
        "wanted",
    )

    def __init__(self, offset: int, length: int, pipe: Pipe | None) -> None:
        self.offset = offset
        self.length = length
        self.pipe = pipe
        self.buf: bytearray | None = None if pipe is not None else bytearray(length)
        self.filled = 0
        self.cur = 0  # the part that ``filled`` is in
        self.parts: list[_Part] = []
        self.pending = 0  # parts not yet answered in full
        self.error = 0
        self.wanted = True
        self.job: _Job | None = None
        # Read in one request across copy-before-write clusters where QEMU needs them
        # confined: the bytes are checked before they are sent (DiskReader._check), and
        # ``clean`` says whether none of its clusters was saved by then (None: not known).
        self.verify = False
        self.clean: bool | None = None

    @property
    def complete(self) -> bool:
        """Every request answered: its reads, and the check of its bytes (``verify``)."""
        return self.pending == 0


class SharedDepth:
    """Caps the fetches outstanding at one QEMU over all its readers, for read-aheads.

    A reader always asks for the range a READ wants; it asks for read-aheads only while the
    readers sharing this have fewer than ``limit`` fetches outstanding in all. Why: QEMU's
    NBD server allocates a buffer per request in flight. After the WARM_UP read its allocator
    keeps freed buffers for reuse as long as less than twice WARM_UP of them is free at once,
    which holds while at most WARM_UP bytes are outstanding. Several readers keep QEMU busy
    without read-ahead; one sequential reader needs it.

    Threads: ``room`` runs in the workers without a lock. Each term is one ``len()`` of a
    reader's dict, atomic under the GIL; a sum that is stale by a fetch only moves the cap by
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

    ``confine`` > 0: every NBD request stays inside one aligned block of that size (QEMU's
    copy-before-write cluster; see ``snapfs.qmp.confine_reads``). ``tune``: widen QEMU's send
    buffer and make the warm-up read (snapfs.nbd.tuning).

    ``copied`` (with ``confine``): the export's bitmap of the clusters copy-before-write has
    saved (snapfs.qmp.DiskState.copied). A READ across clusters is then read in one request
    and its bytes are sent only if, asked after they all arrived, none of its clusters is in
    the bitmap: QEMU sets a cluster's bit before the guest's new data can reach the disk, and
    only saved clusters are misread. Otherwise (and for clusters known to be saved) the READ
    is read again, confined. The bitmap is asked on the stream itself, as soon as a fetch's
    bytes are in (read-aheads too), and the worker goes on receiving while QEMU answers: the
    answer is one more reply, and the fetch is complete with it.

    ``intake``: the worker reads the FUSE requests as well (snapfs.fuse.server.Intake), from
    ``run`` until it stops. The READs of its own disk then reach it without crossing threads,
    and the trio thread is out of the path of every READ; those of other disks go to their
    readers' queues. It reads requests also while ``MAX_JOBS`` READs of its disk are in
    flight, so a ``stat`` or another disk's READ never waits for this disk's QEMU; READs
    beyond that wait in its queue, as many as the kernel sends at once (its max_background).
    """

    def __init__(
        self,
        socket_path: str,
        export: str,
        reply_pipe: ReplyPipeFactory,
        *,
        pipe_size: int = PIPE_SIZE,
        depth: SharedDepth | None = None,
        confine: int = 0,
        copied: str = "",
        tune: bool = True,
        intake: Intake | None = None,
    ) -> None:
        self.name = f"{socket_path}:{export}"
        self._intake = intake
        self._intake_open = False  # polled for requests (until the connection ends)
        self._socket_path = socket_path
        self._export = export
        self._reply_pipe = reply_pipe
        self._pipe_size = pipe_size
        self._confine = confine
        self._copied_context = f"qemu:dirty-bitmap:{copied}" if copied and confine else ""
        self._checks_bytes = False  # the stream agreed on the copied context: checks work
        self._saved = SavedClusters(confine or 1)  # asked only with confine
        self._tune = tune
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._wakeup = -1  # an eventfd while run() runs
        self._polling = False  # the worker waits in poll(): a new job must write _wakeup
        self._token: trio.lowlevel.TrioToken | None = None
        #: Set once ``run`` has ended (the worker thread is gone).
        self.stopped = trio.Event()
        self._stream: NBDStream | None = None
        # epoll, not poll: its waits stay registered between calls, where poll(2) adds and
        # removes one on each descriptor's wait queue every time, /dev/fuse's among them,
        # whose lock every reader's request takes as well. The worker's (see _setup).
        self._poll: select.epoll | None = None
        self._alive = False
        self._closed = False
        # Worker state.
        self._handle = 0
        self._inflight: dict[int, _Part] = {}  # by NBD handle
        self._checking: dict[int, _Fetch] = {}  # block status requests, by NBD handle
        self._fetches: set[_Fetch] = set()  # sent (or about to be) and not complete
        # Requests made since the worker last waited, sent together before it waits again:
        # READs that arrive together cost QEMU one wakeup, not one each.
        self._unsent: list[tuple[int, int, int]] = []
        self._unsent_checks: list[tuple[int, int, int]] = []
        self._active: list[_Job] = []  # started and not answered
        self._aheads: deque[_Fetch] = deque()  # in the order a sequential reader wants them
        self._pipes: list[Pipe] = []  # all of them, to close
        self._free: list[Pipe] = []
        self._reply: ReplyPipe | None = None
        #: Counters for tests and the log: read-aheads used, replies sent by copying, NBD
        #: requests sent and the sends that carried them, ranges fetched (READs and
        #: read-aheads), READs started, and the most READs that were in flight at once.
        self.hits = 0
        self.copied = 0
        self.requests = 0
        self.sends = 0
        self.fetches = 0
        self.jobs = 0
        self.most_jobs = 0
        #: Fetches read across clusters and checked (``copied``); of those, the ones whose
        #: bytes were not taken (a cluster was saved) and that were read again, confined.
        self.verified = 0
        self.reread = 0
        #: Whether this reader made the WARM_UP read and it was answered (data or an error).
        self.warmed_up = False
        #: The worker thread's id (``threading.get_native_id``) once it serves; 0 before.
        self.worker_tid = 0
        self._depth = depth if depth is not None else SharedDepth()
        self._depth.join(self)

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def reads_requests(self) -> bool:
        """Whether the worker took over reading the FUSE requests (``intake``)."""
        return self._intake is not None

    @property
    def outstanding(self) -> int:
        """Fetches sent and not yet answered in full (any thread may ask)."""
        return len(self._fetches)

    # -- trio side ----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, report started, serve in the worker thread until ``close``. Raises
        NBDError or FuseError if the connection or the pipes cannot be set up."""
        self._token = trio.lowlevel.current_trio_token()
        self._wakeup = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            await trio.to_thread.run_sync(self._setup, abandon_on_cancel=False)
        except BaseException:
            os.close(self._wakeup)
            self._wakeup = -1
            if self._intake is not None:
                self._intake.stop()
            raise
        self._alive = True
        if self._intake is not None:
            try:
                self._intake.start()
            except FuseError as err:
                log.warning("%s: not reading the FUSE requests: %s", self.name, err)
                assert self._poll is not None
                self._poll.unregister(self._intake.fileno)
                self._intake.stop()
                self._intake = None
                self._intake_open = False
        task_status.started()
        try:
            with trio.CancelScope(shield=True):  # the thread ends only through close()
                await trio.to_thread.run_sync(self._serve, abandon_on_cancel=False)
        finally:
            self._alive = False
            # Closed here, on the trio thread that writes it, once the worker is gone.
            os.close(self._wakeup)
            self._wakeup = -1
            self.stopped.set()

    def submit(
        self,
        reply: ReadReply,
        offset: int,
        length: int,
        ahead: Sequence[tuple[int, int]],
        done: Done,
        *,
        tell_success: bool = False,
    ) -> None:
        """Answer ``reply`` with ``length`` bytes at ``offset``, reading ``ahead`` ahead. If
        that fails, ``done`` gets the NBDError (the server's errno, or StreamLost) on the trio
        thread and the reply is left unanswered; a reply that went out is not reported unless
        ``tell_success``
        (``done(None)``): sparing the trio thread a wakeup per read is much of the point.
        A job cannot be cancelled; one that ends after its request was interrupted finds it
        gone. ``done`` may be called before ``submit`` returns.
        """
        if not self._alive:
            lost = StreamLost(f"{self.name}: the splice reader is not running")
            if self._token is None:
                done(lost)
            else:  # perhaps called in another reader's worker (its intake): not here
                self._token.run_sync_soon(done, lost)
            return
        self._jobs.put(_Job(reply, offset, length, ahead, done, tell_success))
        self._wake()

    async def read(
        self, reply: ReadReply, offset: int, length: int, ahead: Sequence[tuple[int, int]]
    ) -> None:
        """``submit`` and wait; raises what ``done`` would get."""
        finished = trio.Event()
        outcome: list[NBDError | None] = []

        def done(err: NBDError | None) -> None:
            outcome.append(err)
            finished.set()

        self.submit(reply, offset, length, ahead, done, tell_success=True)
        await finished.wait()
        if outcome[0] is not None:
            raise outcome[0]

    @property
    def nbd_fileno(self) -> int | None:
        """The descriptor of its NBD connection, once it is connected."""
        return self._stream.fileno if self._stream is not None else None

    def close(self) -> None:
        """Stop the worker: jobs still queued fail, a blocked receive is broken off."""
        if self._closed:
            return
        self._closed = True
        self._alive = False
        self._jobs.put(None)
        self._wake(always=True)
        if self._stream is not None:
            self._stream.shutdown()

    def _wake(self, *, always: bool = False) -> None:
        # Only a worker waiting in poll() needs the eventfd; one blocked on the queue wakes by
        # itself. The worker sets _polling before it looks at the queue a last time, so a job
        # put after that look sees the flag (both run under the GIL).
        if (always or self._polling) and self._wakeup >= 0:
            os.eventfd_write(self._wakeup, 1)

    # -- worker side --------------------------------------------------------------------------

    def _setup(self) -> None:
        # Confined requests lie inside one cluster, where a plain read is right: simple replies
        # (or reads flagged "don't fragment", where the stream asks block status too) spare
        # QEMU a block status per request and us a chunk header per hole or extent.
        self._stream = NBDStream.connect(
            self._socket_path,
            self._export,
            structured=not self._confine,
            tune=self._tune,
            context=self._copied_context,
        )
        try:
            if self._copied_context:
                self._checks_bytes = self._stream.context_id is not None
                if not self._checks_bytes:
                    log.warning(
                        "%s: reads stay inside one cluster each: the server does not offer %s",
                        self.name,
                        self._copied_context,
                    )
            self._reply = self._reply_pipe(self._pipe_size)
            # Readers start one after the other: no race.
            if self._tune and not self._depth.warmed_up:
                self._warm_up()
            self._poll = select.epoll()
            self._poll.register(self._stream.fileno, select.EPOLLIN)
            self._poll.register(self._wakeup, select.EPOLLIN)
            if self._intake is not None:
                self._poll.register(self._intake.fileno, select.EPOLLIN)
                self._intake_open = True
                # What the compiled part must not keep waiting: replies to this worker's
                # fetches, and jobs queued by other threads.
                self._intake.wake = (self._stream.fileno, self._wakeup)
        except BaseException:
            self._release()
            raise

    def _warm_up(self) -> None:
        """QEMU's warm-up read (snapfs.nbd.tuning.warm_up), once per QEMU."""
        assert self._stream is not None
        if min(tuning.WARM_UP, self._stream.size) <= PIPE_SIZE:
            return  # no larger than a request: it would not raise anything
        self._handle += 1
        tuning.warm_up(self._stream, self._handle)
        self.warmed_up = self._depth.warmed_up = True

    def _release(self) -> None:
        for pipe in self._pipes:
            pipe.close()
        if self._reply is not None:
            self._reply.close()
        self._pipes = self._free = []
        self._reply = None
        self._inflight.clear()
        self._checking.clear()
        self._fetches.clear()
        self._aheads.clear()
        self._unsent.clear()
        self._unsent_checks.clear()
        if self._stream is not None:
            self._stream.close()
        if self._poll is not None:
            self._poll.close()
            self._poll = None

    def _serve(self) -> None:
        with batch_scheduled():
            self._serve_batched()

    def _serve_batched(self) -> None:
        self.worker_tid = threading.get_native_id()
        failure: StreamLost | None = None
        try:
            while True:
                room = len(self._active) < MAX_JOBS
                busy = bool(self._fetches)
                job: _Job | None = None
                if not busy and not self._intake_open:
                    job = self._jobs.get()  # idle: wait for work
                    if job is None:
                        return  # close()
                elif room and not self._jobs.empty():  # raising queue.Empty costs more
                    job = self._jobs.get_nowait()  # only this thread takes jobs
                    if job is None:
                        return
                if job is not None:
                    if failure is not None:
                        self._finish(job, failure)
                        continue
                    try:
                        self._start(job)
                    except (OSError, SnapfsError) as err:
                        failure = self._failed(err)
                        self._fail_all(failure, job)
                    continue
                # Requests are on their way: take their replies, and new jobs while there is
                # room for them.
                try:
                    self._flush()
                except (OSError, SnapfsError) as err:
                    failure = self._failed(err)
                    self._fail_all(failure)
                    continue
                if (room or self._intake_open) and not self._wait(room):
                    continue
                try:
                    self._receive()
                except (OSError, SnapfsError) as err:
                    failure = self._failed(err)
                    self._fail_all(failure)
        finally:
            if self._intake is not None:
                self._intake_open = False
                self._intake.stop()
            self._fail_all(failure or StreamLost(f"{self.name}: the splice reader stopped"))
            self._release()
            # Jobs queued after the end fail; close() put the None that ended the loop.
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    self._finish(job, StreamLost(f"{self.name}: the splice reader stopped"))

    def _wait(self, room: bool) -> bool:
        """Wait until the socket has a reply chunk (True), or a job was queued while there is
        ``room`` for it, or FUSE requests were read (False)."""
        poll = self._poll
        assert poll is not None
        self._polling = True
        try:
            if room and not self._jobs.empty():
                return False
            events = poll.poll()
        finally:
            self._polling = False
        ready = False
        intake = self._intake
        for fd, _ in events:
            if fd == self._wakeup:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._wakeup)
            elif intake is not None and fd == intake.fileno:
                # The compiled part may wait for requests while it has none in flight: a job
                # put from now on writes the eventfd, which it watches (see _wake).
                self._polling = True
                try:
                    more = intake.read_some(MAX_JOBS, idle=self._jobs.empty())
                finally:
                    self._polling = False
                if not more:
                    # The connection is gone (the server was told): serve what is in flight.
                    poll.unregister(fd)
                    self._intake_open = False
            else:
                ready = True
        return ready

    def _finish(self, job: _Job, result: NBDError | None) -> None:
        """Report a job's end to the trio thread (failures, or success when asked for)."""
        job.result = result
        if job in self._active:
            self._active.remove(job)
        if result is not None or job.tell_success:
            assert self._token is not None
            self._token.run_sync_soon(job.done, result)

    def _fail_all(self, failure: StreamLost, also: _Job | None = None) -> None:
        """The stream cannot go on: every job in flight fails, nothing more is received."""
        self._alive = False  # read by the trio thread: a plain bool store
        if self._stream is not None and self._poll is not None and self._intake_open:
            # The worker goes on reading requests: a dead socket must not wake it any more,
            # nor end every wait of the compiled part.
            with contextlib.suppress(OSError):
                self._poll.unregister(self._stream.fileno)
            if self._intake is not None:
                self._intake.wake = (self._wakeup,)
        for job in [*self._active, *([also] if also is not None else [])]:
            self._finish(job, failure)
        self._inflight.clear()
        self._checking.clear()
        self._fetches.clear()
        self._aheads.clear()
        self._unsent.clear()
        self._unsent_checks.clear()

    def _failed(self, err: BaseException) -> StreamLost:
        """What ends the data path, as StreamLost; anything but a lost stream is a bug."""
        if isinstance(err, StreamLost):
            return err
        log.error("%s: the splice data path failed: %s", self.name, err)
        return StreamLost(f"{self.name}: {err}")

    def _check(self, fetch: _Fetch) -> None:
        """Ask which of the fetch's clusters are saved, now that its bytes are all in; the
        fetch is complete once the answer is (``_checked``)."""
        self.verified += 1
        self._handle += 1
        self._checking[self._handle] = fetch
        self._unsent_checks.append((self._handle, fetch.offset, fetch.length))
        fetch.pending += 1

    def _checked(self, fetch: _Fetch, extents: list[tuple[int, int]]) -> None:
        """The copied bitmap's extents from the fetch's offset: ``clean`` if they cover all of
        it and none is dirty. Anything else leaves it unclean, as does an error or a second
        answer (one context was asked for: one block status chunk is due)."""
        at = fetch.offset
        end = at + fetch.length
        saved = []
        for length, flags in extents:
            if at >= end:
                break
            if flags & STATE_DIRTY:
                saved.append((at, min(length, end - at)))
            at += length
        self._saved.note(saved)
        fetch.clean = fetch.clean is None and at >= end and not saved

    def _split(self, offset: int, length: int, whole: bool) -> tuple[list[tuple[int, int]], bool]:
        """The NBD requests of a fetch: one, or one per ``confine`` block it touches, unless
        ``whole`` and its bytes can be checked (see ``copied``); and whether they must be."""
        c = self._confine
        if not c:
            return [(offset, length)], False
        if (
            whole
            and self._checks_bytes
            and length <= MAX_STATUS
            and self._saved.whole(offset, length)
        ):
            return [(offset, length)], True
        parts = []
        end = offset + length
        while offset < end:
            step = min(end, (offset // c + 1) * c) - offset
            parts.append((offset, step))
            offset += step
        return parts, False

    def _fetch(self, offset: int, length: int, *, whole: bool = True) -> _Fetch:
        """Ask QEMU for a range (``whole``: see ``_split``)."""
        assert self._stream is not None
        pipe = None
        if self._free:
            pipe = self._free.pop()
        elif len(self._pipes) < PAYLOAD_PIPES:
            pipe = Pipe(self._pipe_size)
            self._pipes.append(pipe)
            os.set_blocking(pipe.w, False)  # holes are written; a full pipe must not block
        fetch = _Fetch(offset, length, pipe)
        requests = []
        split, fetch.verify = self._split(offset, length, whole)
        for start, size in split:
            self._handle += 1
            part = _Part(fetch, start - offset, size)
            fetch.parts.append(part)
            self._inflight[self._handle] = part
            requests.append((self._handle, start, size))
        fetch.pending = len(requests)
        self._fetches.add(fetch)
        self.fetches += 1
        self.requests += len(requests)
        self._unsent += requests
        return fetch

    def _flush(self) -> None:
        """Send the requests made since the last wait, in one send."""
        if self._unsent or self._unsent_checks:
            assert self._stream is not None
            requests, self._unsent = self._unsent, []
            checks, self._unsent_checks = self._unsent_checks, []
            self.sends += 1
            self._stream.send_reads(requests, checks)

    def _start(self, job: _Job) -> None:
        """Start answering a job: with a read-ahead that matches it, or a fetch of its own."""
        used = None
        wanted: list[tuple[int, int]] = []
        if self._aheads or job.ahead:  # a sequential reader (scattered READs skip all this)
            aheads, self._aheads = self._aheads, deque()
            if aheads and (aheads[0].offset, aheads[0].length) == (job.offset, job.length):
                used = aheads.popleft()
            # Read-aheads this job still wants stay, in order; the rest are dropped.
            wanted = list(job.ahead)
            while aheads:
                fetch = aheads.popleft()
                if wanted and (fetch.offset, fetch.length) == wanted[0] and not fetch.error:
                    self._aheads.append(fetch)
                    del wanted[0]
                else:
                    self._drop(fetch)
        if used is not None and used.error:
            self._drop(used)  # failed after all (punched meanwhile?): read it the plain way
            used = None
        fetch = used if used is not None else self._fetch(job.offset, job.length)
        job.retried = used is None  # a fetch of its own is not retried
        job.fetch = fetch
        fetch.job = job
        self._active.append(job)
        self.jobs += 1
        self.most_jobs = max(self.most_jobs, len(self._active))
        for offset, length in wanted:
            if not self._depth.room():
                break  # in order: a later range alone would never be used
            # Asked for now, so QEMU reads them while this reply goes out.
            self._aheads.append(self._fetch(offset, length))
        if fetch.complete:
            self._answer(job)

    def _answer(self, job: _Job) -> None:
        """The job's fetch is complete: send its reply, or its error."""
        fetch = job.fetch
        assert fetch is not None
        if fetch.error and not job.retried:
            # A read-ahead that failed (punched meanwhile?): once more as a read of its own,
            # which tells.
            self._free_pipe(fetch)
            job.retried = True
            job.fetch = self._fetch(job.offset, job.length)
            job.fetch.job = job
            return
        try:
            if fetch.error:
                self._finish(
                    job,
                    NBDError(
                        f"{self.name}: read of {job.length} bytes at "
                        f"{job.offset}: {os.strerror(fetch.error)}",
                        fetch.error,
                    ),
                )
                return
            if fetch.verify and fetch.clean is not True:
                # Some of its clusters were saved: QEMU may have read them from the live
                # disk. Read it again, one request per cluster (fetch's pipe is freed below).
                self.reread += 1
                job.retried = True  # a fetch of its own
                job.fetch = self._fetch(job.offset, job.length, whole=False)
                job.fetch.job = job
                if job.fetch.complete:  # never: it has requests
                    self._answer(job)
                return
            if not job.retried:
                self.hits += 1  # answered by a read-ahead
            self._send(job.reply, fetch)
            self._finish(job, None)
        finally:
            self._free_pipe(fetch)

    def _receive(self) -> None:
        """Take one reply chunk off the socket and put it where it belongs."""
        stream = self._stream
        assert stream is not None
        handle, ctype, flags, length = stream.recv_chunk()
        part = self._inflight.get(handle)
        if part is None:
            if handle in self._checking:
                self._receive_check(handle, ctype, flags, length)
                return
            raise StreamLost(f"{self.name}: a reply to unknown request {handle}")
        fetch = part.fetch
        if not stream.chunk_fits(ctype, length) or ctype == CHUNK_BLOCK_STATUS:
            raise StreamLost(f"{self.name}: unexpected reply chunk type {ctype} ({length} bytes)")
        if ctype == CHUNK_SIMPLE:
            if length:  # the server's error: no payload follows
                part.error = length
            else:
                self._data(part, part.start, part.length)
        elif ctype == CHUNK_OFFSET_DATA:
            offset, size = stream.recv_offset(length)
            self._data(part, offset - fetch.offset, size)
        elif ctype == CHUNK_OFFSET_HOLE:
            offset, size = stream.recv_hole()
            self._hole(part, offset - fetch.offset, size)
        elif ctype & CHUNK_ERROR_BIT:
            part.error = part.error or stream.recv_error(length)
        if flags & CHUNK_FLAG_DONE:
            del self._inflight[handle]
            part.done = True
            if not part.error and part.got != part.length:
                raise StreamLost(f"{self.name}: a reply covered {part.got} of {part.length} bytes")
            fetch.error = fetch.error or part.error
            fetch.pending -= 1
            if fetch.complete and fetch.verify and not fetch.error:
                self._check(fetch)  # also a read-ahead's: the check is valid from now on
            if fetch.complete:
                self._completed(fetch)

    def _receive_check(self, handle: int, ctype: int, flags: int, length: int) -> None:
        """Take a chunk of the reply to a check (``_check``); an error makes it unclean."""
        stream = self._stream
        assert stream is not None
        fetch = self._checking[handle]
        if not stream.chunk_fits(ctype, length) or ctype in (CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE):
            raise StreamLost(f"{self.name}: unexpected reply chunk type {ctype} ({length} bytes)")
        if ctype == CHUNK_BLOCK_STATUS:
            context, extents = stream.recv_status(length)
            if context == stream.context_id:
                self._checked(fetch, extents)
        elif ctype & CHUNK_ERROR_BIT:
            stream.recv_error(length)
            fetch.clean = False
        if flags & CHUNK_FLAG_DONE:
            del self._checking[handle]
            fetch.pending -= 1
            if fetch.complete:
                self._completed(fetch)

    def _completed(self, fetch: _Fetch) -> None:
        """Every reply of the fetch is in: answer its READ, or free a read-ahead dropped."""
        self._fetches.discard(fetch)
        if fetch.job is not None:
            self._answer(fetch.job)
        elif not fetch.wanted:
            self._free_pipe(fetch)

    def _check_chunk(self, part: _Part, at: int, size: int) -> None:
        if at < part.start or at + size > part.start + part.length:
            raise StreamLost(f"{self.name}: a reply chunk outside its request")
        if at != part.start + part.got:
            self._to_buffer(part.fetch)  # not in order inside the request: keep it simple

    def _data(self, part: _Part, at: int, size: int) -> None:
        stream = self._stream
        assert stream is not None
        self._check_chunk(part, at, size)
        fetch = part.fetch
        if fetch.buf is None and at == fetch.filled:
            assert fetch.pipe is not None
            moved = stream.splice_into(fetch.pipe.w, size)
            fetch.filled += moved
            part.got += moved
            if moved == size:
                self._advance(fetch)
                return
            self._to_buffer(fetch)
            at += moved
            size -= moved
        if fetch.buf is not None:
            stream.recv_into(memoryview(fetch.buf)[at : at + size])
        else:
            # Ahead of its turn: a request before it in this fetch is not complete yet.
            if part.buf is None:
                part.buf = bytearray(part.length)
            rel = at - part.start
            stream.recv_into(memoryview(part.buf)[rel : rel + size])
        part.got += size

    def _hole(self, part: _Part, at: int, size: int) -> None:
        self._check_chunk(part, at, size)
        fetch = part.fetch
        if fetch.buf is None and at == fetch.filled:
            assert fetch.pipe is not None
            written = _write_some(fetch.pipe.w, _ZEROS, size)
            fetch.filled += written
            part.got += written
            if written == size:
                self._advance(fetch)
                return
            self._to_buffer(fetch)
            size -= written
        elif fetch.buf is None and part.buf is None:
            part.buf = bytearray(part.length)
        part.got += size  # a fresh buffer is zeros already

    def _advance(self, fetch: _Fetch) -> None:
        """Move bytes that waited for their turn into the pipe, part after part."""
        while fetch.buf is None and fetch.cur < len(fetch.parts):
            part = fetch.parts[fetch.cur]
            if fetch.filled == part.start + part.length:
                fetch.cur += 1
                continue
            have = part.start + part.got
            if part.buf is None or have <= fetch.filled:
                return
            assert fetch.pipe is not None
            rel = fetch.filled - part.start
            written = _write_some(
                fetch.pipe.w, memoryview(part.buf)[rel : part.got], have - fetch.filled
            )
            fetch.filled += written
            if fetch.filled < have:
                self._to_buffer(fetch)
                return
            part.buf = None  # all of it is in the pipe; what follows comes in order

    def _to_buffer(self, fetch: _Fetch) -> None:
        """Switch a fetch to buffer mode (the pipe's bytes and the parts' move into it)."""
        if fetch.buf is not None:
            return
        assert fetch.pipe is not None
        buf = bytearray(fetch.length)
        fetch.pipe.read_exact(memoryview(buf)[: fetch.filled])
        for part in fetch.parts:
            if part.buf is not None:
                lo = max(part.start, fetch.filled)
                hi = part.start + part.got
                if hi > lo:
                    buf[lo:hi] = part.buf[lo - part.start : hi - part.start]
                part.buf = None
        fetch.buf = buf
        fetch.filled = 0  # the pipe is empty now

    def _send(self, answer: ReadReply, fetch: _Fetch) -> None:
        reply = self._reply
        assert reply is not None
        length = fetch.length
        header = answer.header(length)
        if fetch.buf is not None:
            self.copied += 1
            reply.write_copy(header, fetch.buf)
            return
        assert fetch.pipe is not None
        moved = fetch.pipe.move_to(reply.start(header), length)
        if moved == length:
            fetch.filled = 0  # the pipe is empty now
            reply.finish(length)
            return
        # The reply pipe ran out of slots: take it all back and copy.
        buf = bytearray(length)
        view = memoryview(buf)
        reply.take_back(view[:moved])
        fetch.pipe.read_exact(view[moved:])
        fetch.filled = 0
        self.copied += 1
        reply.write_copy(header, buf)

    def _drop(self, fetch: _Fetch) -> None:
        """A read-ahead nobody will use: free it now, or when its reply is complete."""
        fetch.wanted = False
        if fetch.complete:
            self._free_pipe(fetch)

    def _free_pipe(self, fetch: _Fetch) -> None:
        """Give the fetch's pipe back, emptied. Idempotent."""
        pipe, fetch.pipe = fetch.pipe, None
        if pipe is None:
            return
        if fetch.buf is None and fetch.filled:
            pipe.discard(fetch.filled)
        fetch.filled = 0
        self._free.append(pipe)


def _write_some(fd: int, data: bytes | memoryview, length: int) -> int:
    """Write ``length`` bytes into the non-blocking pipe ``fd``: ``data`` itself, or (when it
    is shorter) as many of its bytes as needed, over and over (zeros); return how many went in
    before the pipe was full."""
    view = memoryview(data)
    repeat = len(view) < length
    done = 0
    while done < length:
        chunk = view[: min(length - done, len(view))] if repeat else view[done:length]
        try:
            done += os.write(fd, chunk)
        except BlockingIOError:
            break
    return done


#: Reads at least this large that continue the previous read of a disk start a read-ahead.
READ_AHEAD_MIN: Final = 128 * 1024
#: Ranges read ahead of a sequential reader: two keep QEMU busy while a reply goes out.
READ_AHEAD: Final = 2


class Cursor(Protocol):
    """Where the last READ of a disk ended (-1: none), kept by the compiled READ path."""

    next: int


class Submits(Protocol):
    """What SpliceReads needs of a DiskReader."""

    @property
    def alive(self) -> bool: ...

    def submit(
        self,
        reply: ReadReply,
        offset: int,
        length: int,
        ahead: Sequence[tuple[int, int]],
        done: Done,
    ) -> None: ...


class SpliceReads:
    """A disk's direct reads (``snapfs.fs.DirectReads``) through its ``DiskReader``: the one
    place that decides what to read ahead, and what a failure of the data path means.

    A read that continues the previous one and is large enough names the ranges after it to
    read ahead, only while they are readable now (``readable``) and not known zeros
    (``zeros``: those are answered without QEMU, see snapfs.fs); the reader uses one only for a
    READ that passed the tree's checks at its own time (punching only shrinks the readable set,
    and the snapshot's bytes never change). Failures: a lost stream sends the READ back to be
    read another way; an error of the server becomes ``on_error``'s domain error (given the
    range: punched meanwhile, or the snapshot broke). On the thread that has the READ: the
    trio thread, or the worker that reads the FUSE requests (one at a time: the READs of a
    disk come from one of them, except for a moment while the worker takes over or gives
    back, when ``follow`` may guess wrong and read ahead in vain).
    """

    def __init__(
        self,
        reader: Submits,
        size: int,
        readable: Callable[[int, int], bool],
        on_error: Callable[[NBDError, int, int], Exception],
        zeros: Callable[[int, int], bool] = lambda offset, length: False,
    ) -> None:
        self.reader = reader
        self.size = size
        self.readable = readable
        self.on_error = on_error
        self.zeros = zeros
        self._next = -1  # where the last read ended
        #: Where READs of this disk are also answered in compiled code (snapfs.fastpath),
        #: which notes where each ended there: read ahead of what continues those too.
        self.cursor: Cursor | None = None

    def follow(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Note a read; return the ranges to read ahead of it (see the class)."""
        cursor = self.cursor
        if cursor is None:
            sequential = self._next == offset
            self._next = offset + length
        else:
            sequential = cursor.next == offset
            cursor.next = offset + length
        ranges: list[tuple[int, int]] = []
        if not sequential or length < READ_AHEAD_MIN:
            return ranges
        start = offset + length
        for _ in range(READ_AHEAD):
            ahead = min(length, self.size - start)
            if ahead <= 0 or not self.readable(start, ahead) or self.zeros(start, ahead):
                break
            ranges.append((start, ahead))
            start += ahead
        return ranges

    def read(
        self, reply: ReadReply, offset: int, length: int, failed: Callable[[Exception], None]
    ) -> bool:
        if not self.reader.alive:
            return False

        def done(err: NBDError | None) -> None:
            if err is not None:
                failed(err if isinstance(err, StreamLost) else self.on_error(err, offset, length))

        self.reader.submit(reply, offset, length, self.follow(offset, length), done)
        return True
