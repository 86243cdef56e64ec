"""The FUSE kernel protocol: opcodes, flags and precompiled struct codecs.

Pure code, no I/O. Layouts follow ``/usr/include/linux/fuse.h`` (protocol 7.38). Every struct is
in host byte order with standard sizes and no implicit padding (``=``); explicit padding bytes
(``x``) keep each one at the size the header gives it, which ``tests/test_fuse_protocol.py``
checks. Replies are packed with ``Struct.pack`` on module-level objects so the request loop
builds no format strings, dicts or dataclasses per request.
"""

from __future__ import annotations

import enum
import stat
import struct
from dataclasses import dataclass

from snapfs.fuse.ops import Attr

KERNEL_VERSION = 7
#: The newest minor we implement; the kernel uses min(ours, its own).
KERNEL_MINOR_VERSION = 38
ROOT_ID = 1
#: The kernel refuses a read of /dev/fuse into a smaller buffer.
MIN_READ_BUFFER = 8192
PAGE_SIZE = 4096


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36  # no reply
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51


# fuse_init_in/out.flags (the low 32 bits; flags2 holds the high ones since 7.36).
FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_MAX_PAGES = 1 << 22
FUSE_INIT_EXT = 1 << 30

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6

# fuse_getattr_in.getattr_flags
FUSE_GETATTR_FH = 1 << 0

# --- headers -------------------------------------------------------------------------------------
#: fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding (40 bytes).
IN_HEADER = struct.Struct("=IIQQIIIHH")
#: fuse_out_header: len, error (negative errno or 0), unique (16 bytes).
OUT_HEADER = struct.Struct("=IiQ")

# --- INIT ----------------------------------------------------------------------------------------
#: fuse_init_in before 7.36: major, minor, max_readahead, flags (16 bytes).
INIT_IN_COMPAT = struct.Struct("=IIII")
#: fuse_init_in since 7.36: ..., flags2, unused[11] (64 bytes).
INIT_IN = struct.Struct("=IIIII44x")
#: fuse_init_out: major, minor, max_readahead, flags, max_background, congestion_threshold,
#: max_write, time_gran, max_pages, map_alignment, flags2, unused[7] (64 bytes).
INIT_OUT = struct.Struct("=IIIIHHIIHHI28x")
#: What a kernel older than 7.23 accepts as fuse_init_out.
INIT_OUT_COMPAT_22_SIZE = 24

# --- attributes and entries ----------------------------------------------------------------------
#: fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode,
#: nlink, uid, gid, rdev, blksize, flags (88 bytes).
_ATTR_FMT = "QQQQQQIIIIIIIIII"
ATTR = struct.Struct("=" + _ATTR_FMT)
#: fuse_entry_out: nodeid, generation, entry_valid, attr_valid, entry_valid_nsec,
#: attr_valid_nsec, attr (128 bytes).
ENTRY_OUT = struct.Struct("=QQQQII" + _ATTR_FMT)
#: fuse_attr_out: attr_valid, attr_valid_nsec, dummy, attr (104 bytes).
ATTR_OUT = struct.Struct("=QII" + _ATTR_FMT)
#: fuse_getattr_in: getattr_flags, dummy, fh (16 bytes).
GETATTR_IN = struct.Struct("=IIQ")
#: fuse_setattr_in: valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec,
#: mtimensec, ctimensec, mode, unused4, uid, gid, unused5 (88 bytes).
SETATTR_IN = struct.Struct("=IIQQQQQQIIIIIIII")

# --- files ---------------------------------------------------------------------------------------
#: fuse_open_in: flags, open_flags (8 bytes).
OPEN_IN = struct.Struct("=II")
#: fuse_open_out: fh, open_flags, padding (16 bytes).
OPEN_OUT = struct.Struct("=QII")
#: fuse_release_in: fh, flags, release_flags, lock_owner (24 bytes).
RELEASE_IN = struct.Struct("=QIIQ")
#: fuse_flush_in: fh, unused, padding, lock_owner (24 bytes).
FLUSH_IN = struct.Struct("=QIIQ")
#: fuse_fsync_in: fh, fsync_flags, padding (16 bytes).
FSYNC_IN = struct.Struct("=QII")
#: fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding (40 bytes).
READ_IN = struct.Struct("=QQIIQII")
#: fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding (40 bytes); the data
#: follows it.
WRITE_IN = struct.Struct("=QQIIQII")
#: fuse_write_out: size, padding (8 bytes).
WRITE_OUT = struct.Struct("=II")
#: fuse_fallocate_in: fh, offset, length, mode, padding (32 bytes).
FALLOCATE_IN = struct.Struct("=QQQII")
#: fuse_lseek_in: fh, offset, whence, padding (24 bytes).
LSEEK_IN = struct.Struct("=QQII")
#: fuse_lseek_out: offset (8 bytes).
LSEEK_OUT = struct.Struct("=Q")
#: fuse_access_in: mask, padding (8 bytes).
ACCESS_IN = struct.Struct("=II")

# --- misc ----------------------------------------------------------------------------------------
#: fuse_statfs_out (fuse_kstatfs): blocks, bfree, bavail, files, ffree, bsize, namelen, frsize,
#: padding, spare[6] (80 bytes).
STATFS_OUT = struct.Struct("=QQQQQIIII24x")
#: fuse_interrupt_in: unique of the request to interrupt (8 bytes).
INTERRUPT_IN = struct.Struct("=Q")
#: fuse_forget_in: nlookup (8 bytes).
FORGET_IN = struct.Struct("=Q")
#: fuse_batch_forget_in: count, dummy (8 bytes); count fuse_forget_one follow.
BATCH_FORGET_IN = struct.Struct("=II")
#: fuse_forget_one: nodeid, nlookup (16 bytes).
FORGET_ONE = struct.Struct("=QQ")

# --- directories ---------------------------------------------------------------------------------
#: fuse_dirent without its name: ino, off, namelen, type (24 bytes).
DIRENT = struct.Struct("=QQII")
#: fuse_direntplus without its name: entry_out, then the dirent header (152 bytes).
DIRENTPLUS = struct.Struct("=QQQQII" + _ATTR_FMT + "QQII")


def align8(n: int) -> int:
    """FUSE_REC_ALIGN: directory records are padded to 8 bytes."""
    return (n + 7) & ~7


def dirent_size(namelen: int) -> int:
    return align8(DIRENT.size + namelen)


def direntplus_size(namelen: int) -> int:
    return align8(DIRENTPLUS.size + namelen)


def dirent_type(mode: int) -> int:
    """The DT_* value of a mode: the S_IFMT bits shifted down, as the kernel's IFTODT does."""
    return stat.S_IFMT(mode) >> 12


def _attr_fields(a: Attr) -> tuple[int, ...]:
    sec, nsec = divmod(a.mtime_ns, 1_000_000_000)
    # atime = mtime = ctime: the snapshot has a single point in time.
    return (
        a.ino, a.size, a.blocks, sec, sec, sec, nsec, nsec, nsec,
        a.mode, a.nlink, a.uid, a.gid, 0, a.blksize, 0,
    )  # fmt: skip


def split_timeout(seconds: float) -> tuple[int, int]:
    """A timeout as the (sec, nsec) pair FUSE replies carry."""
    sec = int(seconds)
    return sec, round((seconds - sec) * 1e9)


def pack_attr(a: Attr) -> bytes:
    return ATTR.pack(*_attr_fields(a))


def pack_entry_out(a: Attr, entry_valid: tuple[int, int], attr_valid: tuple[int, int]) -> bytes:
    """fuse_entry_out for ``a``; nodeid is ``a.ino`` and the generation is always 0 (inode
    numbers are never reused while mounted)."""
    return ENTRY_OUT.pack(
        a.ino, 0, entry_valid[0], attr_valid[0], entry_valid[1], attr_valid[1], *_attr_fields(a)
    )


def pack_attr_out(a: Attr, attr_valid: tuple[int, int]) -> bytes:
    return ATTR_OUT.pack(attr_valid[0], attr_valid[1], 0, *_attr_fields(a))


def pack_dirent(ino: int, off: int, name: bytes, dtype: int) -> bytes:
    """One fuse_dirent; ``off`` is the offset the kernel passes back to continue after it."""
    pad = dirent_size(len(name)) - DIRENT.size - len(name)
    return DIRENT.pack(ino, off, len(name), dtype) + name + bytes(pad)


_NO_ENTRY = (0,) * (6 + 16)


def pack_direntplus(
    entry: Attr | None,
    entry_valid: tuple[int, int],
    attr_valid: tuple[int, int],
    ino: int,
    off: int,
    name: bytes,
    dtype: int,
) -> bytes:
    """One fuse_direntplus. ``entry`` None sends nodeid 0: the kernel then only lists the name
    and does not count a lookup (it never counts one for ``.`` and ``..`` either)."""
    if entry is None:
        head = _NO_ENTRY
    else:
        head = (
            entry.ino, 0, entry_valid[0], attr_valid[0], entry_valid[1], attr_valid[1],
            *_attr_fields(entry),
        )  # fmt: skip
    pad = direntplus_size(len(name)) - DIRENTPLUS.size - len(name)
    return DIRENTPLUS.pack(*head, ino, off, len(name), dtype) + name + bytes(pad)


@dataclass(frozen=True, slots=True)
class InitIn:
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32

    @classmethod
    def unpack(cls, body: bytes | bytearray | memoryview) -> InitIn:
        """Decode both layouts: 16 bytes before 7.36, 64 bytes (with flags2) since."""
        if len(body) >= INIT_IN.size:
            major, minor, readahead, flags, flags2 = INIT_IN.unpack_from(body)
        else:
            major, minor, readahead, flags = INIT_IN_COMPAT.unpack_from(body)
            flags2 = 0
        return cls(major, minor, readahead, flags | flags2 << 32)


@dataclass(frozen=True, slots=True)
class InitOut:
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int = 1
    max_pages: int = 0

    def pack(self) -> bytes:
        """64 bytes; truncated to the 7.22 layout for kernels older than 7.23."""
        data = INIT_OUT.pack(
            self.major, self.minor, self.max_readahead, self.flags & 0xFFFF_FFFF,
            self.max_background, self.congestion_threshold, self.max_write, self.time_gran,
            self.max_pages, 0, self.flags >> 32,
        )  # fmt: skip
        return data if self.minor >= 23 else data[:INIT_OUT_COMPAT_22_SIZE]
