"""The view is the snapshot, byte for byte, whatever the guest does after the snapshot point.

Real QEMU, real mounts, real tools. The guest writes data, zeros (with and without unmap) and
discards, of every size and alignment, before and while the view is read; each drive has
detect-zeroes off, on or unmap. Images live in memory (tmpfs), where QEMU sees holes exactly:
QEMU before 8.0 then reports a cluster that copy-before-write saved from the live disk when a
read or a block status runs on into an unsaved one, which snapfs must never pass on.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from dev.devvm import DiskSpec, GuestIO, MiB, TestVM
from tests.conftest import Snapfs, disk_content

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

KiB = 1024
SIZE = 8 * MiB


def read_everything(path: Path, size: int, step: int, start: int = 0) -> bytes:
    """The whole file in reads of ``step`` bytes, the first one at ``start`` (the bytes before
    it are read last), as a copy tool with that buffer size would."""
    out = bytearray(size)
    fd = os.open(path, os.O_RDONLY)
    try:
        for off in [*range(start, size, step), *range(0, start, step)]:
            length = min(step, size - off, start - off if off < start else size)
            out[off : off + length] = os.pread(fd, length, off)
    finally:
        os.close(fd)
    return bytes(out)


def holes(path: Path) -> list[tuple[int, int]]:
    """The holes SEEK_HOLE/SEEK_DATA report, as (start, end)."""
    size = path.stat().st_size
    found = []
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            hole = os.lseek(fd, pos, os.SEEK_HOLE)
            if hole >= size:
                break
            try:
                data = os.lseek(fd, hole, os.SEEK_DATA)
            except OSError:
                data = size
            found.append((hole, data))
            pos = data
    finally:
        os.close(fd)
    return found


def trigger_copies(vm: TestVM, disk: str, at: int = 0, stride: int = MiB) -> None:
    """Guest writes after the snapshot point that make copy-before-write save some clusters
    and not their neighbours, in every ``stride`` bytes (shifted by ``at``; a 2 MiB stride
    leaves every other 1 MiB cluster unsaved): zero writes (unaligned, and whole clusters
    with unmap), discards, sub-4 KiB and data writes."""
    size = vm.disks[disk].size
    for w in range(at, size, stride):
        for offset, length, op in (
            (1000, 100_000, "zero"),
            (512 * KiB, 64 * KiB, "unmap"),
            (320 * KiB, 128 * KiB, "discard"),
            (700 * KiB + 5, 300, "data"),
            (900 * KiB - 10, 20, "zero"),
        ):
            if w + offset + length > size:
                continue
            if op == "discard":
                vm.guest_discard(disk, w + offset, length)
            elif op == "data":
                vm.guest_write(disk, w + offset, length, 0x3C)
            else:
                vm.guest_zero(disk, w + offset, length, unmap=op == "unmap")


def check_view(raw: Path, want: bytes) -> None:
    """Reads of several sizes and alignments, and every reported hole, match ``want``."""
    size = len(want)
    for step, start in ((MiB, 0), (MiB, 4096 + 512), (192 * KiB, 100), (64 * KiB, 60 * KiB)):
        got = read_everything(raw, size, step, start)
        if got != want:
            bad = [
                off
                for off in range(0, size, 4096)
                if got[off : off + 4096] != want[off : off + 4096]
            ]
            raise AssertionError(
                f"{raw.name}, reads of {step} from {start}: {len(bad)} wrong "
                f"4 KiB blocks, first at {bad[:4]}"
            )
    found = holes(raw)
    for start, end in found:
        assert want[start:end] == bytes(end - start), f"{raw.name}: hole {start}-{end} has data"
    assert raw.stat().st_blocks * 512 == size - sum(e - s for s, e in found)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("detect_zeroes", ["off", "on", "unmap"])
def test_a_full_view_is_the_snapshot(
    fmt: str, detect_zeroes: str, shm_dir: Path, snapfs: Snapfs, tmp_path: Path
) -> None:
    """Zero writes, discards and data writes after the snapshot point never show through:
    not in reads of any size or alignment, not as holes, not in a copy by cp, dd, tar or
    snapfs copy; while the guest goes on writing. (GNU tar --sparse stores a file whose
    st_blocks is 0 as all hole, unread: st_blocks must count the data.)"""
    spec = DiskSpec("scsi0", fmt, "scsi", size=SIZE, detect_zeroes=detect_zeroes)  # type: ignore[arg-type]
    vm = TestVM(shm_dir, [spec], contents={"scsi0": disk_content(5)})
    with vm:
        with snapfs.mounted(vm, tmp_path / "mnt") as mnt:
            want = vm.snapshot()["scsi0"]
            raw = mnt / "scsi0.raw"
            trigger_copies(vm, "scsi0")
            guest = GuestIO(vm, seed=7)
            guest.run(40)
            check_view(raw, want)
            # The snapshot's own zeros are holes (some of them: the guest's writes may have
            # made QEMU unsure of the rest).
            assert holes(raw)
            with guest.storm():
                check_view(raw, want)
                subprocess.run(
                    ["cp", "--sparse=always", str(raw), str(tmp_path / "cp.raw")], check=True
                )
                subprocess.run(
                    ["dd", f"if={raw}", f"of={tmp_path / 'dd.raw'}", "bs=1M", "status=none"],
                    check=True,
                )
                subprocess.run(
                    ["tar", "--sparse", "-cf", str(tmp_path / "t.tar"), "-C", str(mnt), raw.name],
                    check=True,
                )
                snapfs("copy", str(mnt), str(tmp_path / "copy"))
            assert guest.done > 1
            (tmp_path / "tar").mkdir()
            subprocess.run(
                ["tar", "-xf", str(tmp_path / "t.tar"), "-C", str(tmp_path / "tar")], check=True
            )
            for copy in (
                tmp_path / "cp.raw",
                tmp_path / "dd.raw",
                tmp_path / "tar" / raw.name,
                tmp_path / "copy/scsi0.raw",
            ):
                assert copy.read_bytes() == want, copy
        assert not vm.io_errors()
    # The model of the guest's disk is what QEMU wrote (so the snapshots above were right).
    assert vm.image_content("scsi0") == vm.expected["scsi0"]


def test_every_change_is_in_the_next_incremental(
    shm_dir: Path, snapfs: Snapfs, tmp_path: Path
) -> None:
    """Zero writes and discards between two backups are in the incremental's readable
    regions, read as the zeros they are, and a copy in place reproduces the snapshot."""
    disks = [
        DiskSpec("virtio0", "qcow2", "virtio", size=SIZE, detect_zeroes="unmap"),
        DiskSpec("scsi0", "raw", "scsi", size=SIZE, detect_zeroes="on"),
    ]
    vm = TestVM(shm_dir, disks, contents={d.name: disk_content(i) for i, d in enumerate(disks)})
    dest = tmp_path / "backup"
    with vm:
        with snapfs.mounted(vm, tmp_path / "m0", "--incremental", "x", commit=True) as mnt:
            snapfs("copy", str(mnt), str(dest))
        before = vm.snapshot()
        for disk in vm.disks:
            for w in range(0, SIZE, MiB):
                vm.guest_write(disk, w, 960 * KiB, 0x77)
            trigger_copies(vm, disk)
        GuestIO(vm, seed=3).run(60)
        with snapfs.mounted(vm, tmp_path / "m1", "--incremental", "x", commit=True) as mnt:
            want = vm.snapshot()
            for disk in vm.disks:
                trigger_copies(vm, disk, at=128 * KiB)
            preads = 0
            with GuestIO(vm, seed=4).storm():
                for name in vm.disks:
                    regions = [
                        tuple(map(int, line.split()))
                        for line in (mnt / f"{name}.dirty").read_text().splitlines()
                    ]
                    changed = [off for off in range(SIZE) if want[name][off] != before[name][off]]
                    covered = bytearray(SIZE)
                    for off, length in regions:
                        covered[off : off + length] = b"\1" * length
                    assert all(covered[off] for off in changed), name
                    fd = os.open(mnt / f"{name}.raw", os.O_RDONLY)
                    try:
                        for off, length in regions:
                            assert os.pread(fd, length, off) == want[name][off : off + length]
                            preads += 1
                    finally:
                        os.close(fd)
                    assert not holes(mnt / f"{name}.raw")
                snapfs("copy", str(mnt), str(dest), "--discard")
        for name in vm.disks:
            assert (dest / f"{name}.raw").read_bytes() == want[name], name
        assert not vm.io_errors()
    # The reads of both disks were taken off /dev/fuse by the first disk's data path.
    answered = re.findall(
        r"the data path read \d+ FUSE requests and answered (\d+) READs",
        snapfs.log_file.read_text(),
    )
    assert len(answered) == 2
    assert int(answered[-1]) >= preads > 0


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_guest_discards_reach_the_disk_while_mounted(
    fmt: str, tmp_path: Path, snapfs: Snapfs
) -> None:
    """A discard while the view is mounted frees the disk's space as without snapfs, after
    the old data was saved: the view still reads it."""
    vm = TestVM(tmp_path, [DiskSpec("virtio0", fmt, "virtio", size=SIZE)])  # type: ignore[arg-type]
    with vm:
        image = vm.disks["virtio0"].path
        with snapfs.mounted(vm, tmp_path / "mnt") as mnt:
            want = vm.snapshot()["virtio0"]
            used = os.stat(image).st_blocks
            vm.guest_discard("virtio0", 2 * MiB, 2 * MiB)
            assert os.stat(image).st_blocks <= used - 2 * MiB // 512 + 16
            assert (mnt / "virtio0.raw").read_bytes() == want
        assert vm.image_content("virtio0")[2 * MiB : 4 * MiB] == bytes(2 * MiB)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_hole_of_the_snapshot_is_answered_without_qemu(
    fmt: str, shm_dir: Path, snapfs: Snapfs, tmp_path: Path
) -> None:
    """A READ that lies wholly in a hole of the snapshot (a known zero, shown by SEEK_HOLE) is
    answered by snapfs itself, with zeros: QEMU, stopped meanwhile, is not asked. The guest
    wrote data and zeros into the hole and discarded part of it after the snapshot point; a
    READ that runs on into data is still asked of QEMU and is exact, and so is every read
    while the guest goes on writing, zeroing and discarding."""
    content = bytearray(disk_content(3))
    content[2 * MiB : 6 * MiB] = bytes(4 * MiB)
    spec = DiskSpec("scsi0", fmt, "scsi", size=SIZE)  # type: ignore[arg-type]
    vm = TestVM(shm_dir, [spec], contents={"scsi0": bytes(content)})
    with vm, snapfs.mounted(vm, tmp_path / "mnt") as mnt:
        want = vm.snapshot()["scsi0"]
        raw = mnt / "scsi0.raw"
        assert (2 * MiB, 6 * MiB) in holes(raw)
        vm.guest_write("scsi0", 3 * MiB, 64 * KiB, 0x5A)
        vm.guest_zero("scsi0", 4 * MiB - 4096, 8192, unmap=True)
        vm.guest_write("scsi0", 6 * MiB - 4096, 8192, 0xA5)
        vm.guest_discard("scsi0", 5 * MiB, 128 * KiB)
        fd = os.open(raw, os.O_RDONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, MiB)  # O_DIRECT wants an aligned buffer
        got: list[bytes] = []
        reader = threading.Thread(
            target=lambda: got.append(_pread_into(fd, buf, 3 * MiB)), daemon=True
        )
        try:
            os.kill(vm.pid, signal.SIGSTOP)
            try:
                reader.start()
                reader.join(timeout=20)
                answered = not reader.is_alive()
            finally:
                os.kill(vm.pid, signal.SIGCONT)
            reader.join(timeout=60)
            assert answered, "a READ of a hole waited for QEMU"
            assert got == [bytes(MiB)]
            # Across the hole's end: from QEMU, the snapshot's bytes, not the guest's.
            assert (
                _pread_into(fd, buf, 5 * MiB + 512 * KiB)
                == want[5 * MiB + 512 * KiB : 6 * MiB + 512 * KiB]
            )
        finally:
            os.close(fd)
            buf.close()
        guest = GuestIO(vm, seed=11)
        with guest.storm():  # data, zeros and discards racing every read
            check_view(raw, want)
        assert guest.done > 0
        assert not vm.io_errors()


def _pread_into(fd: int, buf: mmap.mmap, offset: int) -> bytes:
    n = os.preadv(fd, [buf], offset)
    return bytes(buf[:n])


def test_qemu_without_the_fix_needs_confined_reads(
    shm_dir: Path, snapfs: Snapfs, tmp_path: Path
) -> None:
    """What snapfs.json says about the QEMU, and that reads are confined exactly where QEMU
    needs it (before 8.0)."""
    vm = TestVM(
        shm_dir,
        [DiskSpec("scsi0", "raw", "scsi", size=SIZE, detect_zeroes="on")],
        contents={"scsi0": disk_content(9)},
    )
    with vm, snapfs.mounted(vm, tmp_path / "mnt") as mnt:
        facts = json.loads((mnt / "snapfs.json").read_text())
        major, minor = (int(x) for x in facts["qemu_version"].split(".")[:2])
        assert facts["disks"]["scsi0"]["confined_reads"] == (
            65536 if (major, minor) < (8, 0) else 0
        )


def test_reads_across_clusters_are_checked_against_what_was_saved(
    shm_dir: Path, snapfs: Snapfs, tmp_path: Path
) -> None:
    """Before QEMU 8.0 a READ across copy-before-write clusters is one NBD request whose bytes
    go out only if none of its clusters was saved by the time they arrived (the copied
    bitmap); the others are read again, a request per cluster. Every read stays exact, also
    while the guest writes; a MiB where the guest wrote nothing is read whole. snapfs copy,
    which reads QEMU's export itself, does the same."""
    vm = TestVM(
        shm_dir,
        [DiskSpec("scsi0", "raw", "scsi", size=SIZE, detect_zeroes="unmap")],
        contents={"scsi0": disk_content(13)},
    )
    with vm:
        major, minor = (int(x) for x in vm.qemu_version().split(".")[:2])
        if (major, minor) >= (8, 0):
            pytest.skip("QEMU 8.0 and later answer reads across clusters as asked")
        with snapfs.mounted(vm, tmp_path / "mnt") as mnt:
            want = vm.snapshot()["scsi0"]
            raw = mnt / "scsi0.raw"
            trigger_copies(vm, "scsi0", stride=2 * MiB)  # every other MiB untouched
            check_view(raw, want)
            snapfs("copy", str(mnt), str(tmp_path / "c1"))
            assert (tmp_path / "c1/scsi0.raw").read_bytes() == want
            with GuestIO(vm, seed=8).storm():
                snapfs("copy", str(mnt), str(tmp_path / "c2"))
                assert (tmp_path / "c2/scsi0.raw").read_bytes() == want
                fd = os.open(raw, os.O_RDONLY | os.O_DIRECT)
                try:
                    for off in range(0, SIZE, MiB):
                        buf = mmap.mmap(-1, MiB)
                        assert os.preadv(fd, [buf], off) == MiB
                        assert buf[:] == want[off : off + MiB], off
                finally:
                    os.close(fd)
        assert not vm.io_errors()
    checked = [
        (int(a), int(b))
        for a, b in re.findall(
            r"(\d+) reads across copy-before-write clusters were checked against the copied "
            r"bitmap, (\d+) of them read again",
            snapfs.log_file.read_text(),
        )
    ]
    assert len(checked) == 1
    verified, reread = checked[0]
    assert verified > reread > 0
    # snapfs copy reads QEMU's export itself, the same way: the first copy, before the storm.
    copied = re.findall(
        r"the copy checked (\d+) reads across copy-before-write clusters against the copied "
        r"bitmap and read (\d+) of them again",
        snapfs.log_file.read_text(),
    )
    assert len(copied) == 2
    assert int(copied[0][0]) > int(copied[0][1]) > 0


@pytest.mark.parametrize(("fmt", "detect_zeroes"), [("qcow2", "unmap"), ("raw", "on")])
def test_larger_fleecing_clusters_keep_the_view_exact(
    fmt: str, detect_zeroes: str, shm_dir: Path, snapfs: Snapfs, tmp_path: Path
) -> None:
    """With --fleecing-cluster 1M copy-before-write saves whole 1 MiB clusters (before QEMU
    8.0 every read stays inside one): full and incremental views stay exact where saved and
    unsaved clusters meet, under zero writes, discards and a guest I/O storm."""
    spec = DiskSpec("scsi0", fmt, "scsi", size=SIZE, detect_zeroes=detect_zeroes)  # type: ignore[arg-type]
    vm = TestVM(shm_dir, [spec], contents={"scsi0": disk_content(11)})
    fleecing = vm.workdir / "fleecing" / f"snapfs-{vm.vmid}-scsi0.qcow2"
    big = ("--fleecing-cluster", "1M", "--incremental", "x")
    with vm:
        with snapfs.mounted(vm, tmp_path / "m0", *big, commit=True) as mnt:
            facts = json.loads((mnt / "snapfs.json").read_text())
            major, minor = (int(x) for x in facts["qemu_version"].split(".")[:2])
            assert facts["disks"]["scsi0"]["fleecing_cluster"] == MiB
            assert facts["disks"]["scsi0"]["confined_reads"] == (
                MiB if (major, minor) < (8, 0) else 0
            )
            info = subprocess.run(
                ["qemu-img", "info", "--force-share", "--output=json", str(fleecing)],
                check=True,
                capture_output=True,
                text=True,
            )
            assert json.loads(info.stdout)["cluster-size"] == MiB
            st = json.loads(snapfs("status", vm.vmid, "--json").stdout)
            assert st[0]["disks"]["scsi0"]["fleecing_cluster"] == MiB
            assert "(1.0 MiB clusters)" in snapfs("status", vm.vmid).stdout
            want = vm.snapshot()["scsi0"]
            raw = mnt / "scsi0.raw"
            trigger_copies(vm, "scsi0", stride=2 * MiB)
            check_view(raw, want)
            with GuestIO(vm, seed=5).storm():
                check_view(raw, want)
                snapfs("copy", str(mnt), str(tmp_path / "copy"))
            assert (tmp_path / "copy/scsi0.raw").read_bytes() == want
        for w in range(0, SIZE, 2 * MiB):
            vm.guest_write("scsi0", w + 960 * KiB, 128 * KiB, 0x5A)  # across two clusters
            vm.guest_zero("scsi0", w + 1500 * KiB, 8 * KiB)
        with snapfs.mounted(vm, tmp_path / "m1", *big) as mnt:
            want = vm.snapshot()["scsi0"]
            trigger_copies(vm, "scsi0", at=MiB, stride=2 * MiB)
            regions = [
                tuple(map(int, line.split()))
                for line in (mnt / "scsi0.dirty").read_text().splitlines()
            ]
            assert regions
            with GuestIO(vm, seed=6).storm():
                fd = os.open(mnt / "scsi0.raw", os.O_RDONLY)
                try:
                    for off, length in regions:
                        assert os.pread(fd, length, off) == want[off : off + length], off
                finally:
                    os.close(fd)
        assert not vm.io_errors()
    assert vm.image_content("scsi0") == vm.expected["scsi0"]
