"""Fixtures for integration tests: a real QEMU VM, the real snapfs CLI, real mounts.

Every test gets its own run directory (SNAPFS_RUN_DIR) so sessions never collide; the
``leftovers`` fixture kills serving processes and lazily unmounts whatever a failing test left
mounted below its tmp_path, so nothing outlives a test.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapfs.devvm import DiskSpec, TestVM, poll
from snapfs.errors import FuseError
from snapfs.fuse import kernel


def mounts_below(path: Path) -> list[str]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mp = line.split()[1].replace("\\040", " ")
            if mp.startswith(str(path)):
                out.append(mp)
    return out


def lazy_umount(path: str) -> None:
    with contextlib.suppress(FuseError):
        kernel.unmount(path, lazy=True)


class Snapfs:
    """Runs the real ``snapfs`` command with this test's run directory and log file."""

    def __init__(self, run_dir: Path, log_file: Path) -> None:
        self.run_dir = run_dir
        self.log_file = log_file
        self.env = dict(os.environ, SNAPFS_RUN_DIR=str(run_dir), SNAPFS_LOG_FILE=str(log_file))

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "snapfs", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            log = self.log_file.read_text() if self.log_file.exists() else ""
            raise AssertionError(
                f"snapfs {' '.join(args)} failed ({proc.returncode}): "
                f"{proc.stderr}\n--- log ---\n{log}"
            )
        return proc

    def pids(self) -> list[int]:
        pids = []
        for pidfile in self.run_dir.glob(".state/*/pid"):
            with contextlib.suppress(ValueError, OSError):
                pids.append(int(pidfile.read_text()))
        return pids

    def mount(self, vm: TestVM, mountpoint: Path, *args: str) -> Path:
        self.mount_proc(vm, mountpoint, *args)
        return mountpoint

    def mount_proc(
        self, vm: TestVM, mountpoint: Path, *args: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``snapfs mount`` of the VM at ``mountpoint``: what it printed, and its status."""
        mountpoint.mkdir(exist_ok=True)
        return self(
            "mount",
            vmid(vm),
            str(mountpoint),
            "--qmp",
            str(vm.qmp_path),
            "--fleecing-dir",
            str(vm.workdir / "fleecing"),
            *args,
            check=check,
        )

    @contextlib.contextmanager
    def mounted(
        self, vm: TestVM, mountpoint: Path, *args: str, commit: bool = False
    ) -> Iterator[Path]:
        """Mounted for the ``with`` body; unmounted after it (``--commit`` if asked)."""
        self.mount(vm, mountpoint, *args)
        ok = False
        try:
            yield mountpoint
            ok = True
        finally:
            if os.path.ismount(mountpoint):
                extra = ["--commit"] if commit and ok else []
                self("umount", str(mountpoint), *extra, check=ok)


def vmid(vm: TestVM) -> str:
    return vm.vmid


@pytest.fixture
def snapfs(tmp_path: Path) -> Iterator[Snapfs]:
    run_dir = tmp_path / "run"
    tool = Snapfs(run_dir, tmp_path / "snapfs.log")
    try:
        yield tool
    finally:
        for pid in tool.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mp in reversed(mounts_below(tmp_path)):
            lazy_umount(mp)


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[TestVM]:
    """Two disks of different formats and bus types: virtio-blk qcow2 and scsi-hd raw."""
    machine = TestVM(
        tmp_path,
        [
            DiskSpec("virtio0", "qcow2", "virtio", size=32 << 20),
            DiskSpec("scsi0", "raw", "scsi", size=24 << 20),
        ],
    )
    try:
        yield machine.start()
    finally:
        machine.stop()


def wait_gone(path: Path, timeout: float = 10) -> None:
    poll(lambda: not path.exists(), timeout, f"{path} to go away")
