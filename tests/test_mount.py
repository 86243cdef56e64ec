"""`snapfs mount` end to end: real QEMU, real NBD export, real FUSE mount, real cp and rsync."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dev.devvm import DiskSpec, Monitor, TestVM, file_sha256, poll, sha256
from tests.conftest import Snapfs, vmid, wait_gone

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

MiB = 1 << 20


def write_everywhere(vm: TestVM, pattern: int) -> None:
    """Guest writes scattered over every disk, including its first and last block."""
    for name, spec in vm.disks.items():
        for off in (0, spec.size // 3, spec.size // 2 + 4096, spec.size - 65536):
            vm.guest_write(name, off, 65536, pattern)


def test_cp_of_each_disk_equals_the_disk_at_the_mount(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    before = vm.snapshot()
    with snapfs.mounted(vm, tmp_path / "mnt") as mnt:
        write_everywhere(vm, 0x5A)
        assert sorted(os.listdir(mnt)) == [
            "scsi0.dirty",
            "scsi0.raw",
            "snapfs.json",
            "virtio0.dirty",
            "virtio0.raw",
        ]
        for name, spec in vm.disks.items():
            raw = mnt / f"{name}.raw"
            assert raw.stat().st_size == spec.size
            assert (mnt / f"{name}.dirty").read_text() == f"0 {spec.size}\n"
            out = tmp_path / f"{name}.copy"
            subprocess.run(["cp", "--sparse=always", str(raw), str(out)], check=True)
            assert file_sha256(out) == sha256(before[name]), name
        facts = json.loads((mnt / "snapfs.json").read_text())
        # Each disk's worker serves as a batch thread (snapfs.sched.batch_scheduled); the
        # threads that answer everything else are scheduled as usual.
        pid = int((snapfs.run_dir / ".state" / vmid(vm) / "pid").read_text())
        policies = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):  # an idle pool thread that ended
                policies.append(os.sched_getscheduler(int(tid)))
        assert policies.count(os.SCHED_BATCH) == len(vm.disks), policies
        assert os.sched_getscheduler(pid) == os.SCHED_OTHER
    assert facts["vmid"] == vmid(vm)
    assert facts["snapshot_time"].endswith("+00:00")
    assert facts["qemu_version"].startswith(vm.qemu_version())
    assert facts["disks"]["virtio0"]["format"] == "qcow2"
    assert facts["disks"]["scsi0"]["format"] == "raw"
    for name, spec in vm.disks.items():
        d = facts["disks"][name]
        assert d["size"] == spec.size
        assert d["bitmap"]["mode"] == "none"
        assert all(str(n).startswith("snapfs-") for k, n in d["nodes"].items() if k != "disk")
    # The guest's writes went to the guest's disks.
    vm.stop()
    for name in vm.disks:
        assert vm.image_content(name) == vm.expected[name]


def test_umount_restores_the_block_graph(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    graph = vm.graph()
    fleecing = tmp_path / "vm-fleecing"
    for cycle in range(2):
        mnt = tmp_path / f"mnt{cycle}"
        mnt.mkdir()
        snapfs(
            "mount", vmid(vm), str(mnt), "--qmp", str(vm.qmp_path), "--fleecing-dir", str(fleecing)
        )
        assert vm.graph() != graph
        assert len(list(fleecing.iterdir())) == 2
        vm.guest_write("virtio0", 0, 4096, 0x11 + cycle)
        snapfs("umount", str(mnt))
        assert not os.path.ismount(mnt)
        assert vm.graph() == graph
        assert list(fleecing.iterdir()) == []
        assert not (snapfs.run_dir / ".state" / vmid(vm)).exists()


def test_a_removed_state_directory_is_put_back(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    """A cleaner of /run that removes the session's state while it serves: the serving
    process puts it back, so `snapfs status` and `snapfs umount --commit` still find it, and
    the teardown restores the graph and commits."""
    graph = vm.graph()
    sdir = snapfs.run_dir / ".state" / vmid(vm)
    mnt = snapfs.mount(vm, tmp_path / "mnt", "--incremental", "x")
    pid = int((sdir / "pid").read_text())
    try:
        want = (mnt / "virtio0.raw").read_bytes()[:MiB]
        # The guest zeroes and discards what the view shows, and the view stays the snapshot.
        vm.guest_zero("virtio0", 4096, 60_000)
        vm.guest_zero("virtio0", 256 * 1024, 64 * 1024, unmap=True)
        vm.guest_discard("virtio0", 512 * 1024, 128 * 1024)
        for removed in (sdir, sdir / "control.sock", sdir / "state.json"):
            before = os.stat(sdir / "control.sock").st_ino
            if removed == sdir:
                shutil.rmtree(sdir)
            else:
                removed.unlink()
            poll(
                lambda: (
                    (sdir / "state.json").exists()
                    and (sdir / "control.sock").exists()
                    and (sdir / "pid").read_text().strip() == str(pid)
                ),
                what=f"{removed.name} back",
            )
            assert (os.stat(sdir / "control.sock").st_ino != before) == (
                removed != sdir / "state.json"
            )
            status = json.loads(snapfs("status", vmid(vm), "--json").stdout)
            assert status[0]["state"] == "active", status
            assert (mnt / "virtio0.raw").read_bytes()[:MiB] == want
        # QEMU's NBD socket went with the directory: snapfs copy reads through the view.
        snapfs("copy", str(mnt), str(tmp_path / "copy"))
        assert (tmp_path / "copy" / "virtio0.raw").read_bytes()[:MiB] == want
        out = snapfs("umount", str(mnt), "--commit").stdout + snapfs.log_file.read_text()
        assert "committed" in out
    finally:
        if os.path.ismount(mnt):
            os.kill(pid, signal.SIGTERM)
    assert not os.path.ismount(mnt)
    after = vm.graph()
    # The commit left the incremental's bitmaps, and nothing else.
    assert {name for _, name, _ in after.pop("bitmaps")} == {"snapfs-x"}
    graph.pop("bitmaps")
    assert after == graph
    assert not sdir.exists()
    assert "was removed; putting it back" in snapfs.log_file.read_text()
    # The next incremental of the same ID reuses the committed bitmap.
    with snapfs.mounted(vm, tmp_path / "mnt2", "--incremental", "x") as mnt2:
        facts = json.loads((mnt2 / "snapfs.json").read_text())
        assert facts["disks"]["virtio0"]["bitmap"]["mode"] == "reuse"


def test_plain_umount_tears_down(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    graph = vm.graph()
    mnt = snapfs.mount(vm, tmp_path / "mnt")
    subprocess.run(["umount", str(mnt)], check=True)
    wait_gone(snapfs.run_dir / ".state" / vmid(vm), timeout=20)
    assert vm.graph() == graph
    assert list((vm.workdir / "fleecing").iterdir()) == []
    # And the VM can be mounted again.
    with snapfs.mounted(vm, tmp_path / "mnt") as mnt:
        assert (mnt / "virtio0.raw").exists()
    assert vm.graph() == graph


def test_fusermount_u_tears_down(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    graph = vm.graph()
    mnt = snapfs.mount(vm, tmp_path / "mnt")
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    wait_gone(snapfs.run_dir / ".state" / vmid(vm), timeout=20)
    assert vm.graph() == graph


def test_another_qmp_client_works_while_mounted(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    with snapfs.mounted(vm, tmp_path / "mnt"):
        mon = Monitor(vm.qmp_path)
        try:
            status = mon.cmd_raw("query-status")
            assert status["return"]["status"] == "prelaunch"
        finally:
            mon.close()


def test_rsync_sparse_copies_match(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    before = vm.snapshot()
    dest = tmp_path / "backup"
    with snapfs.mounted(vm, tmp_path / "mnt") as mnt:
        write_everywhere(vm, 0xA5)
        subprocess.run(["rsync", "-a", "--sparse", f"{mnt}/", f"{dest}/"], check=True)
    for name in vm.disks:
        assert file_sha256(dest / f"{name}.raw") == sha256(before[name]), name
    assert json.loads((dest / "snapfs.json").read_text())["vmid"] == vmid(vm)


def test_disk_files_are_read_only_but_open_read_write(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    with snapfs.mounted(vm, tmp_path / "mnt") as mnt:
        fd = os.open(mnt / "virtio0.raw", os.O_RDWR)
        try:
            with pytest.raises(OSError, match="Read-only") as e:
                os.pwrite(fd, b"x", 0)
            assert e.value.errno == errno.EROFS
        finally:
            os.close(fd)
        with pytest.raises(OSError, match="Read-only") as e:
            os.open(mnt / "virtio0.dirty", os.O_WRONLY)
        assert e.value.errno == errno.EROFS
        st = os.stat(mnt)
        assert st.st_mode & 0o777 == 0o700
        assert os.stat(mnt / "virtio0.raw").st_mode & 0o777 == 0o600


def test_empty_cdrom_is_left_out(tmp_path: Path, snapfs: Snapfs) -> None:
    cd = [
        "-drive",
        "if=none,id=drive-ide2,media=cdrom",
        "-device",
        "ide-cd,drive=drive-ide2,id=ide2",
    ]
    with (
        TestVM(
            tmp_path, [DiskSpec("scsi0", "raw", "scsi", size=8 * MiB)], extra_args=cd
        ) as machine,
        snapfs.mounted(machine, tmp_path / "mnt") as mnt,
    ):
        assert sorted(os.listdir(mnt)) == ["scsi0.dirty", "scsi0.raw", "snapfs.json"]


def test_exclude_leaves_a_disk_out(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    with snapfs.mounted(vm, tmp_path / "mnt", "--exclude", "scsi0") as mnt:
        assert sorted(os.listdir(mnt)) == ["snapfs.json", "virtio0.dirty", "virtio0.raw"]


# -- bad input: a one-line error, a non-zero exit, the VM unchanged ----------------------------


def assert_refused(snapfs: Snapfs, vm: TestVM, args: list[str], words: str) -> None:
    graph = vm.graph()
    proc = snapfs(*args, check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("snapfs: error: ")
    assert words in lines[0], lines[0]
    assert vm.graph() == graph


def test_bad_input_is_refused(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    qmp = ["--qmp", str(vm.qmp_path)]
    assert_refused(
        snapfs, vm, ["mount", vmid(vm), str(mnt), "--qmp", str(tmp_path / "nope")], "does not exist"
    )
    assert_refused(snapfs, vm, ["mount", "4242", str(mnt)], "4242")
    assert_refused(
        snapfs, vm, ["mount", vmid(vm), str(tmp_path / "missing"), *qmp], "does not exist"
    )
    (mnt / "file").write_text("x")
    assert_refused(snapfs, vm, ["mount", vmid(vm), str(mnt), *qmp], "not empty")
    (mnt / "file").unlink()
    assert_refused(snapfs, vm, ["mount", "abc/def", str(mnt), *qmp], "invalid VMID")
    assert_refused(snapfs, vm, ["mount", vmid(vm), "relative", *qmp], "relative does not exist")
    assert_refused(snapfs, vm, ["mount", vmid(vm), str(mnt), *qmp, "--exclude", "sda"], "sda")
    for size in ("32K", "3M", "96K", "4M", "1G", "-1M", "1.5M", "x" * 80):
        assert_refused(
            snapfs,
            vm,
            ["mount", vmid(vm), str(mnt), *qmp, f"--fleecing-cluster={size}"],
            "invalid --fleecing-cluster",
        )
    assert_refused(snapfs, vm, ["umount", "4242"], "no snapfs session")


def test_second_mount_of_a_mounted_vm_is_refused(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    with snapfs.mounted(vm, tmp_path / "mnt"):
        other = tmp_path / "mnt2"
        other.mkdir()
        graph = vm.graph()
        proc = snapfs("mount", vmid(vm), str(other), "--qmp", str(vm.qmp_path), check=False)
        assert proc.returncode != 0
        assert "already" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert vm.graph() == graph
        assert not os.path.ismount(other)


def test_running_nbd_server_is_refused(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    vm.qmp(
        "nbd-server-start",
        addr={"type": "unix", "data": {"path": str(tmp_path / "other-nbd.sock")}},
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert_refused(
        snapfs, vm, ["mount", vmid(vm), str(mnt), "--qmp", str(vm.qmp_path)], "NBD server"
    )
    assert not os.path.ismount(mnt)


def test_a_socket_that_is_not_qemu_is_refused(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(str(path))
        srv.listen(1)
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        proc = snapfs("mount", vmid(vm), str(mnt), "--qmp", str(path), check=False, timeout=30)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_snapfs_json_and_mount_listing(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    with snapfs.mounted(vm, tmp_path / "mnt") as mnt:
        line = next(
            ln for ln in Path("/proc/self/mounts").read_text().splitlines() if f" {mnt} " in ln
        )
        assert line.split()[2] == "fuse.snapfs"
        du = subprocess.run(
            ["du", "-B1", "--apparent-size", str(mnt / "scsi0.raw")],
            capture_output=True,
            text=True,
            check=True,
        )
        assert int(du.stdout.split()[0]) == vm.disks["scsi0"].size
    assert not os.path.ismount(mnt)


def test_a_disk_that_cannot_be_snapshotted_fails_the_mount_unless_excluded(
    tmp_path: Path, snapfs: Snapfs
) -> None:
    ro = tmp_path / "ro.raw"
    ro.write_bytes(b"\1" * MiB)
    extra = [
        "-drive",
        f"file={ro},if=none,id=drive-scsi1,format=raw,readonly=on",
        "-device",
        "scsi-hd,bus=scsihw0.0,drive=drive-scsi1,id=scsi1",
    ]
    with TestVM(
        tmp_path, [DiskSpec("scsi0", "raw", "scsi", size=4 * MiB)], extra_args=extra
    ) as machine:
        graph = machine.graph()
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        assert_refused(
            snapfs,
            machine,
            ["mount", vmid(machine), str(mnt), "--qmp", str(machine.qmp_path)],
            "scsi1",
        )
        assert machine.graph() == graph
        with snapfs.mounted(machine, mnt, "--exclude", "scsi1") as m:
            assert sorted(os.listdir(m)) == ["scsi0.dirty", "scsi0.raw", "snapfs.json"]


def test_non_root_gets_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            "runuser",
            "-u",
            "nobody",
            "--",
            sys.executable,
            "-m",
            "snapfs",
            "mount",
            "100",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd="/",
        timeout=60,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "snapfs: error: snapfs must run as root (it mounts FUSE and talks to QEMU)"
    ]


def test_no_tune_leaves_qemu_alone_and_reads_the_same(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    """--no-tune: snapfs.json says so, and every disk reads as the snapshot, with the guest
    writing data, zeros and discards meanwhile."""
    before = vm.snapshot()
    with snapfs.mounted(vm, tmp_path / "mnt", "--no-tune") as mnt:
        for name in vm.disks:
            vm.guest_write(name, 0, 65536, 0x21)
            vm.guest_zero(name, MiB, 65536)
            vm.guest_discard(name, 2 * MiB, 65536)
        facts = json.loads((mnt / "snapfs.json").read_text())
        assert facts["tuned"] is False
        for name in vm.disks:
            assert (mnt / f"{name}.raw").read_bytes() == before[name]
