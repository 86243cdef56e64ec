"""The FUSE codecs against the layouts of ``linux/fuse.h``; no mount, no I/O."""

from __future__ import annotations

import stat
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapfs.fuse import protocol as p
from snapfs.fuse.ops import Attr


@pytest.mark.parametrize(
    ("codec", "size"),
    [
        (p.IN_HEADER, 40),
        (p.OUT_HEADER, 16),
        (p.INIT_IN_COMPAT, 16),
        (p.INIT_IN, 64),
        (p.INIT_OUT, 64),
        (p.ATTR, 88),
        (p.ENTRY_OUT, 128),
        (p.ATTR_OUT, 104),
        (p.GETATTR_IN, 16),
        (p.SETATTR_IN, 88),
        (p.OPEN_IN, 8),
        (p.OPEN_OUT, 16),
        (p.RELEASE_IN, 24),
        (p.FLUSH_IN, 24),
        (p.FSYNC_IN, 16),
        (p.READ_IN, 40),
        (p.WRITE_IN, 40),
        (p.WRITE_OUT, 8),
        (p.FALLOCATE_IN, 32),
        (p.LSEEK_IN, 24),
        (p.LSEEK_OUT, 8),
        (p.ACCESS_IN, 8),
        (p.STATFS_OUT, 80),
        (p.INTERRUPT_IN, 8),
        (p.FORGET_IN, 8),
        (p.BATCH_FORGET_IN, 8),
        (p.FORGET_ONE, 16),
        (p.DIRENT, 24),
        (p.DIRENTPLUS, 152),
    ],
)
def test_struct_sizes_match_fuse_h(codec: struct.Struct, size: int) -> None:
    assert codec.size == size


def test_opcodes() -> None:
    assert (p.Opcode.INIT, p.Opcode.READ, p.Opcode.FALLOCATE, p.Opcode.LSEEK) == (26, 15, 43, 46)
    assert (p.Opcode.READDIRPLUS, p.Opcode.BATCH_FORGET, p.Opcode.INTERRUPT) == (44, 42, 36)


ATTR = Attr(
    ino=7,
    mode=stat.S_IFREG | 0o444,
    size=10**12 + 3,
    blocks=12345,
    nlink=1,
    uid=11,
    gid=22,
    mtime_ns=1_700_000_000_123_456_789,
    blksize=1 << 20,
)


def test_attr_layout() -> None:
    fields = p.ATTR.unpack(p.pack_attr(ATTR))
    ino, size, blocks, atime, mtime, ctime, atn, mtn, ctn = fields[:9]
    mode, nlink, uid, gid, rdev, blksize, flags = fields[9:]
    assert (ino, size, blocks) == (7, 10**12 + 3, 12345)
    assert atime == mtime == ctime == 1_700_000_000
    assert atn == mtn == ctn == 123_456_789
    assert (mode, nlink, uid, gid, rdev, blksize, flags) == (
        stat.S_IFREG | 0o444, 1, 11, 22, 0, 1 << 20, 0,
    )  # fmt: skip


def test_entry_out() -> None:
    data = p.pack_entry_out(ATTR, p.split_timeout(1.0), p.split_timeout(0.5))
    assert len(data) == 128
    nodeid, gen, ev, av, evn, avn = struct.unpack_from("=QQQQII", data)
    assert (nodeid, gen, ev, av, evn, avn) == (7, 0, 1, 0, 0, 500_000_000)
    assert data[40:] == p.pack_attr(ATTR)


def test_attr_out() -> None:
    data = p.pack_attr_out(ATTR, (1, 0))
    assert len(data) == 104
    assert struct.unpack_from("=QII", data) == (1, 0, 0)
    assert data[16:] == p.pack_attr(ATTR)


def test_init_in_both_sizes() -> None:
    old = p.InitIn.unpack(p.INIT_IN_COMPAT.pack(7, 31, 131072, 0x1234))
    assert old == p.InitIn(7, 31, 131072, 0x1234)
    new = p.InitIn.unpack(p.INIT_IN.pack(7, 45, 131072, p.FUSE_INIT_EXT | 1, 0b101))
    assert new.minor == 45
    assert new.flags == p.FUSE_INIT_EXT | 1 | 0b101 << 32


def test_init_out() -> None:
    out = p.InitOut(7, 38, 65536, p.FUSE_MAX_PAGES | 1 << 33, 64, 48, 1 << 20, 1, 256)
    data = out.pack()
    assert len(data) == 64
    fields = p.INIT_OUT.unpack(data)
    assert fields == (7, 38, 65536, p.FUSE_MAX_PAGES, 64, 48, 1 << 20, 1, 256, 0, 2)
    old = p.InitOut(7, 22, 65536, 1, 64, 48, 1 << 20)
    assert len(old.pack()) == p.INIT_OUT_COMPAT_22_SIZE


def test_out_header_negative_errno() -> None:
    assert p.OUT_HEADER.unpack(p.OUT_HEADER.pack(16, -61, 99)) == (16, -61, 99)


def test_statfs_out() -> None:
    data = p.STATFS_OUT.pack(1, 2, 3, 4, 5, 4096, 255, 512, 0)
    assert len(data) == 80
    assert struct.unpack_from("=QQQQQIII", data) == (1, 2, 3, 4, 5, 4096, 255, 512)


def test_dirent_type() -> None:
    assert p.dirent_type(stat.S_IFREG | 0o644) == 8  # DT_REG
    assert p.dirent_type(stat.S_IFDIR) == 4  # DT_DIR


@given(name=st.binary(min_size=1, max_size=255), ino=st.integers(1, 2**64 - 1))
def test_dirent_round_trip(name: bytes, ino: int) -> None:
    data = p.pack_dirent(ino, 3, name, 8)
    assert len(data) == p.dirent_size(len(name))
    assert len(data) % 8 == 0
    d_ino, off, namelen, dtype = p.DIRENT.unpack_from(data)
    assert (d_ino, off, namelen, dtype) == (ino, 3, len(name), 8)
    assert data[24 : 24 + namelen] == name
    assert not any(data[24 + namelen :])


@given(name=st.binary(min_size=1, max_size=255))
def test_direntplus_round_trip(name: bytes) -> None:
    data = p.pack_direntplus(ATTR, (1, 0), (0, 0), 7, 5, name, 8)
    assert len(data) == p.direntplus_size(len(name))
    assert len(data) % 8 == 0
    assert data[:128] == p.pack_entry_out(ATTR, (1, 0), (0, 0))
    assert p.DIRENT.unpack_from(data, 128) == (7, 5, len(name), 8)
    assert data[152 : 152 + len(name)] == name


def test_direntplus_without_entry_has_nodeid_zero() -> None:
    data = p.pack_direntplus(None, (1, 0), (1, 0), 1, 1, b".", 4)
    assert data[:128] == bytes(128)
    assert p.DIRENT.unpack_from(data, 128) == (1, 1, 1, 4)
