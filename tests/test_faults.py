"""Reliability and security: crashes, dying VMs, full fleecing storage, hostile input.

Real QEMU, real mounts, real signals. Each test states what must not be lost."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dev.devvm import DiskSpec, TestVM, poll
from snapfs.fuse import kernel
from tests.conftest import Snapfs, covers, sidecar

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

G = 65536
MiB = 1 << 20


def serving_pid(snapfs: Snapfs, vm: TestVM) -> int:
    return int((snapfs.run_dir / ".state" / vm.vmid / "pid").read_text())


def stat_in_thread(path: Path, timeout: float = 5.0) -> OSError | None:
    """``os.stat`` that cannot hang the test: the error it gave, None if it worked."""
    result: list[OSError | None] = []

    def run() -> None:
        try:
            os.stat(path)
            result.append(None)
        except OSError as err:
            result.append(err)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert result, f"stat of {path} hung"
    return result[0]


def test_sigkill_of_the_serving_process_then_cleanup(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    graph = vm.graph()
    with snapfs.mounted(vm, tmp_path / "m0", "--incremental", "k", commit=True):
        pass
    base = vm.graph()
    vm.guest_write("virtio0", 0, G, 1)
    mnt = snapfs.mount(vm, tmp_path / "m1", "--incremental", "k")
    reader = open(mnt / "virtio0.raw", "rb", buffering=0)  # noqa: SIM115 - a copy in progress
    try:
        reader.read(4096)
        pid = serving_pid(snapfs, vm)
        os.kill(pid, signal.SIGKILL)
        poll(lambda: not Path(f"/proc/{pid}").exists(), 10, "the serving process to die")
        # A dead mount: an error, not a hang, and not an empty directory.
        err = stat_in_thread(mnt / "virtio0.raw")
        assert err is not None
        assert err.errno == errno.ENOTCONN
    finally:
        with contextlib.suppress(OSError):
            reader.close()
    vm.guest_write("virtio0", 4 * G, G, 2)
    snapfs("cleanup", vm.vmid)
    assert not kernel.is_mounted(mnt)
    assert vm.graph() == base
    assert list((vm.workdir / "fleecing").glob("*.qcow2")) == []
    assert snapfs("cleanup", vm.vmid).stderr == ""  # idempotent and quiet
    # The aborted backup's changes and the later ones are all in the next incremental.
    with snapfs.mounted(vm, tmp_path / "m2", "--incremental", "k") as m2:
        regions = sidecar(m2, "virtio0")
        assert covers(regions, 0, G)
        assert covers(regions, 4 * G, G)
    assert vm.graph() == base
    assert [n for n in vm.graph()["nodes"] if "snapfs" in n[0]] == []
    assert graph["devices"] == base["devices"]


def test_next_mount_cleans_up_after_a_killed_session(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    graph = vm.graph()
    mnt = snapfs.mount(vm, tmp_path / "mnt")
    os.kill(serving_pid(snapfs, vm), signal.SIGKILL)
    poll(lambda: stat_in_thread(mnt) is not None, 10, "the mount to die")
    # Same mountpoint: the dead mount there is cleaned up first.
    snapfs(
        "mount",
        vm.vmid,
        str(mnt),
        "--qmp",
        str(vm.qmp_path),
        "--fleecing-dir",
        str(vm.workdir / "fleecing"),
    )
    assert (mnt / "virtio0.raw").stat().st_size == vm.disks["virtio0"].size
    snapfs("umount", vm.vmid)
    assert vm.graph() == graph
    assert "cleaned up after a dead session" in snapfs.log_file.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_abort_cleanly(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path, signum: signal.Signals
) -> None:
    with snapfs.mounted(vm, tmp_path / "m0", "--incremental", "s", commit=True):
        pass
    base = vm.graph()
    vm.guest_write("scsi0", 8 * G, G, 3)
    mnt = snapfs.mount(vm, tmp_path / "m1", "--incremental", "s")
    pid = serving_pid(snapfs, vm)
    os.kill(pid, signum)
    poll(lambda: not Path(f"/proc/{pid}").exists(), 20, "the serving process to exit")
    assert not kernel.is_mounted(mnt)
    assert vm.graph() == base
    assert not (snapfs.run_dir / ".state" / vm.vmid).exists()
    with snapfs.mounted(vm, tmp_path / "m2", "--incremental", "s") as m2:
        assert covers(sidecar(m2, "scsi0"), 8 * G, G)  # aborted: still to be backed up


def test_qemu_dies_while_a_copy_reads(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    mnt = snapfs.mount(vm, tmp_path / "mnt")
    errors: list[tuple[float, OSError]] = []
    stop = threading.Event()

    def copy_loop() -> None:
        fd = os.open(mnt / "virtio0.raw", os.O_RDONLY)
        try:
            off = 0
            while not stop.is_set():
                try:
                    os.pread(fd, MiB, off)
                except OSError as err:
                    errors.append((time.monotonic(), err))
                    return
                off = (off + MiB) % vm.disks["virtio0"].size
        finally:
            os.close(fd)

    reader = threading.Thread(target=copy_loop, daemon=True)
    reader.start()
    try:
        killed_at = time.monotonic()
        vm.stop(kill=True)
        reader.join(10)
        assert not reader.is_alive(), "the reader hung after QEMU died"
    finally:
        stop.set()
    assert errors
    when, err = errors[0]
    assert err.errno == errno.EIO
    assert when - killed_at < 5
    # The mount stays answerable and says why.
    facts = json.loads((mnt / "snapfs.json").read_text())
    assert "went away" in facts["broken"]
    proc = snapfs("umount", str(mnt), check=False)
    assert proc.returncode == 4  # the VM went away (QMPError)
    assert "went away" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not kernel.is_mounted(mnt)
    assert list((vm.workdir / "fleecing").glob("*.qcow2")) == []
    assert not (snapfs.run_dir / ".state" / vm.vmid).exists()


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "snapfs-test", str(path)],
        check=True,
    )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_fleecing_storage_breaks_the_snapshot_not_the_guest(
    snapfs: Snapfs, tmp_path: Path
) -> None:
    # The file system exists before QEMU starts: a QEMU in a chroot of its own (make
    # test-qemu10) sees only the mounts of its start where the host's are not shared.
    with (
        small_tmpfs(tmp_path / "small", "1m") as small,
        TestVM(
            tmp_path,
            [
                DiskSpec("virtio0", "qcow2", "virtio"),
                DiskSpec("scsi0", "raw", "scsi", size=24 << 20),
            ],
        ) as vm,
    ):
        graph = vm.graph()
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        snapfs("mount", vm.vmid, str(mnt), "--qmp", str(vm.qmp_path), "--fleecing-dir", str(small))
        try:
            for off in range(0, 8 * MiB, G):  # far more old data than 1 MiB can hold
                vm.guest_write("virtio0", off, G, 0x66)
            assert vm.io_errors() == []
            with pytest.raises(OSError, match="Input/output error") as e:
                (mnt / "virtio0.raw").read_bytes()
            assert e.value.errno == errno.EIO
            facts = json.loads((mnt / "snapfs.json").read_text())
            assert "snapshot broke" in facts["broken"]
            proc = snapfs("umount", str(mnt), "--commit", check=False)
            assert proc.returncode != 0
            assert "nothing was committed" in proc.stderr
        finally:
            if kernel.is_mounted(mnt):
                snapfs("umount", str(mnt), check=False)
        assert not kernel.is_mounted(mnt)
        assert list(small.iterdir()) == []
        assert vm.graph() == graph
        vm.stop()
        assert vm.image_content("virtio0") == vm.expected["virtio0"]


def test_heavy_guest_writes_during_mount_copy_umount(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    stop = threading.Event()
    written = [0]

    def writer() -> None:
        rng = random.Random(9)
        while not stop.is_set():
            name = rng.choice(sorted(vm.disks))
            off = rng.randrange(0, vm.disks[name].size // G) * G
            vm.guest_write(name, off, G, rng.randrange(256))
            written[0] += 1

    dest = tmp_path / "backup"
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    try:
        for i in range(2):
            mnt = snapfs.mount(vm, tmp_path / f"m{i}", "--incremental", "w")
            snapfs("copy", str(mnt), str(dest))
            snapfs("umount", str(mnt), "--commit")
    finally:
        stop.set()
        t.join(30)
    assert written[0] > 50
    assert vm.io_errors() == []
    # With the writes stopped, one more incremental brings the backup to the disk exactly:
    # no write of the racing rounds was lost.
    final = vm.snapshot()
    with snapfs.mounted(vm, tmp_path / "m2", "--incremental", "w", commit=True) as mnt:
        snapfs("copy", str(mnt), str(dest))
    for name, data in final.items():
        assert (dest / f"{name}.raw").read_bytes() == data, name


def test_two_vms_at_once(tmp_path: Path, snapfs: Snapfs) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        TestVM(tmp_path / "a", [DiskSpec("virtio0", size=8 * MiB)]) as a,
        TestVM(tmp_path / "b", [DiskSpec("scsi0", "raw", "scsi", size=8 * MiB)]) as b,
    ):
        ga, gb = a.graph(), b.graph()
        with snapfs.mounted(a, tmp_path / "ma") as ma, snapfs.mounted(b, tmp_path / "mb") as mb:
            snapfs("umount", str(ma))
            assert a.graph() == ga
            assert (mb / "scsi0.raw").read_bytes() == b.expected["scsi0"]
        assert b.graph() == gb


# -- hostile and bad input -------------------------------------------------------------------


def refused(snapfs: Snapfs, *args: str, words: str) -> None:
    start = time.monotonic()
    proc = snapfs(*args, check=False, timeout=30)
    assert time.monotonic() - start < 20, args
    assert proc.returncode != 0, args
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, (args, proc.stderr)
    assert words in lines[0], (args, lines[0])


def test_hostile_cli_input(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    graph = vm.graph()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    q = ["--qmp", str(vm.qmp_path)]
    for bad in ["abc", "0", "-1", "1e3", "99999999999999999999999999", "100\n", "../100", ""]:
        refused(snapfs, "mount", bad, str(mnt), *q, words="VMID")
    refused(snapfs, "mount", vm.vmid, f"{mnt}/../mnt", *q, words="'..'")
    refused(snapfs, "mount", vm.vmid, f"{mnt}\nx", *q, words="newline")
    # Relative paths are taken from the working directory (tests/test_hardening.py).
    refused(snapfs, "mount", vm.vmid, "no/such/mnt", *q, words=f"{os.getcwd()}/no/such/mnt")
    refused(snapfs, "mount", vm.vmid, str(tmp_path / "no" / "dir"), *q, words="does not exist")
    refused(snapfs, "mount", vm.vmid, str(mnt), "--qmp", "no.qmp", words="does not exist")
    (tmp_path / "file").touch()
    fl = ["--fleecing-dir", str(tmp_path / "file")]
    refused(snapfs, "mount", vm.vmid, str(mnt), *q, *fl, words="not a directory")
    refused(snapfs, "mount", vm.vmid, str(mnt), *q, "--fleecing-dir", "/x/../y", words="'..'")
    refused(snapfs, "mount", vm.vmid, str(mnt), *q, "--incremental", "a/b", words="incremental ID")
    refused(snapfs, "mount", vm.vmid, str(mnt), *q, "-o", "rw", words="mount option")
    refused(snapfs, "mount", vm.vmid, str(mnt), "--qmp", str(tmp_path), words="not a socket")
    refused(snapfs, "umount", "/nonexistent", words="no snapfs session")
    refused(snapfs, "cleanup", "x1", words="VMID")
    # A plain unix socket that sends garbage, or nothing at all.
    for greeting in (b"garbage\n", None):
        path = tmp_path / f"fake{greeting is None}.sock"
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(str(path))
        srv.listen(4)
        stop = threading.Event()

        def serve(
            srv: socket.socket = srv,
            greeting: bytes | None = greeting,
            stop: threading.Event = stop,
        ) -> None:
            srv.settimeout(0.2)
            conns = []
            while not stop.is_set():
                try:
                    c, _ = srv.accept()
                except TimeoutError:
                    continue
                conns.append(c)
                if greeting:
                    c.sendall(greeting)
            for c in conns:
                c.close()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            refused(snapfs, "mount", vm.vmid, str(mnt), "--qmp", str(path), words="QEMU")
        finally:
            stop.set()
            t.join(5)
            srv.close()
    assert vm.graph() == graph
    assert list(mnt.iterdir()) == []
    # A mountpoint on top of another snapfs mount.
    with snapfs.mounted(vm, tmp_path / "first") as first:
        other = TestVM(tmp_path / "other", [DiskSpec("virtio0", size=4 * MiB)])
        (tmp_path / "other").mkdir()
        with other:
            refused(
                snapfs,
                "mount",
                other.vmid,
                str(first),
                "--qmp",
                str(other.qmp_path),
                words="already a mount point",
            )


# -- security ----------------------------------------------------------------------------------


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", *cmd], capture_output=True, text=True, timeout=20
    )


def listening_tcp() -> set[str]:
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in list(f)[1:]:
                fields = line.split()
                if fields[3] == "0A":  # LISTEN
                    out.add(f"{table}:{fields[1]}:{fields[9]}")
    return out


def test_nothing_is_readable_by_other_users(vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> None:
    tcp_before = listening_tcp()
    # nobody must be able to reach the paths' parents to show that snapfs's own modes refuse.
    os.chmod(tmp_path, 0o755)
    with snapfs.mounted(vm, tmp_path / "mnt") as mnt:
        sdir = snapfs.run_dir / ".state" / vm.vmid
        os.chmod(snapfs.run_dir, 0o755)
        os.chmod(sdir.parent, 0o755)
        fleece = next((vm.workdir / "fleecing").glob("*.qcow2"))
        os.chmod(fleece.parent, 0o755)
        assert os.stat(sdir).st_mode & 0o777 == 0o700
        assert os.stat(sdir / "state.json").st_mode & 0o777 == 0o600
        assert os.stat(fleece).st_mode & 0o777 == 0o600
        for target in (mnt, mnt / "virtio0.raw", mnt / "snapfs.json", sdir / "state.json", fleece):
            proc = as_nobody("cat", str(target))
            assert proc.returncode != 0, target
            assert "Permission denied" in proc.stderr, (target, proc.stderr)
        proc = as_nobody("ls", str(mnt))
        assert "Permission denied" in proc.stderr
        nbd = str(sdir / "nbd.sock")
        proc = as_nobody(
            "python3", "-c", f"import socket; s = socket.socket(socket.AF_UNIX); s.connect({nbd!r})"
        )
        assert "Permission denied" in proc.stderr
        # The export is reachable only through that socket: no TCP listener appeared.
        assert listening_tcp() == tcp_before
        pid = serving_pid(snapfs, vm)
        inodes = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        tcp_inodes = {f"socket:[{entry.rsplit(':', 1)[1]}]" for entry in listening_tcp()}
        assert not inodes & tcp_inodes
