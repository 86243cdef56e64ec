"""QMP replies a QEMU of another version might give: a missing command, an unknown error class,
a parameter it does not know, unexpected events, extra fields. A proxy in front of the real QEMU
stands in for that QEMU (see ``tests/qmp_proxy.py``). A refused set-up step must end in a clear
one-line error and a complete rollback; events and extra fields must be ignored."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dev.devvm import DiskSpec, TestVM, poll
from tests.conftest import Snapfs, View
from tests.qmp_proxy import QMPProxy, Refuse, event

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

MiB = 1 << 20


@pytest.fixture
def small_vm(tmp_path: Path) -> Iterator[TestVM]:
    """Two small disks, so a step can fail for the second disk after the first one succeeded."""
    machine = TestVM(
        tmp_path,
        [
            DiskSpec("virtio0", "qcow2", "virtio", size=4 * MiB),
            DiskSpec("scsi0", "raw", "scsi", size=4 * MiB),
        ],
    )
    try:
        yield machine.start()
    finally:
        machine.stop()


@pytest.fixture
def proxy(small_vm: TestVM, tmp_path: Path) -> Iterator[QMPProxy]:
    with QMPProxy(small_vm.qmp_path, tmp_path / "proxy.sock") as p:
        yield p


@pytest.fixture
def view(small_vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> View:
    v = View(small_vm, snapfs, tmp_path / "mnt", tmp_path / "fleecing")
    v.graph = small_vm.graph()
    v.status = small_vm.qmp("query-status")["status"]
    return v


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("snapfs: error: "), lines[0]
    return lines[0]


def driver_is(name: str) -> Any:
    return lambda args: args.get("driver") == name


def drive_set_to(node: str) -> Any:
    return lambda args: args.get("property") == "drive" and args.get("value") == node


# (rule, extra mount arguments, words the error line must contain). QEMU lists scsi0 before
# virtio0, so a step refused for virtio0 fails after it succeeded for scsi0.
SETUP_FAILURES: dict[str, tuple[Refuse, list[str], list[str]]] = {
    # Missing commands (CommandNotFound), at every stage of the set-up.
    "query-block-exports": (Refuse("query-block-exports"), [], ["query-block-exports"]),
    "nbd-server-start": (Refuse("nbd-server-start"), [], ["start NBD server", "nbd-server-start"]),
    "blockdev-add": (Refuse("blockdev-add"), [], ["add fleecing node", "blockdev-add"]),
    "transaction": (
        Refuse("transaction"),
        ["--incremental", "v"],
        ["prepare bitmaps", "transaction"],
    ),
    "qom-set of the second disk": (
        Refuse("qom-set", when=drive_set_to("snapfs-cbw-virtio0")),
        [],
        ["insert filter for virtio0", "qom-set"],
    ),
    "block-export-add": (Refuse("block-export-add"), [], ["add NBD export", "block-export-add"]),
    # Drivers and parameters an older QEMU does not have (its real GenericError texts).
    "no snapshot-access (QEMU < 7.1)": (
        Refuse(
            "blockdev-add",
            "GenericError",
            when=driver_is("snapshot-access"),
            desc="Invalid parameter 'snapshot-access'",
        ),
        [],
        ["add snapshot-access node", "snapshot-access"],
    ),
    "no on-cbw-error (QEMU 7.0)": (
        Refuse(
            "blockdev-add",
            "GenericError",
            when=driver_is("copy-before-write"),
            desc="Parameter 'on-cbw-error' is unexpected",
        ),
        ["--incremental", "v"],
        ["add copy-before-write filter", "on-cbw-error"],
    ),
    # Error classes this QEMU does not know.
    "unknown class on block-export-add": (
        Refuse(
            "block-export-add",
            "SomethingNew",
            when=lambda a: a.get("name") == "virtio0",
            desc="exports need the new thing",
        ),
        [],
        ["add NBD export for virtio0", "exports need the new thing"],
    ),
    "unknown class on qom-set": (
        Refuse(
            "qom-set",
            "SomethingNew",
            when=drive_set_to("snapfs-cbw-scsi0"),
            desc="drive is now immutable",
        ),
        ["--incremental", "v"],
        ["insert filter for scsi0", "drive is now immutable"],
    ),
}


@pytest.mark.parametrize("case", list(SETUP_FAILURES))
def test_a_refused_setup_step_is_rolled_back(view: View, proxy: QMPProxy, case: str) -> None:
    rule, args, words = SETUP_FAILURES[case]
    proxy.refuse.append(rule)
    line = one_line_error(view.mount(proxy.path, *args))
    assert rule.hits == 1, proxy.command_names()
    for word in words:
        assert word in line, line
    view.assert_restored()
    # And nothing stands in the way of the next mount, with the VM's own QEMU.
    proxy.refuse.clear()
    proc = view.mount(proxy.path, *args)
    assert proc.returncode == 0, proc.stderr
    assert view.snapfs("umount", str(view.mnt)).returncode == 0


def future_qemu(proxy: QMPProxy) -> None:
    """Unknown events and known ones about other jobs before every reply, extra fields in it."""
    proxy.events = [
        event("SNAPFS_TEST_FUTURE_EVENT", {"what": ["x", 1]}),
        event("BLOCK_JOB_ERROR", {"device": "other-job", "operation": "write", "action": "report"}),
        event("JOB_STATUS_CHANGE", {"id": "other-job", "status": "running"}),
    ]
    proxy.extra_fields = {"x-future-field": {"nested": [1, 2, {"k": None}]}}


def test_events_and_extra_fields_are_ignored(view: View, proxy: QMPProxy) -> None:
    future_qemu(proxy)
    vm = view.vm
    at_point = vm.snapshot()
    assert view.mount(proxy.path).returncode == 0
    vm.guest_write("virtio0", 0, 65536, 0x5A)
    with open(view.mnt / "virtio0.raw", "rb") as f:
        assert f.read(65536) == at_point["virtio0"][:65536]
    view.snapfs("umount", str(view.mnt))
    view.assert_restored()
    # Incremental: bitmaps are planned from replies that carry extra fields too.
    assert view.mount(proxy.path, "--incremental", "v").returncode == 0
    view.snapfs("umount", str(view.mnt), "--commit")
    view.graph = vm.graph()
    vm.guest_write("scsi0", 3 * 65536, 4096, 0x11)
    at_point = vm.snapshot()
    assert view.mount(proxy.path, "--incremental", "v").returncode == 0
    assert (view.mnt / "scsi0.dirty").read_text() == f"{3 * 65536} 65536\n"
    with open(view.mnt / "scsi0.raw", "rb") as f:
        assert os.pread(f.fileno(), 65536, 3 * 65536) == at_point["scsi0"][3 * 65536 : 4 * 65536]
    view.snapfs("umount", str(view.mnt))
    view.assert_restored()
    assert "SNAPFS_TEST_FUTURE_EVENT" not in view.snapfs.log_file.read_text()


TEARDOWN_FAILURES: dict[str, tuple[Refuse, list[str]]] = {
    "block-export-del": (Refuse("block-export-del"), ["block-export-del"]),
    "nbd-server-stop": (Refuse("nbd-server-stop"), ["nbd-server-stop"]),
    "unknown class on blockdev-del": (
        Refuse(
            "blockdev-del",
            "SomethingNew",
            when=lambda a: a.get("node-name", "").startswith("snapfs-cbw-"),
            desc="nodes are forever",
        ),
        ["nodes are forever"],
    ),
}


@pytest.mark.parametrize("case", list(TEARDOWN_FAILURES))
def test_a_refused_teardown_step_leaves_state_for_cleanup(
    view: View, proxy: QMPProxy, case: str
) -> None:
    rule, words = TEARDOWN_FAILURES[case]
    assert view.mount(proxy.path).returncode == 0
    pid = view.snapfs.pids()[0]
    proxy.refuse.append(rule)
    proc = view.snapfs("umount", str(view.mnt), check=False)
    line = one_line_error(proc)
    assert rule.hits >= 1, proxy.command_names()
    for word in words:
        assert word in line, line
    assert not os.path.ismount(view.mnt)
    assert (view.state_dir / "state.json").exists(), "the state cleanup needs is gone"
    poll(lambda: not os.path.exists(f"/proc/{pid}"), 20, "the serving process to exit")
    # The VM's own QEMU finishes what the other one refused.
    done = view.snapfs("cleanup", view.vm.vmid, "--qmp", str(view.vm.qmp_path))
    assert done.returncode == 0
    view.assert_restored()
