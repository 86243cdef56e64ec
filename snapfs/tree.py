"""The mounted tree as a pure model: names, inodes, attributes, readable regions, sidecars.

Nothing here knows about FUSE, QMP or NBD. A disk's bytes come from a ``DiskSource`` (the NBD
export in production); everything else is computed from the session's facts. Errors are domain
errors (``TreeError`` subclasses); ``fs.py`` turns them into errno values at the FUSE boundary.

Layout (stable inode numbers, so a long rsync never sees an inode change)::

    1                 /
    2                 /snapfs.json
    3 + 2*i           /<disk>.raw      the disk at the snapshot point; reads limited to ``readable``
    4 + 2*i           /<disk>.dirty    one "OFFSET LENGTH" line per region of ``dirty``
    EXTRA_BASE + j    extra read-only text files (guest configuration)

Concurrency rule: all methods run on the trio thread, except the checks of a disk read
(``disk_read_length``, ``Disk.can_read``, ``Disk.count_read``), which the thread that reads the
FUSE requests (snapfs.fuse.server.Intake) calls as well: a disk's ``lock`` guards its
``readable`` set and its ``bytes_read`` against that thread. ``read`` and ``punch`` await the
source; a punch first removes its range from ``readable`` and only then discards it, so a read
that starts after the punch started is refused instead of reading a range being discarded.
"""

from __future__ import annotations

import errno as errno_mod
import json
import operator
import stat
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, Protocol

from snapfs.regions import Regions

ROOT_INO = 1
JSON_INO = 2
DISK_INO_BASE = 3
EXTRA_INO_BASE = 1 << 32

# Disk files are opened read-write (hole punching needs a writable fd) but only punching is
# allowed; 0600 keeps them root's. Sidecars and facts are 0400.
DISK_MODE = stat.S_IFREG | 0o600
TEXT_MODE = stat.S_IFREG | 0o400
DIR_MODE = stat.S_IFDIR | 0o700
# A shared tree (mounted with allow_other, which snapfs mounts with default_permissions, so the
# kernel enforces these): every user may read everything; only root may open a disk file for
# writing, so only root may punch (the FUSE layer refuses other uids' punches as well).
SHARED_DISK_MODE = stat.S_IFREG | 0o644
SHARED_TEXT_MODE = stat.S_IFREG | 0o444
SHARED_DIR_MODE = stat.S_IFDIR | 0o755

# What `stat` reports as st_blksize for disk files: cp, rsync and dd-less tools size their
# buffers from it, and 1 MiB is the request size the FUSE layer negotiates.
DISK_BLKSIZE = 1 << 20

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
SEEK_DATA = 3
SEEK_HOLE = 4


class TreeError(Exception):
    """A domain error of the tree; ``errno`` is what the FUSE layer answers."""

    errno = errno_mod.EIO


class NotFound(TreeError):
    errno = errno_mod.ENOENT


class NotADirectory(TreeError):
    errno = errno_mod.ENOTDIR


class IsADirectory(TreeError):
    errno = errno_mod.EISDIR


class ReadOnly(TreeError):
    errno = errno_mod.EROFS


class Unreadable(TreeError):
    """A read touches bytes outside the readable set. ENODATA, never invented zeros: a tool
    that got zeros would store them as the disk's content and silently corrupt the backup."""

    errno = errno_mod.ENODATA


class NotSupported(TreeError):
    errno = errno_mod.EOPNOTSUPP


class InvalidArgument(TreeError):
    errno = errno_mod.EINVAL


class NoMoreData(TreeError):
    """SEEK_DATA past the last data region (lseek(2) says ENXIO)."""

    errno = errno_mod.ENXIO


class SourceError(TreeError):
    """The source failed to deliver (NBD error, broken snapshot, VM gone)."""

    def __init__(self, message: str, errno: int = errno_mod.EIO) -> None:
        super().__init__(message)
        self.errno = errno


class DiskSource(Protocol):
    """Where a disk's bytes come from. Implementations raise ``SourceError``."""

    async def read_into(self, buf: bytearray, offset: int, length: int) -> None: ...

    async def discard(self, offset: int, length: int) -> None: ...


class ReadableMirror(Protocol):
    """A copy of a disk's readable set kept elsewhere (see ``Disk``)."""

    def remove(self, offset: int, length: int, /) -> None: ...

    @property
    def bytes(self) -> int: ...


@dataclass
class Disk:
    """One guest disk as the tree serves it.

    ``dirty`` is what this backup covers (fixed at mount); ``readable`` starts equal to it and
    shrinks as ranges are punched. ``zeros`` holds ranges known to read as zeros in the
    snapshot (from a trustworthy allocation map of a full view; empty in an incremental view).
    Invariant: SEEK_HOLE, SEEK_DATA and st_blocks follow ``zeros`` only, so a tool is shown a
    hole only where the snapshot reads as zeros. Bytes that cannot be read (outside the
    backup, or punched) look like data, and reading them fails with ENODATA: a tool that does
    not know the sidecar fails loudly instead of storing zeros for them.

    ``lock`` guards ``readable`` and ``bytes_read``: they change on the trio thread and are
    read (and counted) by the thread that reads the FUSE requests as well.

    ``mirrors``: copies of ``readable`` kept elsewhere (the compiled READ path's,
    snapfs.fastpath). A punch takes its range out of each under ``lock``, together with
    ``readable``; each counts the bytes it answered itself.
    """

    name: str
    size: int
    source: DiskSource
    dirty: Regions
    readable: Regions = field(default_factory=Regions)
    zeros: Regions = field(default_factory=Regions)
    granularity: int = 65536
    discarded: int = 0
    bytes_read: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    mirrors: list[ReadableMirror] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.readable.total and self.dirty.total:
            self.readable = self.dirty.copy()

    def can_read(self, offset: int, length: int) -> bool:
        """Whether the whole range is readable now (any thread)."""
        with self.lock:
            return self.readable.contains(offset, length)

    def count_read(self, length: int) -> None:
        """Add ``length`` (negative: take back) to ``bytes_read`` (any thread)."""
        with self.lock:
            self.bytes_read += length

    @property
    def total_read(self) -> int:
        """Bytes answered so far, here and by the mirrors."""
        return self.bytes_read + sum(m.bytes for m in self.mirrors)

    @property
    def allocated_bytes(self) -> int:
        """What st_blocks counts: the bytes a sparse copy of this file would store."""
        return self.size - self.zeros.covered_in(0, self.size)

    def reads_as_zeros(self, offset: int, length: int) -> bool:
        """Whether the whole range is a known zero of the snapshot (any thread: ``zeros`` is
        fixed when the tree is built)."""
        return length > 0 and self.zeros.contains(offset, length)

    def seek_data(self, offset: int) -> int | None:
        """The first offset at or after ``offset`` that is not a known zero, or None."""
        found = self.zeros.seek_hole(offset)
        return found if found < self.size else None

    def seek_hole(self, offset: int) -> int:
        """The first known zero at or after ``offset``, or the end of the disk."""
        found = self.zeros.seek_data(offset)
        return self.size if found is None else min(found, self.size)


class Sidecar:
    """The text of ``<disk>.dirty``, rendered on demand: one ``OFFSET LENGTH`` line per region.

    Only the line boundaries are kept (8 bytes a line), so millions of regions do not become a
    many-megabyte string; a read renders just the lines it covers. Both are done in bulk (no
    Python statement per line), the boundaries when the tree is built.
    """

    _LINE = b"%d %d\n"

    def __init__(self, regions: Regions) -> None:
        self._source = regions
        self._line_ends: array[int] | None = None
        self._index()

    def _index(self) -> array[int]:
        if self._line_ends is None:
            starts, ends = self._source.arrays()
            lengths = map(operator.sub, ends, starts)
            digits = map(operator.add, map(len, map(str, starts)), map(len, map(str, lengths)))
            self._line_ends = array("Q", accumulate(map((2).__add__, digits)))
        return self._line_ends

    @property
    def size(self) -> int:
        index = self._index()
        return index[-1] if index else 0

    def read(self, offset: int, size: int) -> bytes:
        index = self._index()
        if offset >= self.size or size <= 0:
            return b""
        i = bisect_right(index, offset)
        j = min(len(index), bisect_left(index, offset + size) + 1)
        starts, ends = self._source.arrays()
        lines = zip(starts[i:j], map(operator.sub, ends[i:j], starts[i:j]), strict=True)
        text = b"".join(map(self._LINE.__mod__, lines))
        first = index[i - 1] if i else 0
        return text[offset - first : offset - first + size]


@dataclass(frozen=True)
class Attr:
    ino: int
    mode: int
    size: int
    blocks: int
    blksize: int = 4096


@dataclass(frozen=True)
class Entry:
    ino: int
    name: str
    mode: int


class Tree:
    """The whole mounted tree of one session. ``facts`` is rendered as snapfs.json on demand.
    ``shared``: readable by every user (the SHARED_* modes), for a mount with allow_other."""

    def __init__(
        self,
        disks: Sequence[Disk],
        facts: Callable[[], dict[str, Any]],
        extra_files: dict[str, bytes] | None = None,
        mtime_ns: int = 0,
        shared: bool = False,
    ) -> None:
        self.disks = list(disks)
        self._dir_mode, self._disk_mode, self._text_mode = (
            (SHARED_DIR_MODE, SHARED_DISK_MODE, SHARED_TEXT_MODE)
            if shared
            else (DIR_MODE, DISK_MODE, TEXT_MODE)
        )
        self.facts = facts
        self.mtime_ns = mtime_ns
        self._sidecars = [Sidecar(d.dirty) for d in self.disks]
        self._extra = dict(extra_files or {})
        self._names: dict[str, int] = {"snapfs.json": JSON_INO}
        for i, d in enumerate(self.disks):
            self._names[f"{d.name}.raw"] = DISK_INO_BASE + 2 * i
            self._names[f"{d.name}.dirty"] = DISK_INO_BASE + 2 * i + 1
        for j, name in enumerate(self._extra):
            self._names[name] = EXTRA_INO_BASE + j
        self._extra_by_ino = {
            EXTRA_INO_BASE + j: data for j, data in enumerate(self._extra.values())
        }

    # -- names -----------------------------------------------------------------------------------

    def lookup(self, parent: int, name: str) -> Attr:
        if parent != ROOT_INO:
            raise NotADirectory(name)
        try:
            return self.getattr(self._names[name])
        except KeyError:
            raise NotFound(name) from None

    def listdir(self) -> list[Entry]:
        return [Entry(ino, name, self.getattr(ino).mode) for name, ino in self._names.items()]

    def _disk(self, ino: int) -> tuple[Disk, bool]:
        """(disk, is_raw) for a disk or sidecar inode."""
        i, kind = divmod(ino - DISK_INO_BASE, 2)
        if ino < DISK_INO_BASE or i >= len(self.disks):
            raise NotFound(str(ino))
        return self.disks[i], kind == 0

    # -- attributes ------------------------------------------------------------------------------

    def json_bytes(self) -> bytes:
        return (json.dumps(self.facts(), indent=2, sort_keys=True) + "\n").encode()

    def getattr(self, ino: int) -> Attr:
        if ino == ROOT_INO:
            return Attr(ino, self._dir_mode, 0, 0)
        if ino == JSON_INO:
            size = len(self.json_bytes())
            return Attr(ino, self._text_mode, size, _blocks(size))
        if ino in self._extra_by_ino:
            size = len(self._extra_by_ino[ino])
            return Attr(ino, self._text_mode, size, _blocks(size))
        disk, is_raw = self._disk(ino)
        if is_raw:
            return Attr(
                ino, self._disk_mode, disk.size, _blocks(disk.allocated_bytes), DISK_BLKSIZE
            )
        size = self._sidecars[self.disks.index(disk)].size
        return Attr(ino, self._text_mode, size, _blocks(size))

    def is_disk(self, ino: int) -> bool:
        return DISK_INO_BASE <= ino < DISK_INO_BASE + 2 * len(self.disks) and (
            (ino - DISK_INO_BASE) % 2 == 0
        )

    def full(self, ino: int) -> bool:
        """Whether a disk file's backup covers the whole disk (a full view)."""
        disk, _ = self._disk(ino)
        return disk.dirty.total == disk.size

    def open(self, ino: int, writable: bool, truncate: bool) -> None:
        """Opening a disk file read-write succeeds (fallocate needs it); nothing else may be
        opened for writing, and nothing may be truncated."""
        if ino == ROOT_INO:
            raise IsADirectory("/")
        self.getattr(ino)
        if truncate or (writable and not self.is_disk(ino)):
            raise ReadOnly(str(ino))

    # -- data ------------------------------------------------------------------------------------

    def read_text(self, ino: int, offset: int, size: int) -> bytes:
        """Reads of the small text files: snapfs.json, sidecars, extra files."""
        if ino == JSON_INO:
            return self.json_bytes()[offset : offset + size]
        if ino in self._extra_by_ino:
            return self._extra_by_ino[ino][offset : offset + size]
        disk, is_raw = self._disk(ino)
        if is_raw:
            raise InvalidArgument("disk files are read with read_disk")
        return self._sidecars[self.disks.index(disk)].read(offset, size)

    def disk_read_length(self, ino: int, offset: int, size: int) -> tuple[Disk, int]:
        """Check a read of a disk file; return the disk and how many bytes it yields.

        A read entirely past the end yields 0. A read that touches a byte outside the readable
        set is refused as a whole (ENODATA), never shortened: a short read would hide where the
        boundary is and tools would retry into it.
        """
        disk, is_raw = self._disk(ino)
        if not is_raw:
            raise InvalidArgument("sidecars are read with read_text")
        if offset < 0:
            raise InvalidArgument("negative offset")
        length = max(0, min(size, disk.size - offset))
        if length and not disk.can_read(offset, length):
            raise Unreadable(f"{disk.name}: {offset}+{length} is outside the readable set")
        return disk, length

    async def read_disk(self, ino: int, buf: bytearray, offset: int, size: int) -> int:
        """Read into ``buf``; return the byte count. See ``disk_read_length`` for the rules."""
        disk, length = self.disk_read_length(ino, offset, size)
        if length:
            await disk.source.read_into(buf, offset, length)
            disk.count_read(length)
        return length

    def lseek(self, ino: int, offset: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE of a disk file: holes are the known zeros (see ``Disk``); text
        files are all data."""
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise InvalidArgument(f"whence {whence}")
        size = self.getattr(ino).size
        if offset < 0:
            raise InvalidArgument("negative offset")
        if offset >= size:
            raise NoMoreData(str(offset))
        if not self.is_disk(ino):
            return offset if whence == SEEK_DATA else size
        disk, _ = self._disk(ino)
        if whence == SEEK_DATA:
            found = disk.seek_data(offset)
            if found is None:
                raise NoMoreData(str(offset))
            return found
        return disk.seek_hole(offset)

    async def punch(self, ino: int, offset: int, length: int, mode: int) -> int:
        """Discard ``[offset, offset+length)`` of a disk's snapshot; return bytes discarded.

        Only whole granularity blocks inside the range are discarded, so a punch never frees
        more than asked; those blocks become unreadable, and stay data to SEEK_HOLE and
        st_blocks (they are not zeros in the snapshot). The sidecar is unchanged.
        """
        if mode != FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE:
            raise NotSupported(f"fallocate mode {mode:#x}")
        if not self.is_disk(ino):
            raise NotSupported("only disk files can be punched")
        disk, _ = self._disk(ino)
        if offset < 0 or length <= 0:
            raise InvalidArgument("empty or negative range")
        # The disk is a fixed-size device image: a punch that starts past its end is a
        # provider's bug, not a no-op to let pass silently.
        if offset >= disk.size:
            raise InvalidArgument(f"punch at {offset} is past the end of {disk.name}")
        g = disk.granularity
        end = min(offset + length, disk.size)
        start = -(-offset // g) * g
        # The disk's last block may be partial: a punch reaching the end covers it.
        stop = end if end == disk.size else end // g * g
        if stop <= start:
            return 0
        removed_regions = [(s, n) for s, n in disk.readable if s < stop and s + n > start]
        with disk.lock:
            removed = disk.readable.remove(start, stop - start)
            for mirror in disk.mirrors:
                mirror.remove(start, stop - start)
        # Discard only what was readable: the rest is not in the snapshot's access bitmap.
        for s, n in removed_regions:
            lo, hi = max(s, start), min(s + n, stop)
            await disk.source.discard(lo, hi - lo)
        disk.discarded += removed
        return removed


def _blocks(size: int) -> int:
    return (size + 511) // 512
