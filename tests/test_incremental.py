"""Incremental backups end to end: persistent bitmaps, the .dirty sidecar, reads that respect
the bitmap, commit and abort, the reference provider. Real QEMU, real guest writes, real mounts."""

from __future__ import annotations

import errno
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dev.devvm import QEMU_IO, DiskSpec, TestVM
from tests.conftest import Snapfs, wait_gone

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

G = 65536
MiB = 1 << 20


def random_writes(vm: TestVM, rng: random.Random, count: int) -> None:
    """Scattered guest writes of random sizes, some unaligned to the bitmap granularity."""
    for _ in range(count):
        name = rng.choice(sorted(vm.disks))
        size = vm.disks[name].size
        length = rng.choice([512, 4096, G, 3 * G + 512])
        offset = rng.randrange(0, size - length) // 512 * 512
        vm.guest_write(name, offset, length, rng.randrange(1, 256))


def facts(mnt: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((mnt / "snapfs.json").read_text())
    return data


def sidecar(mnt: Path, disk: str) -> list[tuple[int, int]]:
    return [
        (int(o), int(n))
        for o, n in (line.split() for line in (mnt / f"{disk}.dirty").read_text().splitlines())
    ]


def copy(
    snapfs: Snapfs,
    mnt: Path,
    dest: Path,
    vm: TestVM | None = None,
    rng: random.Random | None = None,
    *extra: str,
) -> None:
    """`snapfs copy` in a subprocess; with a VM, guest writes land while it runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapfs", "copy", str(mnt), str(dest), *extra],
        env=snapfs.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        if vm is not None and rng is not None:
            random_writes(vm, rng, 10)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err


def check_backup(dest: Path, expected: dict[str, bytes]) -> None:
    for name, data in expected.items():
        assert (dest / f"{name}.raw").read_bytes() == data, name
        assert not (dest / f"{name}.raw.incomplete").exists()


def test_chain_of_one_full_and_three_incrementals(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    rng = random.Random(7)
    dest = tmp_path / "backup"
    for round_ in range(4):
        if round_:
            random_writes(vm, rng, 25)
        at_point = vm.snapshot()
        mnt = snapfs.mount(vm, tmp_path / f"mnt{round_}", "--incremental", "nightly")
        f = facts(mnt)
        for name, spec in vm.disks.items():
            mode = f["disks"][name]["bitmap"]["mode"]
            assert mode == ("new" if round_ == 0 else "reuse"), (round_, name)
            regions = sidecar(mnt, name)
            if round_:
                assert 0 < sum(n for _, n in regions) < spec.size
            else:
                assert regions == [(0, spec.size)]
        copy(snapfs, mnt, dest, vm, rng)
        snapfs("umount", str(mnt), "--commit")
        check_backup(dest, at_point)


def test_an_uncommitted_incremental_loses_nothing(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    rng = random.Random(11)
    dest = tmp_path / "backup"
    with snapfs.mounted(vm, tmp_path / "m0", "--incremental", "n", commit=True) as mnt:
        copy(snapfs, mnt, dest)
    random_writes(vm, rng, 20)
    first = vm.snapshot()
    with snapfs.mounted(vm, tmp_path / "m1", "--incremental", "n") as mnt:
        dirty_first = {d: sidecar(mnt, d) for d in vm.disks}
        copy(snapfs, mnt, dest)  # copied, but the umount does not commit
    check_backup(dest, first)
    random_writes(vm, rng, 20)
    second = vm.snapshot()
    with snapfs.mounted(vm, tmp_path / "m2", "--incremental", "n", commit=True) as mnt:
        for name in vm.disks:
            readable = sidecar(mnt, name)
            for off, n in dirty_first[name]:  # everything the aborted run covered, and more
                assert any(o <= off and off + n <= o + m for o, m in readable), (name, off)
        copy(snapfs, mnt, dest)
    check_backup(dest, second)
    # A plain umount (the kernel's, no snapfs involved) is an abort too.
    random_writes(vm, rng, 5)
    third = vm.snapshot()
    mnt = snapfs.mount(vm, tmp_path / "m3", "--incremental", "n")
    subprocess.run(["umount", str(mnt)], check=True)
    wait_gone(snapfs.run_dir / ".state" / vm.vmid, timeout=20)
    with snapfs.mounted(vm, tmp_path / "m4", "--incremental", "n", commit=True) as mnt:
        copy(snapfs, mnt, dest)
    check_backup(dest, third)


def test_reads_seeks_and_blocks_follow_the_sidecar(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    with snapfs.mounted(vm, tmp_path / "m0", "--incremental", "b", commit=True):
        pass
    vm.guest_write("virtio0", 4 * G, 2 * G, 0x11)
    vm.guest_write("virtio0", 20 * G + 100, 10, 0x22)  # dirties one whole block
    vm.guest_write("scsi0", 0, 4096, 0x33)
    at_point = vm.snapshot()
    with snapfs.mounted(vm, tmp_path / "m1", "--incremental", "b") as mnt:
        assert sidecar(mnt, "virtio0") == [(4 * G, 2 * G), (20 * G, G)]
        assert sidecar(mnt, "scsi0") == [(0, G)]
        raw = mnt / "virtio0.raw"
        size = vm.disks["virtio0"].size
        # Nothing outside the backup looks like a hole or like zeros.
        assert raw.stat().st_blocks * 512 == size
        fd = os.open(raw, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == 0
            assert os.lseek(fd, 0, os.SEEK_HOLE) == size
            assert os.lseek(fd, 6 * G, os.SEEK_DATA) == 6 * G
            assert os.pread(fd, 2 * G, 4 * G) == at_point["virtio0"][4 * G : 6 * G]
            assert os.pread(fd, G, 20 * G) == at_point["virtio0"][20 * G : 21 * G]
            # Across a readable/unreadable boundary: the whole read fails, no short read.
            for off in (6 * G - 4096, 4 * G - 512, 0):
                with pytest.raises(OSError, match="No data available") as e:
                    os.pread(fd, 8192, off)
                assert e.value.errno == errno.ENODATA
        finally:
            os.close(fd)
        # Tools that do not know the sidecar fail loudly instead of storing zeros.
        out = tmp_path / "delta.raw"
        for tool in (
            ["cp", str(raw), str(out)],
            ["cp", "--sparse=always", str(raw), str(out)],
            ["tar", "--sparse", "-cf", str(tmp_path / "delta.tar"), str(raw)],
            [
                "qemu-img",
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                str(raw),
                str(tmp_path / "delta.qcow2"),
            ],
            ["dd", f"if={raw}", f"of={out}", "bs=1M"],
        ):
            proc = subprocess.run(tool, capture_output=True, text=True)
            assert proc.returncode != 0, f"{tool[0]} succeeded on an incremental view"
            assert "No data available" in proc.stderr, proc.stderr


def test_bitmap_after_qemu_crash_and_clean_restart(tmp_path: Path, snapfs: Snapfs) -> None:
    vm = TestVM(
        tmp_path,
        [
            DiskSpec("virtio0", "qcow2", "virtio", size=8 * MiB),
            DiskSpec("scsi0", "raw", "scsi", size=8 * MiB),
        ],
    )
    with vm:
        with snapfs.mounted(vm, tmp_path / "m0", "--incremental", "x", commit=True):
            pass
        # QEMU writes persistent bitmaps into the image when it closes it; the next start
        # marks them in use, so a crash after that leaves them inconsistent.
        vm.stop()
        vm.start()
        vm.guest_write("virtio0", 0, G, 1)
        vm.stop(kill=True)
        vm.start()
        with snapfs.mounted(vm, tmp_path / "m1", "--incremental", "x", commit=True) as mnt:
            bm = facts(mnt)["disks"]["virtio0"]["bitmap"]
            assert bm["mode"] == "new"
            assert "inconsistent" in bm["reason"]
            assert sidecar(mnt, "virtio0") == [(0, 8 * MiB)]
            # A raw disk's bitmap lives only as long as QEMU: gone after any restart.
            assert facts(mnt)["disks"]["scsi0"]["bitmap"]["mode"] == "new"
        vm.guest_write("virtio0", 2 * G, G, 2)
        vm.stop()
        vm.start()
        with snapfs.mounted(vm, tmp_path / "m2", "--incremental", "x") as mnt:
            assert facts(mnt)["disks"]["virtio0"]["bitmap"]["mode"] == "reuse"
            assert sidecar(mnt, "virtio0") == [(2 * G, G)]
            assert facts(mnt)["disks"]["scsi0"]["bitmap"]["mode"] == "new"


def test_different_ids_are_independent(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    with snapfs.mounted(vm, tmp_path / "m0", "--incremental", "a", commit=True):
        pass
    vm.guest_write("virtio0", 0, G, 1)
    with snapfs.mounted(vm, tmp_path / "m1", "--incremental", "b", commit=True) as mnt:
        assert facts(mnt)["disks"]["virtio0"]["bitmap"]["mode"] == "new"
    vm.guest_write("virtio0", 4 * G, G, 2)
    with snapfs.mounted(vm, tmp_path / "m2", "--incremental", "a") as mnt:
        assert sidecar(mnt, "virtio0") == [(0, G), (4 * G, G)]
    with snapfs.mounted(vm, tmp_path / "m3", "--incremental", "b") as mnt:
        assert sidecar(mnt, "virtio0") == [(4 * G, G)]


def test_provider_refuses_an_incremental_without_its_full_image(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    with snapfs.mounted(vm, tmp_path / "m0", "--incremental", "p", commit=True):
        pass
    vm.guest_write("virtio0", 0, G, 1)
    with snapfs.mounted(vm, tmp_path / "m1", "--incremental", "p") as mnt:
        proc = snapfs("copy", str(mnt), str(tmp_path / "empty"), check=False)
        assert proc.returncode != 0
        assert "no full image" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_huge_disk_with_many_dirty_extents(tmp_path: Path, snapfs: Snapfs) -> None:
    """1 TiB virtual size, 1,000,000 dirty extents: the mount and `cat` of the sidecar
    complete, the sidecar lists every extent, and the serving process's peak RSS stays below
    200 MiB. The times go to stdout (run with -s to see them); nothing about time is asserted."""
    extents = 1_000_000
    step = MiB  # one 4 KiB write per MiB: each dirties one 64 KiB block of the bitmap
    spec = DiskSpec("virtio0", "qcow2", "virtio", size=1 << 40, modelled=False)
    vm = TestVM(tmp_path, [spec])
    try:
        with vm:
            with snapfs.mounted(vm, tmp_path / "m0", "--incremental", "big", commit=True):
                pass
            vm.stop()
            # Offline writes through one qemu-io process: the persistent bitmap records them as
            # QEMU would. Zero writes change only the image's metadata (about 128 MiB of L2
            # tables for a million), and cache=unsafe spares a flush after every one of them;
            # qemu-io writes the metadata out when it closes the image.
            script = "".join(f"write -q -z {i * step} 4096\n" for i in range(extents))
            t0 = time.monotonic()
            subprocess.run(
                [QEMU_IO, "-t", "unsafe", "-f", "qcow2", str(spec.path)],
                input=script.encode(),
                stdout=subprocess.DEVNULL,  # a prompt per command
                stderr=subprocess.PIPE,
                check=True,
            )
            write_s = time.monotonic() - t0
            vm.start()
            t0 = time.monotonic()
            mnt = snapfs.mount(vm, tmp_path / "m1", "--incremental", "big")
            mount_s = time.monotonic() - t0
            try:
                t0 = time.monotonic()
                text = subprocess.run(
                    ["cat", str(mnt / "virtio0.dirty")], capture_output=True, check=True
                ).stdout
                cat_s = time.monotonic() - t0
                (pid,) = snapfs.pids()
                status = Path(f"/proc/{pid}/status").read_text()
                hwm = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
                hwm_kib = int(hwm.split()[1])
                assert facts(mnt)["disks"]["virtio0"]["bitmap"]["mode"] == "reuse"
                lines = text.splitlines()
                assert len(lines) == extents
                # The first line that differs, not pytest's diff of a million lines.
                wrong = next(
                    (i for i, line in enumerate(lines) if line != b"%d %d" % (i * step, G)), None
                )
                assert wrong is None, f"sidecar line {wrong + 1}: {lines[wrong]!r}"
                print(
                    f"\n1 TiB disk, {extents} dirty extents: made in {write_s:.1f} s, "
                    f"mount {mount_s:.2f} s, cat sidecar {cat_s:.2f} s, "
                    f"serving process peak RSS {hwm_kib / 1024:.0f} MiB"
                )
                assert hwm_kib < 200 * 1024
            finally:
                snapfs("umount", str(mnt))
    finally:
        spec.path.unlink(missing_ok=True)  # not kept with the other files
