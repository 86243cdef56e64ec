"""`snapfs run`: mount, COMMAND, commit or abort, unmount; real QEMU, real FUSE, real rsync."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dev.devvm import TestVM, file_sha256, poll, sha256
from tests.conftest import Snapfs, vmid

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

RSYNC_REMOTE = Path(__file__).resolve().parents[1] / "contrib" / "snapfs-rsync-remote"


def run_args(vm: TestVM, mnt: Path, *args: str) -> list[str]:
    mnt.mkdir(exist_ok=True)
    return [
        "run",
        vmid(vm),
        "--mountpoint",
        str(mnt),
        "--qmp",
        str(vm.qmp_path),
        "--fleecing-dir",
        str(vm.workdir / "fleecing"),
        *args,
    ]


def assert_backup_is(dest: Path, content: dict[str, bytes]) -> None:
    for name, data in content.items():
        assert file_sha256(dest / f"{name}.raw") == sha256(data), name


def assert_no_session(vm: TestVM, snapfs: Snapfs, mnt: Path, graph: dict[str, Any]) -> None:
    """Unmounted, no state left, the block graph as before (a committed bitmap aside)."""
    assert not os.path.ismount(mnt)
    assert not (snapfs.run_dir / ".state" / vmid(vm)).exists()
    now = vm.graph()
    for key in ("devices", "nodes", "exports"):
        assert now[key] == graph[key], key


def test_full_then_incremental_backups_commit_and_a_failure_loses_nothing(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    graph = vm.graph()
    mnt, dest = tmp_path / "mnt", tmp_path / "backup"
    # 1. The first run is a full backup: plain rsync of the view.
    first = vm.snapshot()
    proc = snapfs(
        *run_args(
            vm, mnt, "--incremental", "nightly", "--", "rsync", "-a", "--sparse", "{}/", f"{dest}/"
        )
    )
    assert proc.returncode == 0
    assert_backup_is(dest, first)
    assert (
        json.loads((dest / "snapfs.json").read_text())["disks"]["virtio0"]["bitmap"]["mode"]
        == "new"
    )
    assert_no_session(vm, snapfs, mnt, graph)

    # 2. A failing command aborts: nothing is committed, its exit status comes back.
    vm.guest_write("virtio0", 0, 65536, 0x11)
    vm.guest_write("scsi0", 1 << 20, 65536, 0x22)
    proc = snapfs(
        *run_args(
            vm,
            mnt,
            "--incremental",
            "nightly",
            "--",
            "sh",
            "-c",
            'test -f "$SNAPFS_MOUNT/snapfs.json" && exit 3',
        ),
        check=False,
    )
    assert proc.returncode == 3, proc.stderr
    assert "aborting" in snapfs.log_file.read_text()
    assert_no_session(vm, snapfs, mnt, graph)

    # 3. The next incremental contains the failed run's changes and the later ones.
    vm.guest_write("virtio0", 8 << 20, 65536, 0x33)
    third = vm.snapshot()
    snapfs(*run_args(vm, mnt, "--incremental", "nightly", "--", str(RSYNC_REMOTE), "{}", str(dest)))
    assert_backup_is(dest, third)
    facts = json.loads((dest / "snapfs.json").read_text())
    assert facts["disks"]["virtio0"]["bitmap"]["mode"] == "reuse"
    dirty = {n: (dest / f"{n}.dirty").read_text().split("\n") for n in vm.disks}
    assert "0 65536" in dirty["virtio0"]
    assert f"{8 << 20} 65536" in dirty["virtio0"]
    assert f"{1 << 20} 65536" in dirty["scsi0"]
    assert not list(dest.glob("*.incomplete"))
    assert_no_session(vm, snapfs, mnt, graph)

    # 4. Committed: the next incremental holds nothing but what follows.
    out = tmp_path / "dirty-after-commit"
    snapfs(
        *run_args(
            vm, mnt, "--incremental", "nightly", "--", "sh", "-c", f"cat {{}}/virtio0.dirty > {out}"
        )
    )
    assert out.read_text() == ""


def test_the_reference_provider_chain_through_run(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    mnt, dest = tmp_path / "mnt", tmp_path / "backup"
    for round_ in range(2):
        vm.guest_write("scsi0", round_ << 20, 4096, 0x40 + round_)
        content = vm.snapshot()
        snapfs(
            *run_args(
                vm,
                mnt,
                "--incremental",
                "ref",
                "--",
                sys.executable,
                "-m",
                "snapfs",
                "copy",
                "{}",
                str(dest),
                "--discard",
            )
        )
        assert_backup_is(dest, content)


def test_command_sees_the_view_and_the_placeholder(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    snapfs(
        *run_args(
            vm,
            mnt,
            "--",
            "sh",
            "-c",
            f'echo "$SNAPFS_MOUNT $SNAPFS_VMID $1" > {out}; ls "$1" >> {out}',
            "sh",
            "{}/",
        )
    )
    lines = out.read_text().splitlines()
    assert lines[0] == f"{mnt} {vmid(vm)} {mnt}/"
    assert "virtio0.raw" in lines[1:]


def test_sigterm_during_the_command_aborts_and_unmounts(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    graph = vm.graph()
    mnt, started = tmp_path / "mnt", tmp_path / "started"
    cmd = [
        sys.executable,
        "-m",
        "snapfs",
        *run_args(
            vm, mnt, "--incremental", "sig", "--", "sh", "-c", f"touch {started}; exec sleep 60"
        ),
    ]
    proc = subprocess.Popen(
        cmd, env=snapfs.env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        poll(started.exists, 30, "the command to start")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert_no_session(vm, snapfs, mnt, graph)
    assert "got SIGTERM: aborting" in snapfs.log_file.read_text()
    # Not committed: the bitmap was never committed, so the next run is a full one again.
    facts = tmp_path / "facts.json"
    snapfs(*run_args(vm, mnt, "--incremental", "sig", "--", "cp", "{}/snapfs.json", str(facts)))
    assert json.loads(facts.read_text())["disks"]["virtio0"]["bitmap"]["mode"] == "new"


def test_a_failed_mount_runs_nothing(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    proc = snapfs(
        "run", vmid(vm), "--qmp", str(tmp_path / "nope"), "--", "touch", str(marker), check=False
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("snapfs: error: ")
    assert "does not exist" in proc.stderr
    assert not marker.exists()


def test_a_missing_command_aborts_with_127(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    graph = vm.graph()
    mnt = tmp_path / "mnt"
    proc = snapfs(*run_args(vm, mnt, "--", str(tmp_path / "no-such-command")), check=False)
    assert proc.returncode == 127
    assert "cannot run" in proc.stderr
    assert_no_session(vm, snapfs, mnt, graph)


def test_run_without_a_command_is_a_usage_error(snapfs: Snapfs) -> None:
    proc = snapfs("run", "100", check=False)
    assert proc.returncode == 2
    assert "needs a command" in proc.stderr


def test_plain_rsync_of_an_incremental_view_fails_and_aborts(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    """Reads outside the changed regions fail (ENODATA), so rsync exits non-zero: the run
    aborts instead of storing a wrong image, and the next incremental loses nothing."""
    mnt, dest = tmp_path / "mnt", tmp_path / "backup"
    snapfs(
        *run_args(vm, mnt, "--incremental", "r", "--", "rsync", "-a", "--sparse", "{}/", f"{dest}/")
    )
    vm.guest_write("virtio0", 0, 65536, 0x44)
    # -I: both snapshots may fall in the same second, and rsync's quick check (size and mtime
    # in seconds) would then skip the files without reading them.
    proc = snapfs(
        *run_args(
            vm, mnt, "--incremental", "r", "--", "rsync", "-a", "-I", "--sparse", "{}/", f"{dest}/"
        ),
        check=False,
    )
    assert proc.returncode == 23  # rsync: "some files/attrs were not transferred"
    assert "No data available" in proc.stderr
    out = tmp_path / "dirty"
    snapfs(*run_args(vm, mnt, "--incremental", "r", "--", "cp", "{}/virtio0.dirty", str(out)))
    assert out.read_text() == "0 65536\n"


def test_in_place_rsync_of_an_incremental_view_is_warned_about(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    """rsync --inplace writes zeros over the previous image where it cannot read: the run
    says so on stderr before it starts (and still fails, so nothing is committed)."""
    mnt, dest = tmp_path / "mnt", tmp_path / "backup"
    snapfs(*run_args(vm, mnt, "--incremental", "r", "--", "rsync", "-a", "{}/", f"{dest}/"))
    vm.guest_write("virtio0", 0, 65536, 0x44)
    vm.guest_zero("virtio0", 65536, 4096)
    vm.guest_discard("scsi0", 0, 65536)
    proc = snapfs(
        *run_args(
            vm, mnt, "--incremental", "r", "--", "rsync", "-a", "-I", "--inplace", "{}/", f"{dest}/"
        ),
        check=False,
    )
    assert proc.returncode == 23
    assert "rsync --inplace on an incremental view overwrites" in proc.stderr
    proc = snapfs(*run_args(vm, mnt, "--", "rsync", "-a", "-I", "--inplace", "{}/", f"{dest}/"))
    assert "--inplace" not in proc.stderr  # a full view: every byte reads
