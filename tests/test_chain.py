"""A chain of backups reproduces every committed snapshot byte for byte.

A full backup and several incrementals through both providers (``snapfs copy --discard`` and
``contrib/snapfs-rsync-remote``), each with its own incremental ID, while the guest writes
data, zeros and discards of every size and alignment between and during the copies; with an
aborted run, a failed ``snapfs run``, a killed serving process plus ``snapfs cleanup``, and a
clean QEMU restart in the middle. The guest writes on through every ``umount`` and the
``cleanup``, while the filters go and the bitmaps are committed or dropped. Real QEMU (run on
7.2 and 10.0), real mounts, real rsync.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dev.devvm import DiskSpec, GuestIO, MiB, TestVM, poll
from tests.conftest import Snapfs, disk_content

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

RSYNC_REMOTE = Path(__file__).resolve().parents[1] / "contrib" / "snapfs-rsync-remote"
SIZE = 8 * MiB


class Chain:
    """One VM, two backup chains, and the checks after every run."""

    def __init__(self, vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
        self.vm = vm
        self.snapfs = snapfs
        self.tmp = tmp_path
        self.dest = {"a": tmp_path / "dest-a", "b": tmp_path / "dest-b"}
        self.runs = 0
        self.during_umount = 0  # guest operations finished while an umount ran
        self.graph = vm.graph()
        self.guest = GuestIO(vm, seed=21)

    def mount_args(self, mnt: Path, chain: str) -> list[str]:
        return [
            self.vm.vmid,
            str(mnt),
            "--qmp",
            str(self.vm.qmp_path),
            "--fleecing-dir",
            str(self.tmp / "fleecing"),
            "--incremental",
            chain,
        ]

    def provider(self, chain: str, mnt: Path) -> list[str]:
        if chain == "a":
            return ["snapfs", "copy", str(mnt), str(self.dest["a"]), "--discard"]
        return ["sh", str(RSYNC_REMOTE), str(mnt), str(self.dest["b"])]

    def run_provider(self, chain: str, mnt: Path) -> None:
        cmd = self.provider(chain, mnt)
        if cmd[0] == "snapfs":
            self.snapfs(*cmd[1:], timeout=120)
            return
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr

    def backup(self, chain: str, *, commit: bool = True) -> dict[str, bytes]:
        """One run with the guest writing all the while; return the snapshot."""
        self.runs += 1
        mnt = self.tmp / f"mnt{self.runs}"
        mnt.mkdir()
        self.snapfs("mount", *self.mount_args(mnt, chain))
        want = self.vm.snapshot()
        # The guest writes on through the umount: what it writes while the filters go and the
        # bitmaps are committed or dropped belongs to the next incremental.
        with self.guest.storm():
            try:
                self.run_provider(chain, mnt)
            finally:
                before = self.guest.done
                self.snapfs("umount", str(mnt), *(["--commit"] if commit else []))
                self.during_umount += self.guest.done - before
        if commit:
            self.check(chain, want)
        return want

    def between(self, count: int = 30) -> None:
        """Guest I/O between two backups."""
        self.guest.run(count)

    def check(self, chain: str, want: dict[str, bytes]) -> None:
        for name, data in want.items():
            got = (self.dest[chain] / f"{name}.raw").read_bytes()
            if got != data:
                bad = [
                    off
                    for off in range(0, len(data), 4096)
                    if got[off : off + 4096] != data[off : off + 4096]
                ]
                raise AssertionError(
                    f"run {self.runs}, chain {chain}, {name}: {len(bad)} "
                    f"wrong 4 KiB blocks, first at {bad[:4]}"
                )
            assert not (self.dest[chain] / f"{name}.raw.incomplete").exists()
        self.check_graph()

    def check_graph(self) -> None:
        now = self.vm.graph()
        for key in ("devices", "nodes", "exports"):
            assert now[key] == self.graph[key], key
        assert not self.vm.io_errors()


def test_a_chain_of_backups_reproduces_every_snapshot(
    shm_dir: Path,
    snapfs: Snapfs,
    tmp_path: Path,
) -> None:
    disks = [
        DiskSpec("virtio0", "qcow2", "virtio", size=SIZE, detect_zeroes="unmap"),
        DiskSpec("scsi0", "raw", "scsi", size=SIZE, detect_zeroes="on"),
    ]
    vm = TestVM(
        shm_dir, disks, contents={d.name: disk_content(10 + i) for i, d in enumerate(disks)}
    )
    with vm:
        chain = Chain(vm, snapfs, tmp_path)
        # Full backups, then incrementals.
        for run in range(3):
            for c in ("a", "b"):
                chain.between()
                chain.backup(c)
            if run == 0:
                for c in ("a", "b"):
                    assert_modes(chain.dest[c], "new")
            else:
                for c in ("a", "b"):
                    assert_modes(chain.dest[c], "reuse")

        # An aborted run (copied, not committed), then a failed `snapfs run`: the next
        # incremental still holds everything since the last commit.
        chain.between()
        chain.backup("a", commit=False)
        chain.between()
        mnt = tmp_path / "mnt-run"
        mnt.mkdir()
        failing = chain.provider("b", mnt)
        failing = ["sh", "-c", f"{' '.join(failing)} && exit 3"]
        args = chain.mount_args(mnt, "b")
        proc = snapfs("run", args[0], "--mountpoint", *args[1:], "--", *failing, check=False)
        assert proc.returncode == 3, proc.stderr
        chain.check_graph()
        for c in ("a", "b"):
            chain.between()
            chain.backup(c)

        # The serving process is killed during a copy; `snapfs cleanup` restores the VM.
        chain.between()
        mnt = tmp_path / "mnt-killed"
        mnt.mkdir()
        snapfs("mount", *chain.mount_args(mnt, "a"))
        with chain.guest.storm():
            copy = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "snapfs",
                    "copy",
                    str(mnt),
                    str(chain.dest["a"]),
                    "--discard",
                ],
                env=snapfs.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            poll(
                lambda: (
                    (chain.dest["a"] / "virtio0.raw.incomplete").exists() or copy.poll() is not None
                ),
                what="the copy to start",
            )
            os.kill(serving_pid(snapfs, vm), signal.SIGKILL)
            copy.wait(60)
            snapfs("cleanup", vm.vmid)
        chain.check_graph()
        for c in ("a", "b"):
            chain.between()
            chain.backup(c)

        # A clean QEMU restart: the qcow2 disk keeps its bitmap, the raw one starts over.
        chain.between()
        vm.stop()
        vm.start()
        chain.graph = vm.graph()
        for c in ("a", "b"):
            chain.between()
            chain.backup(c)
            facts = json.loads((chain.dest[c] / "snapfs.json").read_text())
            modes = {name: d["bitmap"]["mode"] for name, d in facts["disks"].items()}
            assert modes == {"virtio0": "reuse", "scsi0": "new"}
        for c in ("a", "b"):
            chain.between()
            chain.backup(c)
            assert_modes(chain.dest[c], "reuse")
        assert chain.during_umount > 0, "the guest never wrote during an umount"
    for name in vm.disks:
        assert vm.image_content(name) == vm.expected[name], name


def assert_modes(dest: Path, mode: str) -> None:
    facts: dict[str, Any] = json.loads((dest / "snapfs.json").read_text())
    assert {d["bitmap"]["mode"] for d in facts["disks"].values()} == {mode}


def serving_pid(snapfs: Snapfs, vm: TestVM) -> int:
    (pid,) = snapfs.pids()
    return pid


def test_copy_reads_qemus_export_directly_and_through_the_view_alike(
    shm_dir: Path, snapfs: Snapfs, tmp_path: Path
) -> None:
    """As root, `snapfs copy` reads the session's NBD export itself (the view's counters stay
    at 0); with SNAPFS_COPY_DIRECT=0 it reads through the view. Both give the snapshot, with
    the guest writing data, zeros and discards during the copies."""
    disks = [DiskSpec("virtio0", "qcow2", "virtio", size=SIZE, detect_zeroes="unmap")]
    vm = TestVM(shm_dir, disks, contents={"virtio0": disk_content(77)})
    with vm:
        guest = GuestIO(vm, seed=5)
        mnt = snapfs.mount(vm, tmp_path / "mnt")
        try:
            want = vm.snapshot()["virtio0"]
            for direct, dest in (("1", tmp_path / "direct"), ("0", tmp_path / "view")):
                env = dict(snapfs.env, SNAPFS_COPY_DIRECT=direct)
                with guest.storm():
                    proc = subprocess.run(
                        [sys.executable, "-m", "snapfs", "copy", str(mnt), str(dest)],
                        env=env,
                        capture_output=True,
                        text=True,
                        timeout=120,
                    )
                assert proc.returncode == 0, proc.stderr
                assert (dest / "virtio0.raw").read_bytes() == want, direct
                status = json.loads(snapfs("status", vm.vmid, "--json").stdout)
                read = _find(status, "bytes_read")
                assert (read == 0) if direct == "1" else (read > SIZE // 2), (direct, read)
        finally:
            snapfs("umount", str(mnt))


def _find(data: Any, key: str) -> Any:
    """The first value of ``key`` anywhere in a JSON document."""
    if isinstance(data, dict):
        if key in data:
            return data[key]
        data = list(data.values())
    if isinstance(data, list):
        for item in data:
            found = _find(item, key)
            if found is not None:
                return found
    return None
