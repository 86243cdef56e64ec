"""The pure model of the tree: regions, sidecars, attributes, reads, seeks, punches. No mount."""

from __future__ import annotations

import errno
import json
import random
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from snapfs.fs import TreeOperations
from snapfs.fuse.ops import FuseErrno
from snapfs.regions import Regions
from snapfs.tree import (
    DISK_INO_BASE,
    JSON_INO,
    Disk,
    NoMoreData,
    NotFound,
    NotSupported,
    ReadOnly,
    Sidecar,
    Tree,
    Unreadable,
)
from tests.conftest import RecordingReply

G = 65536


class MemorySource:
    """An in-memory stand-in for the NBD export, for model tests only (integration tests use
    QEMU's real export). Records discards."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.discards: list[tuple[int, int]] = []

    async def read_into(self, buf: bytearray, offset: int, length: int) -> None:
        buf[:length] = self.data[offset : offset + length]

    async def discard(self, offset: int, length: int) -> None:
        self.discards.append((offset, length))


def make_tree(
    dirty: list[tuple[int, int]] | None = None, size: int = 16 * G, zeros: Regions | None = None
) -> tuple[Tree, MemorySource]:
    src = MemorySource(random.Random(3).randbytes(size))
    regions = Regions.from_extents(dirty) if dirty is not None else Regions.whole(size)
    disk = Disk("scsi0", size, src, regions, zeros=zeros or Regions(), granularity=G)
    facts: dict[str, Any] = {"vmid": "100"}
    return Tree([disk], lambda: facts, extra_files={"qemu-server.conf": b"cores: 2\n"}), src


RAW = DISK_INO_BASE
DIRTY = DISK_INO_BASE + 1


def test_regions_merge_and_queries() -> None:
    r = Regions.from_extents([(0, 10), (10, 5), (20, 5)])
    assert list(r) == [(0, 15), (20, 5)]
    assert r.total == 20
    assert r.contains(0, 15)
    assert not r.contains(10, 11)
    assert r.seek_data(15) == 20
    assert r.seek_data(25) is None
    assert r.seek_hole(3) == 15
    assert r.seek_hole(17) == 17
    assert r.covered_in(5, 20) == 15
    with pytest.raises(ValueError, match="ascending"):
        Regions.from_extents([(10, 5), (0, 5)])


def test_regions_remove() -> None:
    r = Regions.from_extents([(0, 100), (200, 100)])
    assert r.remove(50, 200) == 100
    assert list(r) == [(0, 50), (250, 50)]
    assert r.total == 100
    assert r.remove(60, 10) == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(1, 40)), max_size=12),
    st.integers(0, 300),
    st.integers(0, 80),
)
def test_regions_remove_matches_a_set_of_bytes(
    spans: list[tuple[int, int]], off: int, length: int
) -> None:
    covered: set[int] = set()
    for s, n in spans:
        covered.update(range(s, s + n))
    extents: list[tuple[int, int]] = []
    for b in sorted(covered):
        if extents and extents[-1][0] + extents[-1][1] == b:
            extents[-1] = (extents[-1][0], extents[-1][1] + 1)
        else:
            extents.append((b, 1))
    r = Regions.from_extents(extents)
    removed = r.remove(off, length)
    after = covered - set(range(off, off + length))
    assert removed == len(covered) - len(after)
    assert r.total == len(after)
    for b in range(0, 320):
        assert r.contains(b, 1) == (b in after)


def test_sidecar_renders_lines_at_any_offset() -> None:
    regions = Regions.from_extents([(i * 3 * G, G) for i in range(1000)])
    text = "".join(f"{o} {n}\n" for o, n in regions).encode()
    sc = Sidecar(regions)
    assert sc.size == len(text)
    rng = random.Random(1)
    for _ in range(200):
        off, size = rng.randrange(0, len(text) + 10), rng.randrange(0, 5000)
        assert sc.read(off, size) == text[off : off + size]


def test_layout_and_attributes() -> None:
    tree, _ = make_tree([(0, G), (4 * G, 2 * G)])
    names = {e.name for e in tree.listdir()}
    assert names == {"snapfs.json", "scsi0.raw", "scsi0.dirty", "qemu-server.conf"}
    raw = tree.lookup(1, "scsi0.raw")
    assert raw.size == 16 * G
    assert raw.blocks * 512 == 16 * G  # no known zeros: every byte counts
    assert raw.blksize == 1 << 20
    assert tree.read_text(DIRTY, 0, 1000) == f"0 {G}\n{4 * G} {2 * G}\n".encode()
    assert json.loads(tree.read_text(JSON_INO, 0, 10000)) == {"vmid": "100"}
    with pytest.raises(NotFound):
        tree.lookup(1, "nope")


def test_open_rules() -> None:
    tree, _ = make_tree()
    tree.open(RAW, writable=True, truncate=False)  # fallocate needs a writable fd
    with pytest.raises(ReadOnly):
        tree.open(DIRTY, writable=True, truncate=False)
    with pytest.raises(ReadOnly):
        tree.open(RAW, writable=True, truncate=True)


def test_reads_respect_the_readable_set() -> None:
    tree, src = make_tree([(G, 2 * G)])

    async def main() -> None:
        buf = bytearray(1 << 20)
        n = await tree.read_disk(RAW, buf, G + 10, G)
        assert bytes(buf[:n]) == src.data[G + 10 : 2 * G + 10]
        with pytest.raises(Unreadable):
            await tree.read_disk(RAW, buf, 2 * G, 2 * G)  # crosses the end of the region
        with pytest.raises(Unreadable):
            await tree.read_disk(RAW, buf, 0, 1)
        assert await tree.read_disk(RAW, buf, 16 * G, 4096) == 0  # past EOF

    trio.run(main)


def test_an_incremental_view_shows_no_holes() -> None:
    """Bytes outside the backup are not zeros: SEEK_DATA/SEEK_HOLE and st_blocks show the
    whole disk as data, so a tool that does not read the sidecar reads them and fails."""
    tree, _ = make_tree([(G, 2 * G), (8 * G, G)])
    assert tree.lseek(RAW, 0, 3) == 0
    assert tree.lseek(RAW, 4 * G, 3) == 4 * G
    assert tree.lseek(RAW, 0, 4) == 16 * G
    assert tree.getattr(RAW).blocks * 512 == 16 * G
    with pytest.raises(NoMoreData):
        tree.lseek(RAW, 16 * G, 3)
    with pytest.raises(NoMoreData):
        tree.lseek(RAW, 16 * G, 4)


def test_full_view_seeks_follow_the_zeros() -> None:
    tree, _ = make_tree(None, zeros=Regions.from_extents([(0, 2 * G), (3 * G, 13 * G)]))
    assert tree.lseek(RAW, 0, 3) == 2 * G
    assert tree.getattr(RAW).blocks * 512 == G
    assert tree.lseek(RAW, 2 * G, 4) == 3 * G
    assert tree.lseek(RAW, 0, 4) == 0
    with pytest.raises(NoMoreData):
        tree.lseek(RAW, 3 * G, 3)


def test_punch_aligns_inward_and_discards_only_readable() -> None:
    tree, src = make_tree([(0, 4 * G), (6 * G, 2 * G)])

    async def main() -> None:
        # A punch smaller than a block discards nothing.
        assert await tree.punch(RAW, 10, G, 3) == 0
        assert src.discards == []
        # Unaligned: only whole blocks inside [G/2, 7G + G/2) are discarded.
        assert await tree.punch(RAW, G // 2, 7 * G, 3) == 3 * G + G
        assert src.discards == [(G, 3 * G), (6 * G, G)]
        buf = bytearray(G)
        with pytest.raises(Unreadable):
            await tree.read_disk(RAW, buf, G, 1)
        assert await tree.read_disk(RAW, buf, 0, G) == G
        # Punched bytes are not zeros in the snapshot: no hole, and still counted.
        assert tree.lseek(RAW, G, 4) == 16 * G
        assert tree.lseek(RAW, G, 3) == G
        assert tree.getattr(RAW).blocks * 512 == 16 * G
        # The sidecar keeps listing what this backup covers.
        assert tree.read_text(DIRTY, 0, 100) == f"0 {4 * G}\n{6 * G} {2 * G}\n".encode()
        with pytest.raises(NotSupported):
            await tree.punch(RAW, 0, G, 0)
        with pytest.raises(NotSupported):
            await tree.punch(DIRTY, 0, G, 3)

    trio.run(main)


def test_adapter_maps_domain_errors_to_errno() -> None:
    tree, src = make_tree([(G, G)])
    ops = TreeOperations(tree)

    async def main() -> None:
        with pytest.raises(FuseErrno) as e:
            ops.read(RAW, 0, 0, 4096, RecordingReply())
        assert e.value.errno == errno.ENODATA
        reply = RecordingReply()
        ops.read(RAW, 0, G, 4096, reply)
        await reply.settle()  # no direct reads: a plain read in a task
        assert reply.payload == src.data[G : G + 4096]
        with pytest.raises(FuseErrno) as e:
            await ops.fallocate(RAW, 0, 0, G, 1)
        assert e.value.errno == errno.EOPNOTSUPP

    trio.run(main)
    with pytest.raises(FuseErrno) as e:
        ops.lookup(1, b"missing")
    assert e.value.errno == errno.ENOENT
    with pytest.raises(FuseErrno) as e:
        ops.write(RAW, 0, 0, b"x")
    assert e.value.errno == errno.EROFS
    with pytest.raises(FuseErrno) as e:
        ops.open(DIRTY, 2)
    assert e.value.errno == errno.EROFS
