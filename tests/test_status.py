"""`snapfs status`: every field of the JSON output, for active and stale sessions; real QEMU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dev.devvm import TestVM
from tests.conftest import Snapfs, vmid, wait_gone

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

MiB = 1 << 20


def status(snapfs: Snapfs, *args: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = json.loads(snapfs("status", *args, "--json").stdout)
    return out


def test_status_json_reports_every_field(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    with snapfs.mounted(vm, tmp_path / "mnt", "--incremental", "st") as mnt:
        before = status(snapfs)[0]["disks"]["virtio0"]["fleecing_bytes"]
        vm.guest_write("virtio0", 0, 4 * MiB, 0x77)  # copy-before-write: 4 MiB of old data
        with open(mnt / "scsi0.raw", "rb", buffering=0) as f:
            assert len(f.read(65536)) == 65536
        subprocess.run(
            [
                "fallocate",
                "--punch-hole",
                "--offset",
                str(8 * MiB),
                "--length",
                str(MiB),
                str(mnt / "virtio0.raw"),
            ],
            check=True,
        )
        sessions = status(snapfs)
        assert status(snapfs, vmid(vm)) == sessions
        human = snapfs("status").stdout
    assert len(sessions) == 1
    st = sessions[0]
    assert st["vmid"] == vmid(vm)
    assert st["state"] == "active"
    assert st["error"] is None
    assert isinstance(st["pid"], int)
    assert st["mountpoint"] == str(mnt)
    assert st["snapshot_time"].endswith("+00:00")
    assert st["incremental"] == "st"
    assert st["broken"] is None
    assert set(st["disks"]) == {"virtio0", "scsi0"}
    for name, spec in vm.disks.items():
        d = st["disks"][name]
        assert d["size"] == spec.size
        assert d["bitmap_mode"] == "new"
        assert d["bitmap"]["mode"] == "new"
        assert d["dirty_bytes"] == spec.size
        assert d["readable_bytes"] == spec.size - d["discarded_bytes"]
        assert Path(d["fleecing_path"]).parent == vm.workdir / "fleecing"
        assert d["fleecing_bytes"] > 0
        assert d["fleecing_apparent_bytes"] > 0
        assert d["fleecing_cluster"] == 65536
    # A full view goes through the page cache: the kernel may read ahead of the 64 KiB asked.
    assert 65536 <= st["disks"]["scsi0"]["bytes_read"] <= 8 * MiB
    assert st["disks"]["virtio0"]["bytes_read"] == 0
    assert st["disks"]["virtio0"]["discarded_bytes"] == MiB
    assert st["disks"]["scsi0"]["discarded_bytes"] == 0
    assert st["disks"]["virtio0"]["fleecing_bytes"] >= before + 4 * MiB
    assert f"VM {vmid(vm)}: active, at {mnt}" in human
    assert "clusters" not in human  # said only when not the default
    assert "virtio0: 32.0 MiB, bitmap new" in human
    assert "discarded 1.0 MiB" in human
    # Gone with the session.
    assert status(snapfs) == []
    assert snapfs("status").stdout == "no active snapfs sessions\n"


def test_a_dead_serving_process_shows_as_stale(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    mnt = snapfs.mount(vm, tmp_path / "mnt")
    (pid,) = snapfs.pids()
    os.kill(pid, signal.SIGKILL)
    wait_gone(Path(f"/proc/{pid}"))
    (st,) = status(snapfs)
    assert st["state"] == "stale"
    assert f"snapfs cleanup {vmid(vm)}" in st["error"]
    assert st["mountpoint"] == str(mnt)
    assert st["snapshot_time"] is not None
    for name, spec in vm.disks.items():
        d = st["disks"][name]
        assert d["size"] == spec.size
        assert d["bitmap_mode"] == "none"
        assert d["fleecing_bytes"] > 0
    assert "stale" in snapfs("status").stdout
    snapfs("cleanup", vmid(vm), "--qmp", str(vm.qmp_path))
    assert status(snapfs) == []


def test_status_of_an_unknown_vm_is_an_error(snapfs: Snapfs) -> None:
    proc = snapfs("status", "4242", check=False)
    assert proc.returncode == 3
    assert proc.stderr == "snapfs: error: no snapfs session for '4242'\n"
