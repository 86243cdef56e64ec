"""Hole punching in a disk file: an NBD discard that frees fleecing space. Real QEMU, real
fallocate, real provider code."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from dev.devvm import DiskSpec, TestVM
from snapfs import libc
from snapfs.libc import punch_hole
from snapfs.provider import CHUNK, DiskCopy, FileTarget
from tests.conftest import Snapfs

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

G = 65536
MiB = 1 << 20


def fleecing_bytes(vm: TestVM, disk: str) -> int:
    """Bytes the disk's fleecing image really occupies on the host."""
    (path,) = (vm.workdir / "fleecing").glob(f"snapfs-*-{disk}.qcow2")
    return os.stat(path).st_blocks * 512


def punch_hole_raw(fd: int, offset: int, length: int) -> None:
    """fallocate(2) as is: the provider's helper skips empty ranges itself."""
    libc.fallocate(fd, libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE, offset, length)


def fallocate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fallocate", *args], capture_output=True, text=True)


def test_punch_discards_and_makes_the_range_unreadable(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    before = vm.snapshot()
    with snapfs.mounted(vm, tmp_path / "mnt") as mnt:
        raw = mnt / "virtio0.raw"
        # Guest writes over 4 MiB: the old data moves into the fleecing image.
        for off in range(0, 4 * MiB, G):
            vm.guest_write("virtio0", off, G, 0x77)
        full = fleecing_bytes(vm, "virtio0")
        assert full >= 4 * MiB
        blocks = raw.stat().st_blocks
        proc = fallocate("--punch-hole", "--offset", "0", "--length", str(4 * MiB), str(raw))
        assert proc.returncode == 0, proc.stderr
        assert fleecing_bytes(vm, "virtio0") <= full - 4 * MiB + 512 * 1024
        # Discarded bytes were data in the snapshot: they do not turn into a hole.
        assert raw.stat().st_blocks == blocks
        fd = os.open(raw, os.O_RDONLY)
        try:
            with pytest.raises(OSError, match="No data available") as e:
                os.pread(fd, 4096, MiB)
            assert e.value.errno == errno.ENODATA
            assert os.lseek(fd, 0, os.SEEK_HOLE) == vm.disks["virtio0"].size
            assert os.lseek(fd, 0, os.SEEK_DATA) == 0
            assert os.pread(fd, G, 4 * MiB) == before["virtio0"][4 * MiB : 4 * MiB + G]
        finally:
            os.close(fd)
        # A guest write into the discarded range is no longer copied into the fleecing image.
        after_punch = fleecing_bytes(vm, "virtio0")
        for off in range(0, 2 * MiB, G):
            vm.guest_write("virtio0", off, G, 0x78)
        assert fleecing_bytes(vm, "virtio0") <= after_punch + 256 * 1024
        # The sidecar still lists what the backup covers; snapfs.json counts the discard.
        assert (mnt / "virtio0.dirty").read_text() == f"0 {vm.disks['virtio0'].size}\n"
        facts = json.loads((mnt / "snapfs.json").read_text())
        assert facts["disks"]["virtio0"]["discarded_bytes"] == 4 * MiB
        du = subprocess.run(["du", "-B1", str(raw)], capture_output=True, text=True, check=True)
        assert int(du.stdout.split()[0]) == vm.disks["virtio0"].size
    # Punching never touches the guest's disk.
    vm.stop()
    assert vm.image_content("virtio0") == vm.expected["virtio0"]
    assert vm.io_errors() == []


def test_unaligned_punch_discards_only_whole_blocks_inside(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    before = vm.snapshot()
    with snapfs.mounted(vm, tmp_path / "mnt") as mnt:
        raw = mnt / "scsi0.raw"
        assert fallocate("-p", "-o", str(G // 2), "-l", str(G), str(raw)).returncode == 0
        facts = json.loads((mnt / "snapfs.json").read_text())
        assert facts["disks"]["scsi0"]["discarded_bytes"] == 0
        assert raw.read_bytes()[: 2 * G] == before["scsi0"][: 2 * G]
        assert fallocate("-p", "-o", str(G // 2), "-l", str(2 * G), str(raw)).returncode == 0
        fd = os.open(raw, os.O_RDONLY)
        try:
            assert os.pread(fd, G, 0) == before["scsi0"][:G]
            assert os.pread(fd, G, 2 * G) == before["scsi0"][2 * G : 3 * G]
            with pytest.raises(OSError, match="No data available"):
                os.pread(fd, 1, G)
        finally:
            os.close(fd)


def test_bad_punches_are_refused_without_side_effects(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    with snapfs.mounted(vm, tmp_path / "mnt") as mnt:
        raw = str(mnt / "virtio0.raw")
        size = vm.disks["virtio0"].size
        cases = [
            (["-p", "-o", "0", "-l", str(G), str(mnt / "virtio0.dirty")], "Read-only file system"),
            (["-p", "-o", str(size), "-l", str(G), raw], "Invalid argument"),
            (["-z", "-o", "0", "-l", str(G), raw], "Operation not supported"),
            (["-o", "0", "-l", str(G), raw], "Operation not supported"),
            (["-c", "-o", "0", "-l", str(G), raw], "Operation not supported"),
        ]
        for args, message in cases:
            proc = fallocate(*args)
            assert proc.returncode != 0, args
            assert message in proc.stderr, (args, proc.stderr)
        # A zero-length punch (the fallocate tool refuses to send one).
        fd = os.open(raw, os.O_RDWR)
        try:
            with pytest.raises(OSError, match="Invalid argument"):
                punch_hole_raw(fd, 0, 0)
        finally:
            os.close(fd)
        facts = json.loads((mnt / "snapfs.json").read_text())
        assert all(d["discarded_bytes"] == 0 for d in facts["disks"].values())
        assert os.stat(raw).st_blocks * 512 == size


def racing_copy(vm: TestVM, mnt: Path, out: Path, *, discard: bool) -> tuple[int, int, int]:
    """Copy virtio0 with the provider's code while guest writes land: four 64 KiB writes
    anywhere on the disk after every 1 MiB copied. Returns fleecing (peak, final, written)."""
    size = vm.disks["virtio0"].size
    rng = random.Random(5)
    peak = written = 0

    def after_chunk(n: int) -> None:
        nonlocal peak, written
        for _ in range(4):
            vm.guest_write("virtio0", rng.randrange(0, size // G) * G, G, 0x42)
            written += G
        peak = max(peak, fleecing_bytes(vm, "virtio0"))

    src = os.open(mnt / "virtio0.raw", os.O_RDWR)
    dst = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        DiskCopy(
            src, FileTarget(dst, in_place=False), discard=discard, progress=after_chunk
        ).region(0, size)
    finally:
        os.close(src)
        os.close(dst)
    return peak, fleecing_bytes(vm, "virtio0"), written


def test_provider_with_discard_keeps_fleecing_small(tmp_path: Path, snapfs: Snapfs) -> None:
    """Guest writes race a copy: with discard, fleecing space stays near one chunk plus the
    writes that raced it; without, it grows with every write. Figures go to stdout."""
    figures = {}
    for discard in (False, True):
        work = tmp_path / ("discard" if discard else "plain")
        work.mkdir()
        vm = TestVM(work, [DiskSpec("virtio0", "qcow2", "virtio", size=64 * MiB)])
        with vm, snapfs.mounted(vm, work / "mnt") as mnt:
            figures[discard] = racing_copy(vm, mnt, work / "copy.raw", discard=discard)
    print(
        f"\nfleecing peak/final bytes with {figures[True][2]} bytes of racing guest writes: "
        f"discard {figures[True][0]}/{figures[True][1]}, "
        f"no discard {figures[False][0]}/{figures[False][1]}"
    )
    plain_peak, _, written = figures[False]
    discard_peak, discard_final, _ = figures[True]
    assert plain_peak >= written // 2  # most writes hit distinct blocks and were copied
    # With discard: at most the writes ahead of the copy (about half of them on average, all
    # in the worst case) that were not yet freed, plus one chunk and qcow2 metadata.
    assert discard_peak < plain_peak
    assert discard_final <= CHUNK + 1 * MiB


def test_a_view_with_discarded_bytes_is_not_copied_again(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    """After a copy with --discard the view's bytes can no longer be read, and SEEK_DATA shows
    them as holes: a second copy of that view fails instead of taking them for zeros."""
    first, second = tmp_path / "first", tmp_path / "second"
    with snapfs.mounted(vm, tmp_path / "mnt") as mnt:
        snapfs("copy", str(mnt), str(first), "--discard")
        assert (first / "virtio0.raw").read_bytes() == vm.expected["virtio0"]
        proc = snapfs("copy", str(mnt), str(second), check=False)
    assert proc.returncode == 9
    assert any(f"{name}: " in proc.stderr for name in vm.disks)
    assert "discarded" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not any((second / f"{name}.raw").exists() for name in vm.disks)


def test_punch_hole_helper_rejects_bad_ranges(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    fd = os.open(path, os.O_RDWR)
    try:
        punch_hole(fd, 0, 4096)
        assert path.read_bytes()[:4096] == bytes(4096)
        with pytest.raises(OSError, match="Invalid argument"):
            punch_hole(fd, -1, 4096)
    finally:
        os.close(fd)
