"""Restore points from real views: every kept point restores byte for byte.

A real QEMU (7.2 and 10.0), real mounts, ``snapfs copy --keep 3`` through ``snapfs run``
while the guest writes data, zeros and discards of every size during the copies; with an
aborted run, a copy killed in the middle, and a QEMU restart (the raw disk's bitmap is gone,
so it starts a new chain while the qcow2 one goes on). After every run each kept point is
restored and compared with the disks at its snapshot instant, and verified.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dev.devvm import DiskSpec, GuestIO, MiB, TestVM, poll
from snapfs import points
from tests.conftest import Snapfs, disk_content, processes_naming

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

SIZE = 8 * MiB
KEEP = 3


class Points:
    def __init__(self, vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
        self.vm = vm
        self.snapfs = snapfs
        self.tmp = tmp_path
        self.dest = tmp_path / "dest"
        self.guest = GuestIO(vm, seed=33)
        self.want: dict[str, dict[str, bytes]] = {}
        self.runs = 0

    def mount_args(self, mnt: Path) -> list[str]:
        return [
            self.vm.vmid,
            str(mnt),
            "--qmp",
            str(self.vm.qmp_path),
            "--fleecing-dir",
            str(self.tmp / "fleecing"),
            "--incremental",
            "nightly",
        ]

    def backup(self, *, commit: bool = True) -> str:
        """One run with the guest writing all the while; the point's ID."""
        self.runs += 1
        mnt = self.tmp / f"mnt{self.runs}"
        mnt.mkdir()
        self.snapfs("mount", *self.mount_args(mnt))
        want = self.vm.snapshot()
        facts = json.loads((mnt / "snapfs.json").read_text())
        pid = points.point_id(facts["snapshot_time"])
        try:
            with self.guest.storm():
                self.snapfs(
                    "copy", str(mnt), str(self.dest), "--keep", str(KEEP), "--discard", timeout=120
                )
        finally:
            self.snapfs("umount", str(mnt), *(["--commit"] if commit else []))
        self.want[pid] = want
        self.check()
        return pid

    def check(self) -> None:
        listing = json.loads(self.snapfs("points", str(self.dest), "--json").stdout)
        ids = [p["id"] for p in listing["points"]]
        assert ids == sorted(self.want)[-KEEP:]
        out = self.tmp / "restored.raw"
        for pid in ids:
            for name, data in self.want[pid].items():
                self.snapfs("restore", str(self.dest), "--at", pid, name, str(out), "--force")
                got = out.read_bytes()
                if got != data:
                    bad = [
                        o
                        for o in range(0, len(data), 4096)
                        if got[o : o + 4096] != data[o : o + 4096]
                    ]
                    raise AssertionError(
                        f"point {pid} {name}: {len(bad)} wrong 4 KiB blocks, first at {bad[:4]}"
                    )
        verified = self.snapfs("verify", str(self.dest), timeout=120).stdout
        assert verified.count(": ok") == len(ids) * len(self.vm.disks), verified
        assert not self.vm.io_errors()

    def modes(self, pid: str) -> dict[str, str]:
        manifest = json.loads((self.dest / "points" / pid / "manifest.json").read_text())
        return {name: d["mode"] for name, d in manifest["disks"].items()}


def test_restore_points_reproduce_every_kept_snapshot(
    shm_dir: Path, snapfs: Snapfs, tmp_path: Path
) -> None:
    disks = [
        DiskSpec("virtio0", "qcow2", "virtio", size=SIZE, detect_zeroes="unmap"),
        DiskSpec("scsi0", "raw", "scsi", size=SIZE, detect_zeroes="on"),
    ]
    vm = TestVM(
        shm_dir, disks, contents={d.name: disk_content(40 + i) for i, d in enumerate(disks)}
    )
    with vm:
        graph = vm.graph()
        pts = Points(vm, snapfs, tmp_path)
        first = pts.backup()
        assert pts.modes(first) == {"virtio0": "full", "scsi0": "full"}
        for _ in range(2):
            pts.guest.run(30)
            pid = pts.backup()
            assert pts.modes(pid) == {"virtio0": "incremental", "scsi0": "incremental"}

        # Not committed: the next incremental holds its writes again, on top of this point.
        pts.guest.run(30)
        pts.backup(commit=False)
        pts.guest.run(30)
        pts.backup()

        # A copy killed in the middle leaves the kept points as they were, and says so.
        pts.guest.run(30)
        mnt = tmp_path / "mnt-killed"
        mnt.mkdir()
        snapfs("mount", *pts.mount_args(mnt))
        copy = subprocess.Popen(
            [sys.executable, "-m", "snapfs", "copy", str(mnt), str(pts.dest), "--keep", str(KEEP)],
            env=snapfs.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            poll(
                lambda: (
                    any((pts.dest / "points").glob(".incomplete-*/*.qcow2"))
                    or copy.poll() is not None
                ),
                what="the copy to start",
            )
            copy.send_signal(signal.SIGKILL)
        finally:
            copy.wait(60)
            snapfs("umount", str(mnt))
        assert copy.returncode == -signal.SIGKILL
        # Its qemu-nbd went with it (it would keep the images locked).
        poll(lambda: not helpers_of(pts.dest), what="qemu-nbd to follow the killed copy")
        listing = json.loads(snapfs("points", str(pts.dest), "--json").stdout)
        assert len(listing["interrupted"]) == 1
        assert "was not completed" in snapfs("points", str(pts.dest)).stdout
        pts.check()

        # A clean QEMU restart: the qcow2 disk keeps its bitmap, the raw one starts a new chain.
        pts.guest.run(30)
        vm.stop()
        vm.start()
        graph = vm.graph()
        pts.guest.run(30)
        pid = pts.backup()
        assert pts.modes(pid) == {"virtio0": "incremental", "scsi0": "full"}
        pts.guest.run(30)
        pid = pts.backup()
        assert pts.modes(pid) == {"virtio0": "incremental", "scsi0": "incremental"}
        assert json.loads(snapfs("points", str(pts.dest), "--json").stdout)["interrupted"] == []

        # And through `snapfs run`, as the nightly timer does it.
        pts.guest.run(30)
        mnt = tmp_path / "mnt-run"
        mnt.mkdir()
        args = pts.mount_args(mnt)
        before = set(pts.want)
        script = (
            f"cp {mnt}/snapfs.json {tmp_path}/run.json && "
            f"exec {sys.executable} -m snapfs copy {{}} {pts.dest} --keep {KEEP}"
        )
        snapfs("run", args[0], "--mountpoint", *args[1:], "--", "sh", "-c", script, timeout=120)
        run_facts = json.loads((tmp_path / "run.json").read_text())
        pid = points.point_id(run_facts["snapshot_time"])
        assert pid not in before
        assert pid in snapfs("points", str(pts.dest)).stdout
        snapfs("verify", str(pts.dest), "--at", pid, timeout=120)
        now = vm.graph()
        for key in ("devices", "nodes", "exports"):
            assert now[key] == graph[key], key


def helpers_of(dest: Path) -> list[str]:
    """Command lines of running qemu-nbd processes that name ``dest``."""
    return [cmd for cmd in processes_naming(dest).values() if "qemu-nbd" in cmd]
