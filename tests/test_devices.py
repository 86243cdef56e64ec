"""Every kind of disk a Proxmox or plain QEMU VM has mounts, reads exactly, and tears down to
the same block graph: UEFI firmware and vars, linked clones, eight disks on four buses,
CD-ROMs with and without media, cache=none with native AIO, throttled disks, disks on I/O
threads.

Real QEMU (run on 7.2 and 10.0), real mounts; the guest writes all the while.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from dev.devvm import DiskSpec, GuestIO, MiB, TestVM, poll
from snapfs.errors import SetupError
from snapfs.qmp import QMP, cleanup_orphans, setup
from snapfs.runner import run_trio
from tests.conftest import Snapfs

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

EFIDISK = 540_672  # Proxmox's efidisk0 (4 MiB OVMF vars): not a multiple of 64 KiB
LIMIT = 10_000_000  # bytes/s of the throttled disk


def machine(tmp_path: Path) -> TestVM:
    disks = [
        DiskSpec("efidisk0", "raw", "pflash", size=EFIDISK),
        DiskSpec("virtio0", "qcow2", "virtio", size=16 * MiB, throttle=LIMIT),
        DiskSpec("virtio1", "raw", "virtio", size=8 * MiB, direct=True),
        DiskSpec("scsi0", "qcow2", "scsi", size=12 * MiB, backing=True),
        DiskSpec("scsi1", "raw", "scsi", size=8 * MiB, detect_zeroes="unmap", direct=True),
        DiskSpec("sata0", "qcow2", "sata", size=8 * MiB, detect_zeroes="on"),
        DiskSpec("sata1", "raw", "sata", size=4 * MiB),
        DiskSpec("ide0", "raw", "ide", size=4 * MiB),
        DiskSpec("ide1", "qcow2", "ide", size=4 * MiB),
    ]
    iso = tmp_path / "install.iso"
    iso.write_bytes(os.urandom(MiB))
    cdroms = [
        "-drive",
        f"if=none,id=drive-ide2,media=cdrom,format=raw,readonly=on,file={iso}",
        "-device",
        "ide-cd,bus=ide.2,drive=drive-ide2,id=ide2",
        "-drive",
        "if=none,id=drive-ide3,media=cdrom",
        "-device",
        "ide-cd,bus=ide.3,drive=drive-ide3,id=ide3",
    ]
    return TestVM(tmp_path, disks, extra_args=cdroms)


def node_info(vm: TestVM, name: str) -> dict[str, Any]:
    (info,) = [n for n in vm.qmp("query-named-block-nodes", flat=True) if n["node-name"] == name]
    return {k: v for k, v in info.items() if k not in ("image", "dirty-bitmaps")}


def file_child(vm: TestVM, node: str) -> str:
    graph = vm.qmp("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    (child,) = [
        names[e["child"]]
        for e in graph["edges"]
        if names.get(e["parent"]) == node and e["name"] == "file"
    ]
    return str(child)


def check_disks(mnt: Path, want: dict[str, bytes]) -> None:
    for name, data in want.items():
        raw = mnt / f"{name}.raw"
        assert raw.stat().st_size == len(data), name
        assert raw.read_bytes() == data, name


def test_every_kind_of_disk(tmp_path: Path, snapfs: Snapfs) -> None:
    vm = machine(tmp_path)
    with vm:
        graph = vm.graph()
        throttle = node_info(vm, "virtio0-thr")
        guest = GuestIO(vm, seed=13)
        with snapfs.mounted(vm, tmp_path / "m0", "--incremental", "n", commit=True) as mnt:
            want = vm.snapshot()
            assert sorted(p.name for p in mnt.glob("*.raw")) == sorted(
                f"{name}.raw" for name in vm.disks
            )
            facts = json.loads((mnt / "snapfs.json").read_text())
            # None of these disks is on an I/O thread: snapfs copy may read QEMU's exports.
            assert session_graph(snapfs, vm)["client_close_aborts"] is False
            # The copy-before-write filter sits below the throttle node: backup reads and
            # old-data copies do not count against the guest's limit.
            nodes = facts["disks"]["virtio0"]["nodes"]
            assert nodes["throttle"] == "virtio0-thr"
            assert nodes["disk"] == "virtio0-fmt"
            assert file_child(vm, "virtio0-thr") == nodes["cbw"]
            assert facts["disks"]["efidisk0"]["size"] == EFIDISK
            with guest.storm():
                check_disks(mnt, want)
            # The last, partial cluster of the vars drive.
            vm.guest_write("efidisk0", EFIDISK - 100, 100, 0x44)
            check_disks(mnt, want)
        assert_same_graph(vm, graph, throttle)

        # An incremental view of all of them.
        guest.run(60)
        vm.guest_write("efidisk0", EFIDISK - 4096, 4096, 0x45)
        with snapfs.mounted(vm, tmp_path / "m1", "--incremental", "n", commit=True) as mnt:
            want = vm.snapshot()
            facts = json.loads((mnt / "snapfs.json").read_text())
            assert {d["bitmap"]["mode"] for d in facts["disks"].values()} == {"reuse"}
            with guest.storm():
                for name, data in want.items():
                    fd = os.open(mnt / f"{name}.raw", os.O_RDONLY)
                    try:
                        lines = (mnt / f"{name}.dirty").read_text().splitlines()
                        for line in lines:
                            off, length = (int(x) for x in line.split())
                            assert os.pread(fd, length, off) == data[off : off + length], name
                    finally:
                        os.close(fd)
            off, length = map(int, (mnt / "efidisk0.dirty").read_text().split()[-2:])
            assert off + length == EFIDISK
        assert_same_graph(vm, graph, throttle)
        assert not vm.io_errors()
    for name in vm.disks:
        assert vm.image_content(name) == vm.expected[name], name


def test_a_killed_session_of_disks_on_io_threads_leaves_the_vm_running(
    tmp_path: Path, snapfs: Snapfs
) -> None:
    """Before 9.0 QEMU aborts when a client of an export on an I/O thread disconnects first,
    so it keeps a descriptor of each of the session's NBD connections: a serving process
    killed with SIGKILL leaves the VM running, and ``snapfs cleanup`` restores the graph and
    lets the connections go."""
    disks = [
        DiskSpec("scsi0", "qcow2", "scsi", size=4 * MiB, iothread=True),
        DiskSpec("virtio0", "raw", "virtio", size=4 * MiB, iothread=True),
    ]
    vm = TestVM(tmp_path, disks)
    with vm:
        assert vm.proc is not None
        qemu_fds = f"/proc/{vm.proc.pid}/fd"
        graph, fds = vm.graph(), len(os.listdir(qemu_fds))
        version = tuple(int(x) for x in vm.qemu_version().split(".")[:2])
        mnt = snapfs.mount(vm, tmp_path / "mnt")
        try:
            want = vm.snapshot()
            held = session_graph(snapfs, vm)["held_fds"]
            # Per disk: the libnbd connection, the splice path's and the compiled path's.
            assert len(held) == (3 * len(disks) if version < (9, 0) else 0)
            assert len(os.listdir(qemu_fds)) >= fds + len(held)
            # The zero writes go to the virtio disk (see test_disks_on_io_threads).
            with GuestIO(vm, 4, ["virtio0"]).storm():
                check_disks(mnt, want)
            (pid,) = snapfs.pids()
            os.kill(pid, signal.SIGKILL)
            poll(lambda: not _running(pid), what="the serving process to die")
            # The VM lives on, and its disks still take writes.
            GuestIO(vm, 5, kinds=("write", "small", "discard")).run(20)
            assert vm.qmp("query-status")["status"] == "prelaunch"
        finally:
            if any(_running(p) for p in snapfs.pids()):
                snapfs("umount", str(mnt))
            else:
                snapfs("cleanup", vm.vmid)
        assert vm.proc.poll() is None
        now = vm.graph()
        for key in ("devices", "nodes", "exports"):
            assert now[key] == graph[key], key
        poll(lambda: len(os.listdir(qemu_fds)) == fds, what="QEMU to let the connections go")
        assert not vm.io_errors()
    for name in vm.disks:
        assert vm.image_content(name) == vm.expected[name], name


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def session_graph(snapfs: Snapfs, vm: TestVM) -> dict[str, Any]:
    """The mounted session's graph, as its state file has it."""
    record = json.loads((snapfs.run_dir / ".state" / vm.vmid / "state.json").read_text())
    graph: dict[str, Any] = record["graph"]
    return graph


def assert_same_graph(vm: TestVM, graph: dict[str, Any], throttle: dict[str, Any]) -> None:
    now = vm.graph()
    for key in ("devices", "nodes", "exports"):
        assert now[key] == graph[key], key
    assert node_info(vm, "virtio0-thr") == throttle
    assert file_child(vm, "virtio0-thr") == "virtio0-fmt"


def test_disks_on_io_threads(tmp_path: Path, snapfs: Snapfs) -> None:
    """Disks served by I/O threads of their own (Proxmox's ``iothread=1``, a virtio-scsi
    controller per disk as its "VirtIO SCSI single" makes): a full view reads the snapshot
    while the guest writes, zeroes and discards, copies with discard and an incremental
    reproduce each snapshot, and the block graph is as it was after each umount."""
    disks = [
        DiskSpec("virtio0", "qcow2", "virtio", size=8 * MiB, detect_zeroes="unmap", iothread=True),
        DiskSpec("virtio1", "raw", "virtio", size=6 * MiB, throttle=LIMIT, iothread=True),
        DiskSpec("scsi0", "qcow2", "scsi", size=8 * MiB, detect_zeroes="on", iothread=True),
        DiskSpec("scsi1", "raw", "scsi", size=4 * MiB, direct=True, iothread=True),
    ]
    vm = TestVM(tmp_path, disks)
    dest = tmp_path / "backup"
    with vm:
        iothreads = {t["id"] for t in vm.qmp("query-iothreads")}
        assert iothreads == {
            f"iothread-{n}" for n in ("virtio0", "virtio1", "virtioscsi0", "virtioscsi1")
        }
        graph = vm.graph()
        version = tuple(int(x) for x in vm.qemu_version().split(".")[:2])
        # QEMU before 8.0 aborts on HMP qemu-io's zero writes to a scsi disk on an I/O thread
        # (how this test writes, not how a guest does): there its scsi disks get data and
        # discards only.
        guests = [
            GuestIO(vm, 17, ["virtio0", "virtio1"]),
            GuestIO(
                vm,
                18,
                ["scsi0", "scsi1"],
                kinds=("write", "small", "discard") if version < (8, 0) else None,
            ),
        ]
        # Before 9.0 QEMU aborts when a client of these disks' exports disconnects first:
        # only QEMU closes the session's connections, and the copies read through the view.
        aborts = version < (9, 0)
        for run in range(3):  # a full backup, then incrementals
            for guest in guests:
                guest.run(30)
            with snapfs.mounted(vm, tmp_path / f"m{run}", "--incremental", "t", commit=True) as mnt:
                want = vm.snapshot()
                assert session_graph(snapfs, vm)["client_close_aborts"] is aborts
                with guests[0].storm(), guests[1].storm():
                    if run == 0:
                        check_disks(mnt, want)
                    snapfs("copy", str(mnt), str(dest), "--discard")
            for name, data in want.items():
                assert (dest / f"{name}.raw").read_bytes() == data, (run, name)
            now = vm.graph()
            for key in ("devices", "nodes", "exports"):
                assert now[key] == graph[key], (run, key)
        assert {t["id"] for t in vm.qmp("query-iothreads")} == iothreads
        assert not vm.io_errors()
    through_view = snapfs.log_file.read_text().count("reading through the view: QEMU")
    assert through_view == (3 if aborts else 0)
    for name in vm.disks:
        assert vm.image_content(name) == vm.expected[name], name


def test_the_skipped_devices_are_named(tmp_path: Path, snapfs: Snapfs) -> None:
    """Firmware code and CD-ROMs are not VM data: left out, and said why."""
    vm = machine(tmp_path)
    with vm, snapfs.mounted(vm, tmp_path / "mnt") as mnt:
        log = snapfs.log_file.read_text()
        assert "skipping pflash0: firmware code (read-only pflash)" in log
        assert "skipping ide2: read-only removable medium" in log
        assert "skipping ide3: no medium (empty drive)" in log
        assert not (mnt / "pflash0.raw").exists()


def throttled(tmp_path: Path) -> TestVM:
    return TestVM(tmp_path, [DiskSpec("virtio0", "qcow2", "virtio", size=8 * MiB, throttle=LIMIT)])


def test_a_throttled_disk_is_restored_after_a_crash(tmp_path: Path, snapfs: Snapfs) -> None:
    """A serving process killed mid-session: `snapfs cleanup` puts the throttle node back on
    its own child; so does the next mount's clean-up of a set-up killed before its state
    file (found from QEMU's graph alone)."""
    vm = throttled(tmp_path)
    with vm:
        graph = vm.graph()
        throttle = node_info(vm, "virtio0-thr")
        snapfs.mount(vm, tmp_path / "m0")
        (pid,) = snapfs.pids()
        os.kill(pid, signal.SIGKILL)
        snapfs("cleanup", vm.vmid)
        assert_same_graph(vm, graph, throttle)

        async def orphaned() -> list[str]:
            async with QMP.connect(vm.qmp_path) as q:
                await setup(
                    q, vmid=vm.vmid, fleecing_dir=tmp_path / "fl", nbd_socket=tmp_path / "nbd.sock"
                )
                return await cleanup_orphans(q)

        assert any("virtio0-thr" in line for line in run_trio(orphaned))
        assert_same_graph(vm, graph, throttle)


def test_a_failed_set_up_restores_a_throttled_disk(tmp_path: Path) -> None:
    vm = throttled(tmp_path)
    with vm:
        graph = vm.graph()
        throttle = node_info(vm, "virtio0-thr")

        def fail(step: str, disk: str | None) -> None:
            if step == "add NBD export":
                raise RuntimeError("injected")

        async def go() -> None:
            async with QMP.connect(vm.qmp_path) as q:
                await setup(
                    q,
                    vmid=vm.vmid,
                    fleecing_dir=tmp_path / "fl",
                    nbd_socket=tmp_path / "nbd.sock",
                    on_step=fail,
                )

        with pytest.raises(SetupError, match="add NBD export for virtio0: injected"):
            run_trio(go)
        assert_same_graph(vm, graph, throttle)
