"""Restore points: ``snapfs copy --keep N``, ``points``, ``restore`` and ``verify``.

A destination with restore points looks like this::

    DEST/points/<ID>/manifest.json    the point's PointManifest, written last
    DEST/points/<ID>/<disk>.qcow2     a base image (full view), or an overlay holding only the
                                      regions of that run, backing file ../<older ID>/<disk>.qcow2
    DEST/points/<ID>/<disk>.sums      SHA-256 of every 1 MiB of the disk at that point
    DEST/points/<ID>/<disk>.dirty, snapfs.json, qemu-server.conf, ...   copied from the view
    DEST/points/.incomplete-<ID>/     a point being written; the next run removes it
    DEST/points/.lock                 flock: exclusive while points change, shared while read

``<ID>`` is the snapshot time in UTC (``20261201T010002Z``), so names sort by time.

Invariants:

- a directory named ``<ID>`` holds a complete point: it is renamed into place only after every
  file in it and the directory itself are fsynced; an interrupted run leaves earlier points
  as they were;
- every overlay's backing point exists (points are pruned oldest first);
- pruning a point whose disk is the backing file of a kept point first marks it (``.pruning``:
  it is no longer listed), merges the kept point's overlay into it (``qemu-img commit -d``: the
  overlay keeps its data, so the kept point reads the same all the while) and renames the
  merged image over the overlay (atomic). A crash anywhere in between loses no kept point,
  and the next run finishes the prune.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from snapfs import paths, qemuimg
from snapfs.errors import CopyError, UsageError
from snapfs.provider import (
    RECORD,
    WORKERS,
    DirectReads,
    DiskCopy,
    Progress,
    check_readable,
    direct_reads,
    fsync_path,
    read_regions,
)
from snapfs.records import DiskFacts, Facts, PointDisk, PointManifest

log = logging.getLogger(__name__)

POINTS = "points"
MANIFEST = "manifest.json"
PRUNING = ".pruning"
INCOMPLETE = ".incomplete-"
SUM_CHUNK = 1 << 20
DIGEST = 32
CHECKSUM_PREFIX = "sha256/1M:"
ID_RE = re.compile(r"\d{8}T\d{6}Z")
#: Files of a view a point keeps besides its images (what a restore of the whole VM needs).
VIEW_FILES = re.compile(r"[A-Za-z0-9_.-]+\.(dirty|json|conf|fw)")


def point_id(snapshot_time: str) -> str:
    """The point's name: its snapshot time in UTC, to the second."""
    try:
        t = datetime.fromisoformat(snapshot_time)
    except ValueError as err:
        raise CopyError(f"snapshot time {snapshot_time!r} is not ISO 8601") from err
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def _write_durably(path: Path, data: bytes) -> None:
    """Write a file and fsync it (not its directory)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_durably(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _write_durably(tmp, data)
    tmp.replace(path)
    fsync_path(path.parent, directory=True)


# -- checksums ------------------------------------------------------------------------------------


def _chunk_len(size: int, index: int) -> int:
    return min(SUM_CHUNK, size - index * SUM_CHUNK)


class Sums:
    """The SHA-256 of every SUM_CHUNK of a disk, as one bytes object (32 bytes per chunk).

    An incremental point starts from its backing point's sums and forgets the chunks its
    regions touch; the copy fills in every chunk it reads whole (``seen``, from the copy's
    threads), and ``fill`` reads the rest back from the new image.
    """

    def __init__(self, size: int, previous: bytes | None = None) -> None:
        self.size = size
        self.count = -(-size // SUM_CHUNK)
        if previous is not None and len(previous) != self.count * DIGEST:
            raise CopyError("the backing point's checksums do not match the disk's size")
        self.data = bytearray(previous) if previous is not None else bytearray(self.count * DIGEST)
        self.known = bytearray(b"\1" * self.count if previous is not None else self.count)
        self._zero = {SUM_CHUNK: hashlib.sha256(bytes(SUM_CHUNK)).digest()}

    def zero_digest(self, n: int) -> bytes:
        if n not in self._zero:
            self._zero[n] = hashlib.sha256(bytes(n)).digest()
        return self._zero[n]

    def forget(self, offset: int, length: int) -> None:
        first, last = offset // SUM_CHUNK, (offset + length - 1) // SUM_CHUNK
        self.known[first : last + 1] = bytes(last + 1 - first)

    def _set(self, index: int, digest: bytes) -> None:
        self.data[index * DIGEST : (index + 1) * DIGEST] = digest
        self.known[index] = 1

    def seen(self, offset: int, length: int, data: memoryview | None) -> None:
        """The bytes at offset (None: zeros); whole chunks among them get their digest."""
        index = -(-offset // SUM_CHUNK)
        while index < self.count:
            start = index * SUM_CHUNK
            n = _chunk_len(self.size, index)
            if start + n > offset + length:
                break
            if data is None:
                self._set(index, self.zero_digest(n))
            else:
                self._set(index, hashlib.sha256(data[start - offset : start - offset + n]).digest())
            index += 1

    def missing(self) -> Iterator[int]:
        i = self.known.find(0)
        while i >= 0:
            yield i
            i = self.known.find(0, i + 1)

    def fill(self, read: Callable[[int, int], bytes | bytearray], workers: int = WORKERS) -> int:
        """Hash the chunks not seen whole, reading them with ``read(length, offset)``; returns
        how many."""

        def one(index: int) -> None:
            n = _chunk_len(self.size, index)
            self._set(index, hashlib.sha256(read(n, index * SUM_CHUNK)).digest())

        todo = list(self.missing())
        with ThreadPoolExecutor(workers, thread_name_prefix="snapfs-sums") as pool:
            for _ in pool.map(one, todo):
                pass
        return len(todo)

    def checksum(self) -> str:
        assert not any(True for _ in self.missing())
        return CHECKSUM_PREFIX + hashlib.sha256(self.data).hexdigest()


def checksum_of(sums: bytes) -> str:
    return CHECKSUM_PREFIX + hashlib.sha256(sums).hexdigest()


# -- the store ------------------------------------------------------------------------------------


@dataclass
class Point:
    id: str
    path: Path
    manifest: PointManifest

    @property
    def time(self) -> datetime:
        return datetime.fromisoformat(self.manifest.snapshot_time)

    def disk_usage(self) -> int:
        total = 0
        for f in self.path.iterdir():
            with contextlib.suppress(FileNotFoundError):
                total += f.lstat().st_blocks * 512
        return total

    def changed_bytes(self) -> int:
        return sum(d.dirty_bytes for d in self.manifest.disks.values())


class _ImageTarget:
    """A DiskCopy target: a qcow2 image through qemu-nbd."""

    def __init__(self, server: qemuimg.Server, *, keeps_old: bool) -> None:
        self.server = server
        self.keeps_old = keeps_old

    def write(self, offset: int, data: memoryview) -> None:
        self.server.pool.pwrite(data, offset)

    def zero(self, offset: int, length: int) -> None:
        self.server.pool.zero(length, offset)


class Store:
    """The restore points in one destination directory."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.dir = dest / POINTS
        self._lock_fd: int | None = None

    # -- locking and recovery

    @contextlib.contextmanager
    def locked(self, *, exclusive: bool) -> Iterator[Store]:
        """Hold the store's lock; never waits: another snapfs changing the points is an error.
        The destination must be a trusted path (snapfs.paths): the images name their backing
        files, and root reads and merges whatever they name."""
        paths.resolve(self.dest, "backup directory")
        if exclusive:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        elif not self.dir.is_dir():
            raise UsageError(f"{self.dest} holds no restore points (no {POINTS}/)")
        if self.dir.is_symlink():
            raise UsageError(f"{self.dir} is a symbolic link")
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise CopyError(
                f"{self.dest} is in use by another snapfs copy, prune or restore: try again later"
            ) from None
        self._lock_fd = fd
        try:
            yield self
        finally:
            self._lock_fd = None
            os.close(fd)

    def incomplete(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.iterdir() if p.name.startswith(INCOMPLETE))

    def recover(self) -> list[str]:
        """Finish what an interrupted run left (exclusive lock held); what was done, in words."""
        done: list[str] = []
        for path in self.incomplete():
            shutil.rmtree(path)
            done.append(
                f"removed the incomplete point {path.name.removeprefix(INCOMPLETE)} "
                "of an interrupted run (earlier points are intact)"
            )
        for path in sorted(self.dir.iterdir()):
            if ID_RE.fullmatch(path.name) and (path / PRUNING).exists():
                self._finish_drop(self._load(path))
                done.append(f"finished pruning point {path.name}")
        if done:
            fsync_path(self.dir, directory=True)
        return done

    # -- reading

    def _load(self, path: Path) -> Point:
        text = (path / MANIFEST).read_text()
        try:
            manifest = PointManifest.from_json(text, str(path / MANIFEST))
        except ValueError as err:
            raise CopyError(str(err)) from err
        if manifest.id != path.name:
            raise CopyError(f"{path / MANIFEST} is of point {manifest.id!r}, not {path.name!r}")
        return Point(path.name, path, manifest)

    def points(self) -> list[Point]:
        """Complete points, oldest first (points being pruned are not listed)."""
        if not self.dir.is_dir():
            return []
        out = []
        for path in sorted(self.dir.iterdir()):
            if not ID_RE.fullmatch(path.name) or (path / PRUNING).exists():
                continue
            if not (path / MANIFEST).exists():
                raise CopyError(f"{path} has no {MANIFEST}: not a restore point")
            out.append(self._load(path))
        return out

    def find(self, at: str | None) -> Point:
        """The point named ``at``, or the newest one taken at or before the time ``at`` (a date
        alone means the end of that day; local time unless a zone is given); the newest with
        None."""
        points = self.points()
        if not points:
            raise UsageError(f"{self.dest} holds no restore points")
        if at is None:
            return points[-1]
        for p in points:
            if p.id == at:
                return p
        when = parse_time(at)
        earlier = [p for p in points if p.time <= when]
        if not earlier:
            raise UsageError(
                f"no restore point at or before {at} (the oldest is {points[0].id}, "
                f"{points[0].manifest.snapshot_time})"
            )
        return earlier[-1]

    # -- writing a point

    def add(
        self,
        view: Path,
        facts: Facts,
        *,
        discard: bool,
        progress_stream: TextIO = sys.stderr,
    ) -> dict[str, dict[str, int]]:
        """Write the view as a new point (exclusive lock held); per-disk statistics."""
        pid = point_id(facts.snapshot_time)
        points = self.points()
        if any(p.id == pid for p in points):
            raise CopyError(f"{self.dest} already holds point {pid} (this snapshot)")
        if points and points[-1].id > pid:
            raise CopyError(f"this snapshot ({pid}) is older than the newest point {points[-1].id}")
        parents: dict[str, Point | None] = {}
        for name, d in facts.disks.items():
            parents[name] = self._parent(points, name, d, facts)
        tmp = self.dir / (INCOMPLETE + pid)
        tmp.mkdir(mode=0o700)
        total = sum(d.readable_bytes for d in facts.disks.values())
        bar = Progress(total, progress_stream)
        stats: dict[str, dict[str, int]] = {}
        disks: dict[str, PointDisk] = {}
        with direct_reads(view, facts) as direct:
            for name, d in facts.disks.items():
                disks[name], stats[name] = self._write_disk(
                    view, tmp, name, d, parents[name], discard, bar.advance, direct.get(name)
                )
        bar.finish()
        for extra in sorted(view.iterdir()):
            if VIEW_FILES.fullmatch(extra.name) and extra.is_file():
                _write_durably(tmp / extra.name, extra.read_bytes())
        manifest = PointManifest(
            id=pid,
            vmid=facts.vmid,
            snapshot_time=facts.snapshot_time,
            completed=datetime.now(UTC).isoformat(timespec="milliseconds"),
            incremental=facts.incremental,
            disks=disks,
        )
        _write_durably(tmp / MANIFEST, (manifest.to_json(indent=1) + "\n").encode())
        fsync_path(tmp, directory=True)
        tmp.rename(self.dir / pid)
        fsync_path(self.dir, directory=True)
        return stats

    def _parent(self, points: list[Point], name: str, d: DiskFacts, facts: Facts) -> Point | None:
        """The point an incremental disk's overlay goes on: the newest one with this disk."""
        check_readable(name, d)
        if d.bitmap.mode != "reuse":
            return None
        with_disk = [p for p in points if name in p.manifest.disks]
        if not with_disk:
            raise CopyError(f"{name}: incremental view but no restore point holds this disk yet")
        parent = with_disk[-1]
        if parent.manifest.incremental != facts.incremental:
            raise CopyError(
                f"{name}: the newest point with this disk ({parent.id}) is of incremental ID "
                f"{parent.manifest.incremental!r}, not {facts.incremental!r}"
            )
        if parent.manifest.disks[name].size != d.size:
            raise CopyError(f"{name}: its size changed since point {parent.id}")
        return parent

    def _write_disk(
        self,
        view: Path,
        tmp: Path,
        name: str,
        d: DiskFacts,
        parent: Point | None,
        discard: bool,
        progress: Callable[[int], None],
        direct: DirectReads | None,
    ) -> tuple[PointDisk, dict[str, int]]:
        image = tmp / f"{name}.qcow2"
        backing = None
        previous = None
        if parent is not None:
            backing = f"../{parent.id}/{parent.manifest.disks[name].image}"
            previous = (parent.path / f"{name}.sums").read_bytes()
        qemuimg.create(image, d.size, backing)
        regions_file = view / f"{name}.dirty"
        sums = Sums(d.size, previous)
        regions = 0
        for offset, length in read_regions(regions_file):
            sums.forget(offset, length)
            regions += 1
        try:
            src = os.open(view / f"{name}.raw", os.O_RDWR if discard else os.O_RDONLY)
        except OSError as err:
            raise CopyError(f"{name}: {err}") from err
        try:
            with qemuimg.Server(image, writable=True, clients=WORKERS) as server:
                copier = DiskCopy(
                    src,
                    _ImageTarget(server, keeps_old=parent is not None),
                    discard=discard,
                    progress=progress,
                    on_data=sums.seen,
                    direct=direct,
                )
                copier.copy(read_regions(regions_file))
                server.pool.flush()
                sums.fill(server.pool.pread)
                server.pool.flush()
        except OSError as err:
            raise CopyError(f"{name}: {err}") from err
        finally:
            os.close(src)
        fsync_path(image)
        _write_durably(tmp / f"{name}.sums", bytes(sums.data))
        s = copier.stats
        disk = PointDisk(
            size=d.size,
            image=image.name,
            backing=parent.id if parent is not None else None,
            mode="incremental" if parent is not None else "full",
            dirty_bytes=d.dirty_bytes,
            dirty_regions=regions,
            written=s.written,
            zero=s.holes,
            checksum=sums.checksum(),
        )
        return disk, {
            "read": s.read,
            "written": s.written,
            "zero": s.zero,
            "holes": s.holes,
            "discarded": s.discarded,
        }

    # -- pruning

    def prune(self, keep: int) -> list[str]:
        """Keep the newest ``keep`` points (exclusive lock held); the ids dropped."""
        points = self.points()
        dropped = []
        for p in points[: max(len(points) - keep, 0)]:
            (p.path / PRUNING).touch()
            fsync_path(p.path, directory=True)
            self._finish_drop(p)
            dropped.append(p.id)
        return dropped

    def _children(self, parent: Point) -> dict[str, Point]:
        """disk name -> the point whose overlay of that disk has ``parent`` as backing point."""
        out: dict[str, Point] = {}
        for p in self.points():
            for name, disk in p.manifest.disks.items():
                if disk.backing == parent.id:
                    out[name] = p
        return out

    def _finish_drop(self, p: Point) -> None:
        """Merge ``p`` into the points that build on it, then remove it (see the module's
        invariants; safe to run again after a crash at any step)."""
        children = self._children(p)
        for name, disk in p.manifest.disks.items():
            child = children.get(name)
            if child is None:
                continue
            top = child.path / child.manifest.disks[name].image
            base = p.path / disk.image
            if base.exists():
                qemuimg.commit(top, disk.size)
                fsync_path(base)
                base.replace(top)
                fsync_path(child.path, directory=True)
            child.manifest.disks[name].backing = None
            child.manifest.disks[name].mode = "full"
            _replace_durably(
                child.path / MANIFEST, (child.manifest.to_json(indent=1) + "\n").encode()
            )
        shutil.rmtree(p.path)
        fsync_path(self.dir, directory=True)

    # -- verifying

    def verify(self, point: Point, report: Callable[[str], None]) -> list[str]:
        """Re-read every disk of a point and check it against its manifest; what is wrong."""
        problems: list[str] = []
        for name, disk in point.manifest.disks.items():
            image = point.path / disk.image
            what = f"{point.id} {name}"
            if not image.is_file():
                problems.append(f"{what}: {disk.image} is missing")
                continue
            for link in _chain(image):
                bad = qemuimg.check(link)
                if bad:
                    problems.append(f"{what}: {link.name} of {link.parent.name}: {bad}")
            sums_path = point.path / f"{name}.sums"
            try:
                sums = sums_path.read_bytes()
            except OSError as err:
                problems.append(f"{what}: {sums_path.name}: {err.strerror}")
                continue
            if checksum_of(sums) != disk.checksum:
                problems.append(f"{what}: {sums_path.name} does not match the manifest's checksum")
                continue
            bad_chunks = _reread(image, disk.size, sums)
            if isinstance(bad_chunks, str):
                problems.append(f"{what}: {bad_chunks}")
            elif bad_chunks:
                first = ", ".join(f"{i * SUM_CHUNK}" for i in bad_chunks[:4])
                problems.append(
                    f"{what}: {len(bad_chunks)} MiB differ from the checksums (at {first}...)"
                )
            else:
                report(f"{what}: ok ({disk.size} bytes, {disk.checksum[:24]}...)")
        return problems

    # -- restoring

    def restore_disk(
        self,
        point: Point,
        name: str,
        target: Path,
        out_format: str | None,
        *,
        force: bool,
        progress: bool,
    ) -> str:
        """Write one disk of a point to ``target``; the format written."""
        if name not in point.manifest.disks:
            raise UsageError(
                f"point {point.id} has no disk {name!r} (it has {', '.join(point.manifest.disks)})"
            )
        disk = point.manifest.disks[name]
        image = point.path / disk.image
        try:
            st = target.stat()
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISBLK(st.st_mode):
            if out_format not in (None, "raw"):
                raise UsageError(f"{target} is a block device: only raw can be written to it")
            size = _device_size(target)
            if size < disk.size:
                raise UsageError(
                    f"{target} has {size} bytes, less than the disk's {disk.size}: nothing written"
                )
            qemuimg.convert(image, target, "raw", existing=True, progress=progress, size=disk.size)
            return "raw"
        fmt = out_format or ("qcow2" if target.suffix == ".qcow2" else "raw")
        if st is not None:
            if not stat.S_ISREG(st.st_mode):
                raise UsageError(f"{target} is neither a regular file nor a block device")
            if not force:
                raise UsageError(f"{target} exists: remove it or use --force")
        if not target.parent.is_dir():
            raise UsageError(f"{target.parent} is not a directory")
        # The image goes into a scratch directory made there: no other user may rename it.
        paths.resolve(target.parent, "restore target's directory")
        # Written in a private directory beside the target, then renamed over it: a failed
        # restore leaves no half image under the target's name, and no name that someone
        # else can write in (a symlink planted there) is ever opened.
        scratch = Path(tempfile.mkdtemp(prefix=".snapfs-restore-", dir=target.parent))
        try:
            partial = scratch / target.name
            qemuimg.convert(image, partial, fmt, existing=False, progress=progress, size=disk.size)
            fsync_path(partial)
            partial.replace(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        fsync_path(target.parent, directory=True)
        return fmt

    def restore_vm(
        self, point: Point, to_dir: Path, out_format: str | None, *, progress: bool
    ) -> list[Path]:
        """Every disk of a point plus its configuration into a new or empty directory."""
        paths.resolve(to_dir, "restore directory")
        if to_dir.exists() and any(to_dir.iterdir()):
            raise UsageError(f"{to_dir} is not empty")
        to_dir.mkdir(parents=True, exist_ok=True)
        written = []
        fmt = out_format or "raw"
        for name in point.manifest.disks:
            target = to_dir / f"{name}.{fmt}"
            self.restore_disk(point, name, target, fmt, force=False, progress=progress)
            written.append(target)
        for extra in sorted(point.path.iterdir()):
            if extra.suffix in (".json", ".conf", ".fw", ".dirty"):
                shutil.copyfile(extra, to_dir / extra.name)
                written.append(to_dir / extra.name)
        fsync_path(to_dir, directory=True)
        return written


def _chain(image: Path) -> Iterator[Path]:
    """The image and its backing files, top first."""
    seen = set()
    path: Path | None = image
    while path is not None and path not in seen:
        seen.add(path)
        yield path
        backing = qemuimg.info(path).get("backing-filename")
        path = (path.parent / backing).resolve() if isinstance(backing, str) else None


def _reread(image: Path, size: int, sums: bytes) -> list[int] | str:
    """Indices of the chunks whose bytes no longer match; a string if the image is unreadable."""
    count = -(-size // SUM_CHUNK)
    if len(sums) != count * DIGEST:
        return f"{count} checksums expected, {len(sums) // DIGEST} found"
    bad: list[int] = []
    try:
        zero = _zero_chunks(image, size)
        with qemuimg.Server(image, writable=False, clients=WORKERS) as server:
            if server.pool.size() != size:
                return f"the image has {server.pool.size()} bytes, the manifest says {size}"

            def one(index: int) -> bool:
                n = _chunk_len(size, index)
                want = sums[index * DIGEST : (index + 1) * DIGEST]
                if zero[index]:
                    # The chain says these bytes read as zeros (a wrong zero flag still
                    # differs from the checksum): no need to read them.
                    return hashlib.sha256(bytes(n)).digest() == want
                return hashlib.sha256(server.pool.pread(n, index * SUM_CHUNK)).digest() == want

            with ThreadPoolExecutor(WORKERS, thread_name_prefix="snapfs-verify") as pool:
                for index, ok in enumerate(pool.map(one, range(count))):
                    if not ok:
                        bad.append(index)
    except CopyError as err:
        return str(err)
    return bad


def _zero_chunks(image: Path, size: int) -> bytearray:
    """1 for every SUM_CHUNK that the chain's map says reads as zeros."""
    out = bytearray(-(-size // SUM_CHUNK))
    for extent in qemuimg.map_chain(image, size):
        if not extent.get("zero"):
            continue
        start, end = int(extent["start"]), int(extent["start"]) + int(extent["length"])
        first = -(-start // SUM_CHUNK)
        while first * SUM_CHUNK < end:
            if min(size, (first + 1) * SUM_CHUNK) > end:
                break
            out[first] = 1
            first += 1
    return out


def _device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def parse_time(text: str) -> datetime:
    """An ISO 8601 date or time; a date alone is the end of that day; local time unless a zone
    is given."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            t = datetime.fromisoformat(text) + timedelta(days=1, microseconds=-1)
        else:
            t = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"--at {text!r} is neither a point's ID nor a date or time (2026-11-24, "
            "2026-11-24T13:00, 20261124T010002Z)"
        ) from None
    if t.tzinfo is None:
        t = t.astimezone()  # local time
    return t


def copy_points(
    view: Path,
    dest: Path,
    facts: Facts,
    keep: int,
    *,
    discard: bool,
    progress_stream: TextIO = sys.stderr,
) -> dict[str, Any]:
    """``snapfs copy --keep N``: the view becomes a new point, then the oldest beyond ``keep``
    are merged away."""
    if keep < 1:
        raise UsageError("--keep must be at least 1")
    if (dest / RECORD).exists():
        raise UsageError(
            f"{dest} holds in-place images ({RECORD}): keep restore points in another directory"
        )
    store = Store(dest)
    with store.locked(exclusive=True):
        for line in store.recover():
            log.warning("%s", line)
        stats = store.add(view, facts, discard=discard, progress_stream=progress_stream)
        for pid in store.prune(keep):
            log.info("pruned point %s (its data is merged into the next one)", pid)
    return stats


def describe(dest: Path) -> dict[str, Any]:
    """What ``snapfs points`` shows."""
    store = Store(dest)
    with store.locked(exclusive=False):
        rows = []
        for p in store.points():
            rows.append(
                {
                    "id": p.id,
                    "snapshot_time": p.manifest.snapshot_time,
                    "incremental": p.manifest.incremental,
                    "disks": {
                        name: {"mode": d.mode, "size": d.size, "changed": d.dirty_bytes}
                        for name, d in p.manifest.disks.items()
                    },
                    "changed_bytes": p.changed_bytes(),
                    "disk_usage": p.disk_usage(),
                }
            )
        interrupted = [p.name.removeprefix(INCOMPLETE) for p in store.incomplete()]
    return {"dest": str(dest), "points": rows, "interrupted": interrupted}
