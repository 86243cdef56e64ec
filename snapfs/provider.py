"""The reference backup provider: ``snapfs copy VIEW DEST``.

A full view (bitmap mode ``none`` or ``new``) becomes a fresh sparse image ``DEST/<disk>.raw``
(written to a temporary name, fsynced, then renamed, so a failed copy never replaces a good
image). An incremental view (``reuse``) is applied in place onto the image from the previous
backup with the same incremental ID; ``<disk>.raw.incomplete`` marks an image while it is being
updated, and re-applying the same or a later incremental view repairs it (a view that was not
committed is contained in the next one).

Only the readable regions listed in ``<disk>.dirty`` are read. Inside them, SEEK_DATA/SEEK_HOLE
skip what the view reports as holes, and all-zero blocks are punched instead of written, so
images stay sparse. With ``discard``, each copied range is punched in the view right after it
is written, which frees the fleecing image's space as the copy goes.

Everything is fsynced before success is reported.

Run as root on the host of the view, the copy reads the bytes from QEMU's NBD exports of the
view's own session (named in its state file, checked to be of the same snapshot) instead of
through the FUSE file: the same requests snapfs would make (inside the readable regions, one
per copy-before-write cluster where QEMU needs it), without a round trip through the kernel
and the serving process per chunk. Holes, discards and everything else still go through the
view. ``SNAPFS_COPY_DIRECT=0`` (or no access to the session) reads through the view only, and
so does a session on a QEMU that aborts when a client disconnects from it first
(``snapfs.qmp.client_close_aborts``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import nbd

from snapfs import paths
from snapfs.errors import CopyError, UsageError
from snapfs.libc import punch_hole
from snapfs.nbd.pool import WAIT_TIMEOUT, Pool, SavedClusters, dirty_ranges
from snapfs.records import BackupRecord, DiskFacts, Facts
from snapfs.sched import batch_scheduled

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: NBD requests, and bytes, in flight when reading QEMU's export directly: small regions
#: keep up to WINDOW requests busy, whole chunks (cut into 64 KiB requests on QEMU before
#: 8.0) up to WINDOW_BYTES.
WINDOW = 32
WINDOW_BYTES = 8 * CHUNK
#: Chunks read and written at once: enough to keep QEMU's NBD server busy on scattered regions.
WORKERS = 8
#: How long reading QEMU's export directly may wait for any reply at all.
REPLY_TIMEOUT = WAIT_TIMEOUT
RECORD = "snapfs-backup.json"


def read_regions(path: Path) -> Iterator[tuple[int, int]]:
    """Stream ``OFFSET LENGTH`` lines from a sidecar without loading it whole."""
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            try:
                first, second = line.split()
                offset, length = int(first), int(second)
            except ValueError:
                raise CopyError(f"{path}:{lineno}: not an 'OFFSET LENGTH' line") from None
            yield offset, length


@dataclass
class Stats:
    read: int = 0
    written: int = 0
    zero: int = 0
    holes: int = 0
    discarded: int = 0


class Progress:
    """A one-line progress display on a terminal; silent otherwise."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream
        self.enabled = stream.isatty()
        self._last = 0.0
        self._start = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.2 or self.done >= self.total):
            self._last = now
            rate = self.done / max(now - self._start, 1e-6) / (1 << 20)
            pct = 100 * self.done / self.total
            self.stream.write(
                f"\r{pct:5.1f}% {self.done >> 20} of {self.total >> 20} MiB, {rate:.0f} MiB/s "
            )
            self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


def fsync_path(path: Path, directory: bool = False) -> None:
    """fsync a file, or a directory (its entries)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_readable(name: str, d: DiskFacts) -> None:
    """Refuse a disk of a view whose bytes can no longer all be read."""
    if d.discarded_bytes:
        # Discarded bytes can no longer be read: a copy would miss them.
        raise CopyError(
            f"{name}: {d.discarded_bytes} bytes of this view were discarded "
            "already (an earlier copy with --discard?): mount a new snapshot"
        )


class Target(Protocol):
    """Where a disk's bytes go: a raw image file, or a qcow2 image through qemu-nbd."""

    #: The target holds older data: zeros in the view must be written, not skipped.
    keeps_old: bool

    def write(self, offset: int, data: memoryview) -> None: ...

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros."""


class FileTarget:
    """A raw image file; a new one (``in_place`` false) reads as zeros where nothing is
    written, an existing one has its zeros punched."""

    def __init__(self, fd: int, *, in_place: bool) -> None:
        self.fd = fd
        self.keeps_old = in_place

    def write(self, offset: int, data: memoryview) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], offset + done)

    def zero(self, offset: int, length: int) -> None:
        punch_hole(self.fd, offset, length)


#: Called with every range of the view as it is read: (offset, length, bytes), or None for
#: bytes the view reports as zeros. From several threads at once, for disjoint ranges.
DataHook = Callable[[int, int, "memoryview | None"], None]


def pieces(offset: int, length: int, confine: int) -> list[tuple[int, int]]:
    """[offset, offset + length) as (offset, length) requests: one, or one per aligned block
    of ``confine`` bytes it touches (see snapfs.qmp.confine_reads)."""
    out = []
    pos, end = offset, offset + length
    while pos < end:
        n = min(end, (pos // confine + 1) * confine) - pos if confine else end - pos
        out.append((pos, n))
        pos += n
    return out


class _Slot:
    """A chunk's buffer and the libnbd views of it its requests read into.

    The buffer is as long as the longest chunk it held (zeroing CHUNK bytes for every 64 KiB
    region in flight costs more than the copy of it); the views are kept per chunk shape, so
    a copy of many equal regions makes them once.
    """

    __slots__ = ("_shapes", "_view", "buf", "checked", "left", "n", "pos")

    def __init__(self) -> None:
        self.buf = bytearray()
        self._view = memoryview(self.buf)
        self._shapes: dict[tuple[int, int, int], list[tuple[nbd.Buffer, int]]] = {}
        self.pos = self.n = self.left = 0
        self.checked = False  # read in one request across clusters: check before writing

    def requests(self, pos: int, n: int, confine: int) -> list[tuple[nbd.Buffer, int]]:
        """(buffer, offset) of each request for [pos, pos + n): one, or one per ``confine``
        block (see snapfs.qmp.confine_reads)."""
        phase = pos % confine if confine else 0
        shape = self._shapes.get((phase, n, confine))
        if shape is None:
            if n > len(self.buf) or len(self._shapes) >= 64:  # bounded, whatever the shapes
                self._shapes.clear()
                if n > len(self.buf):
                    self.buf = bytearray(n)
                    self._view = memoryview(self.buf)
            shape = [
                (nbd.Buffer.from_buffer(self._view[p - phase : p - phase + k]), p)
                for p, k in pieces(phase, n, confine)
            ]
            self._shapes[phase, n, confine] = shape
        return [(piece, pos - phase + p) for piece, p in shape]


class DiskCopy:
    """Copies one disk file's readable regions into a target.

    Chunks of up to CHUNK bytes are read, checked for zeros and written by ``workers`` threads
    at once (the view serves concurrent READs of a disk in parallel, and QEMU answers them in
    any order; one reader at a time would wait out every round trip). The chunks are disjoint,
    so their writes, punches and discards may happen in any order. The first failure stops the
    copy: no new chunk starts, the ones in flight finish, and it is raised.
    """

    def __init__(
        self,
        src_fd: int,
        target: Target,
        *,
        discard: bool,
        progress: Callable[[int], None],
        workers: int = WORKERS,
        on_data: DataHook | None = None,
        direct: DirectReads | None = None,
    ) -> None:
        self.src = src_fd
        self.direct = direct
        self.target = target
        self.on_data = on_data
        self.discard = discard
        self.progress = progress
        self.workers = workers
        self.zeros = memoryview(bytes(CHUNK))
        self.stats = Stats()
        self._lock = threading.Lock()  # stats and progress
        #: Direct reads across clusters checked against the copied bitmap (QEMU before 8.0),
        #: and those read again one request per cluster.
        self.checked = 0
        self.reread = 0
        self._local = threading.local()  # each thread's buffer

    def _count(
        self, n: int, *, read: int = 0, zero: int = 0, holes: int = 0, written: int = 0
    ) -> None:
        """Account for ``n`` bytes done (what a copy that discards reads, it discards)."""
        with self._lock:
            s = self.stats
            s.read += read
            s.zero += zero
            s.holes += holes
            s.written += written
            if self.discard:
                s.discarded += read
            self.progress(n)

    def _hole(self, offset: int, length: int) -> None:
        """The view says these bytes read as zeros: the target must too."""
        if self.on_data is not None:
            self.on_data(offset, length, None)
        if self.target.keeps_old:
            self.target.zero(offset, length)

    def _data_span(self, offset: int, end: int) -> tuple[int, int]:
        """The next (data_start, data_end) at or after offset within end, or (end, end)."""
        try:
            data = os.lseek(self.src, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:
                return end, end
            raise
        if data >= end:
            return end, end
        hole = os.lseek(self.src, data, os.SEEK_HOLE)
        return data, min(hole, end)

    def _chunks(self, regions: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
        """The chunks to copy, after punching the holes the view reports on the way. Every
        byte of a region must be readable (copy_view makes sure nothing was discarded), so a
        hole SEEK_DATA finds in one reads as zeros."""
        for offset, length in regions:
            end = offset + length
            pos = offset
            while pos < end:
                if end - pos <= CHUNK:
                    # Reading this costs less than the two lseek round trips through FUSE that
                    # might skip a hole in it; its zeros are found all the same.
                    data, data_end = pos, end
                else:
                    data, data_end = self._data_span(pos, end)
                if data > pos:
                    self._hole(pos, data - pos)
                    self._count(data - pos, holes=data - pos)
                pos = data
                while pos < data_end:
                    n = min(CHUNK - pos % CHUNK, data_end - pos)
                    yield pos, n
                    pos += n

    def _read(self, pos: int, n: int) -> bytearray:
        """The bytes of [pos, pos + n) through the view (this thread's buffer, CHUNK long)."""
        buf: bytearray | None = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = bytearray(CHUNK)
        got = os.preadv(self.src, [memoryview(buf)[:n]], pos)
        if got != n:
            raise CopyError(f"short read at {pos}: {got} of {n} bytes")
        return buf

    def _chunk(self, pos: int, n: int, buf: bytearray) -> None:
        """Write (or punch) the chunk whose bytes start ``buf``."""
        if buf.startswith(self.zeros[:n]):  # memcmp; comparing memoryviews is bytewise
            self._hole(pos, n)
            zero, written = n, 0
        else:
            view = memoryview(buf)[:n]
            if self.on_data is not None:
                self.on_data(pos, n, view)
            self.target.write(pos, view)
            zero, written = 0, n
        if self.discard:
            self._discard(pos, n)
        self._count(n, read=n, zero=zero, holes=zero, written=written)

    def _copy_direct(self, chunks: Iterator[tuple[int, int]], direct: DirectReads) -> None:
        """Copy the chunks from QEMU's export in this thread, with up to WINDOW requests and
        WINDOW_BYTES in flight on one connection. A chunk is written as soon as its requests
        are answered, in whatever order QEMU answers them (the chunks are disjoint); the other
        requests stay in flight meanwhile.

        One thread, and buffers reused: a second thread for the writes made both threads wait
        for the GIL at every libnbd call and every write, which cost more than the overlap won.
        """
        confine = direct.confine
        checked = direct.checked
        saved = SavedClusters(confine) if checked else None
        pending: dict[int, _Slot] = {}  # cookie -> the chunk its request reads into
        spare: list[_Slot] = []  # slots of chunks written
        window_bytes = 0
        more = True
        timeout = int(REPLY_TIMEOUT * 1000)
        with direct.pool.connection() as h:
            # Bound once: these run for every request of the copy.
            aio_pread = h.aio_pread
            peek = h.aio_peek_command_completed
            completed = h.aio_command_completed
            chunk = self._chunk
            try:
                while True:
                    while more and len(pending) < WINDOW and window_bytes < WINDOW_BYTES:
                        nxt = next(chunks, None)
                        if nxt is None:
                            more = False
                            break
                        slot = spare.pop() if spare else _Slot()
                        pos, n = slot.pos, slot.n = nxt
                        slot.checked = saved is not None and saved.whole(pos, n)
                        pieces = slot.requests(pos, n, 0 if slot.checked else confine)
                        slot.left = len(pieces)
                        for piece, offset in pieces:
                            pending[aio_pread(piece, offset)] = slot
                        window_bytes += n
                    if not pending:
                        return
                    while (cookie := peek()) <= 0:
                        # Until some reply is in; a server that stops answering must not hold
                        # a backup forever.
                        if h.poll(timeout) == 0:
                            raise CopyError(
                                f"{direct.pool.what} did not answer in {REPLY_TIMEOUT:g} s"
                            )
                    completed(cookie)  # raises if the read failed
                    slot = pending.pop(cookie)
                    slot.left -= 1
                    if slot.left:
                        continue
                    if slot.checked:
                        # See snapfs.datapath.DiskReader: its bytes are right if, asked now,
                        # none of its clusters was saved; if one was, once more confined.
                        self.checked += 1
                        slot.checked = False
                        try:
                            bad = dirty_ranges(h, checked, slot.pos, slot.n)
                        except OSError as err:
                            raise CopyError(f"reading {direct.pool.what}: {err}") from err
                        if bad:
                            self.reread += 1
                            assert saved is not None
                            saved.note(bad)
                            pieces = slot.requests(slot.pos, slot.n, confine)
                            slot.left = len(pieces)
                            for piece, offset in pieces:
                                pending[aio_pread(piece, offset)] = slot
                            continue
                    window_bytes -= slot.n
                    chunk(slot.pos, slot.n, slot.buf)
                    spare.append(slot)
            except nbd.Error as err:
                raise CopyError(f"reading {direct.pool.what}: {err}") from err

    def copy(self, regions: Iterable[tuple[int, int]]) -> None:
        """Copy these regions (ascending ``(offset, length)``, as the sidecar lists them)."""
        if self.direct is not None:
            # This thread reads and writes everything, woken by every reply: see batch_scheduled.
            with batch_scheduled():
                self._copy_direct(self._chunks(regions), self.direct)
            if self.checked:
                log.info(
                    "%s: the copy checked %d reads across copy-before-write clusters against "
                    "the copied bitmap and read %d of them again",
                    self.direct.pool.what,
                    self.checked,
                    self.reread,
                )
            return
        failure: list[BaseException] = []
        room = threading.Semaphore(self.workers * 2)  # chunks queued or in flight

        def run(pos: int, n: int) -> None:
            try:
                if not failure:
                    self._chunk(pos, n, self._read(pos, n))
            except BaseException as err:
                failure.append(err)
            finally:
                room.release()

        with ThreadPoolExecutor(self.workers, thread_name_prefix="snapfs-copy") as pool:
            for pos, n in self._chunks(regions):
                room.acquire()
                if failure:
                    room.release()
                    break
                pool.submit(run, pos, n)
        if failure:
            raise failure[0]

    def region(self, offset: int, length: int) -> None:
        """Copy one region (see ``copy``)."""
        self.copy([(offset, length)])

    def _discard(self, offset: int, length: int) -> None:
        """Punch the copied range in the view; the view frees only whole blocks inside it, so
        unaligned chunk edges are kept for the neighbouring chunk's punch."""
        try:
            punch_hole(self.src, offset, length)
        except OSError as err:
            raise CopyError(f"discard at {offset}+{length} failed: {err}") from err


@dataclass
class DirectReads:
    """A disk's bytes straight from QEMU's export of the view (see the module's docstring)."""

    pool: Pool
    confine: int  # see snapfs.qmp.confine_reads
    #: The copied bitmap's context where ``confine`` and the pool negotiated it (see
    #: snapfs.qmp.DiskState.copied): reads across clusters are checked, not split.
    checked: str = ""


@contextlib.contextmanager
def direct_reads(
    view: Path, facts: Facts, workers: int = WORKERS
) -> Iterator[dict[str, DirectReads]]:
    """Per disk, QEMU's export of this view's session, or nothing where it cannot be used."""
    found: dict[str, DirectReads] = {}
    try:
        if os.geteuid() == 0 and os.environ.get("SNAPFS_COPY_DIRECT", "1") != "0":
            found = _direct_exports(view, facts, workers)
        yield found
    finally:
        for d in found.values():
            d.pool.close()


def _direct_exports(view: Path, facts: Facts, workers: int) -> dict[str, DirectReads]:
    from snapfs import state  # the session's state: only here (it pulls in QMP)
    from snapfs.errors import SnapfsError

    try:
        _, record = state.find_session(str(view))
    except SnapfsError as err:
        log.debug("reading through the view: %s", err)
        return {}
    graph = record.graph
    socket = graph.get("nbd_socket")
    if graph.get("snapshot_time") != facts.snapshot_time or not isinstance(socket, str):
        log.debug("reading through the view: its session is of another snapshot")
        return {}
    if graph.get("client_close_aborts", False) is not False:
        # The copy's connections would end before the session's: QEMU would abort.
        log.info(
            "reading through the view: QEMU %s aborts when a client of a disk on an I/O "
            "thread disconnects first",
            graph.get("qemu_version", ""),
        )
        return {}
    out: dict[str, DirectReads] = {}
    for disk in graph.get("disks", []):
        name = disk.get("name") if isinstance(disk, dict) else None
        if name not in facts.disks or not isinstance(disk.get("export_name"), str):
            continue
        confine = facts.disks[name].confined_reads
        copied = disk.get("copied")
        checked = f"qemu:dirty-bitmap:{copied}" if confine and isinstance(copied, str) else ""
        try:
            pool = _direct_pool(socket, disk["export_name"], name, workers, checked)
        except CopyError as err:
            if not checked:
                log.info("%s: reading through the view: %s", name, err)
                continue
            log.info("%s: reads stay inside one cluster each: %s", name, err)
            checked = ""
            try:
                pool = _direct_pool(socket, disk["export_name"], name, workers, checked)
            except CopyError as err2:
                log.info("%s: reading through the view: %s", name, err2)
                continue
        try:
            if pool.size() != facts.disks[name].size:
                raise CopyError(f"QEMU's export of {name} is not of the view's size")
        except CopyError as err:
            pool.close()
            log.info("%s: reading through the view: %s", name, err)
            continue
        out[name] = DirectReads(pool, confine, checked)
    return out


def _direct_pool(socket: str, export: str, name: str, workers: int, context: str) -> Pool:
    """A connected pool for ``export`` (negotiating ``context`` if given); raises CopyError."""
    pool = Pool(
        socket,
        export,
        clients=workers,
        what=f"QEMU's export of {name}",
        error=CopyError,
        tune=True,
        contexts=(context,) if context else (),
    )
    try:
        pool.connect()
    except CopyError:
        pool.close()
        raise
    return pool


def read_facts(view: Path) -> Facts:
    """The view's ``snapfs.json``."""
    try:
        return Facts.from_json((view / "snapfs.json").read_text(), f"{view}/snapfs.json")
    except FileNotFoundError:
        raise UsageError(f"{view} is not a snapfs view (no snapfs.json)") from None
    except ValueError as err:
        raise CopyError(str(err)) from err


def copy_view(
    view: Path, dest: Path, *, discard: bool = False, progress_stream: TextIO = sys.stderr
) -> dict[str, Any]:
    """Back up a mounted snapfs view into ``dest``; return per-disk statistics.

    As root, ``dest`` must be a path no other user can change (snapfs.paths): the copy
    creates, truncates and renames files in it."""
    if os.geteuid() == 0:
        paths.resolve(dest, "backup directory")
    facts = read_facts(view)
    if (dest / "points").exists():
        raise UsageError(f"{dest} holds restore points: copy into it with --keep N")
    dest.mkdir(parents=True, exist_ok=True)
    record_path = dest / RECORD
    try:
        record = (
            BackupRecord.from_json(record_path.read_text(), str(record_path))
            if record_path.exists()
            else None
        )
    except ValueError as err:
        raise CopyError(str(err)) from err
    incremental = facts.incremental
    # Check the whole chain before touching any image.
    for name, d in facts.disks.items():
        check_readable(name, d)
        if d.bitmap.mode != "reuse":
            continue
        if not (dest / f"{name}.raw").exists():
            raise CopyError(f"{name}: incremental view but no full image {dest / name}.raw")
        if record is None or record.incremental != incremental:
            raise CopyError(
                f"{dest} holds no backup of incremental ID {incremental!r} to apply this view to"
            )
    total = sum(d.readable_bytes for d in facts.disks.values())
    bar = Progress(total, progress_stream)
    result: dict[str, Any] = {}
    with direct_reads(view, facts) as direct:
        for name, d in facts.disks.items():
            result[name] = _copy_disk(view, dest, name, d, discard, bar.advance, direct.get(name))
    bar.finish()
    for extra in sorted(view.iterdir()):
        if extra.suffix != ".raw":
            (dest / extra.name).write_bytes(extra.read_bytes())
    new_record = BackupRecord(
        vmid=facts.vmid,
        incremental=incremental,
        snapshot_time=facts.snapshot_time,
        disks=sorted(facts.disks),
    )
    tmp = dest / (RECORD + ".tmp")
    tmp.write_text(new_record.to_json(indent=1) + "\n")
    with open(tmp) as f:
        os.fsync(f.fileno())
    tmp.replace(record_path)
    fsync_path(dest, directory=True)
    return result


def _copy_disk(
    view: Path,
    dest: Path,
    name: str,
    d: DiskFacts,
    discard: bool,
    progress: Callable[[int], None],
    direct: DirectReads | None,
) -> dict[str, int]:
    size = d.size
    in_place = d.bitmap.mode == "reuse"
    final = dest / f"{name}.raw"
    marker = dest / f"{name}.raw.incomplete"
    target = final if in_place else dest / f"{name}.raw.partial"
    src = os.open(view / f"{name}.raw", os.O_RDWR if discard else os.O_RDONLY)
    try:
        if in_place:
            marker.touch()
            fsync_path(dest, directory=True)
            dst = os.open(target, os.O_WRONLY)
        else:
            dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(dst, size)
            copier = DiskCopy(
                src,
                FileTarget(dst, in_place=in_place),
                discard=discard,
                progress=progress,
                direct=direct,
            )
            copier.copy(read_regions(view / f"{name}.dirty"))
            os.fsync(dst)
        finally:
            os.close(dst)
    except OSError as err:
        with contextlib.suppress(OSError):
            if not in_place:
                target.unlink()
        raise CopyError(f"{name}: {err}") from err
    finally:
        os.close(src)
    if not in_place:
        target.replace(final)
    fsync_path(dest, directory=True)
    marker.unlink(missing_ok=True)
    s = copier.stats
    return {
        "read": s.read,
        "written": s.written,
        "zero": s.zero,
        "holes": s.holes,
        "discarded": s.discarded,
    }
