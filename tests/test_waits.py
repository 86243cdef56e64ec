"""Every wait is bounded, and no command prints a traceback.

A QEMU that greets and then never answers, a QEMU stopped (SIGSTOP) in the middle of the set-up,
a serving process that is stopped or killed while `snapfs umount` waits for it, and QMP replies
of the wrong shape: each must end within seconds in a one-line error that names what did not
answer (or what was malformed) and says whether the VM was restored or is left for
``snapfs cleanup``, which then restores it exactly. A proxy in front of the real QEMU
(``tests/qmp_proxy.py``) stands in for a QEMU that hangs in a command or answers nonsense.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dev.devvm import DiskSpec, TestVM, poll
from tests.conftest import Snapfs, View, covers, sidecar
from tests.qmp_proxy import Hold, QMPProxy, Rewrite

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

MiB = 1 << 20
G = 65536
# Every QMP command's timeout in these tests (SNAPFS_QMP_TIMEOUT): short, yet far above what
# the real QEMU needs for the commands it does answer.
TIMEOUT = "5"
# What the tests allow for a failure that takes a few timeouts; never a tight timing.
BOUND = 30.0


@pytest.fixture
def small_vm(tmp_path: Path) -> Iterator[TestVM]:
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
        with contextlib.suppress(ProcessLookupError, AssertionError):
            os.kill(machine.pid, signal.SIGCONT)
        machine.stop()


@pytest.fixture
def proxy(small_vm: TestVM, tmp_path: Path) -> Iterator[QMPProxy]:
    with QMPProxy(small_vm.qmp_path, tmp_path / "proxy.sock") as p:
        yield p


@pytest.fixture
def view(small_vm: TestVM, snapfs: Snapfs, tmp_path: Path) -> View:
    snapfs.env["SNAPFS_QMP_TIMEOUT"] = TIMEOUT
    v = View(small_vm, snapfs, tmp_path / "mnt", tmp_path / "fleecing")
    v.graph = small_vm.graph()
    v.status = small_vm.qmp("query-status")["status"]
    return v


def error_line(proc: subprocess.CompletedProcess[str] | subprocess.Popen[str], stderr: str) -> str:
    """The one line a failed command printed (and never a traceback)."""
    assert proc.returncode != 0
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("snapfs: error: "), lines[0]
    return lines[0]


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


def cleanup(view: View) -> None:
    """`snapfs cleanup` through the VM's own socket (not the proxy), then all is as before."""
    done = view.snapfs("cleanup", view.vm.vmid, "--qmp", str(view.vm.qmp_path), timeout=60)
    assert "Traceback" not in done.stderr
    view.assert_restored()


# -- QEMU does not answer during the set-up -----------------------------------------------------


@pytest.mark.parametrize(
    ("command", "outcome"),
    [
        ("query-block", "nothing was changed"),
        ("query-named-block-nodes", "nothing was changed"),
        ("blockdev-add", "snapfs cleanup"),
        ("block-export-add", "snapfs cleanup"),
    ],
)
def test_a_command_qemu_never_answers_fails_the_mount(
    view: View, proxy: QMPProxy, command: str, outcome: str
) -> None:
    proxy.hold.append(Hold(command))
    proc, took = timed(view.mount, proxy.path)
    line = error_line(proc, proc.stderr)
    assert took < BOUND, took
    assert f"QEMU did not answer {command} within {TIMEOUT}s" in line, line
    assert f"VM {view.vm.vmid} stopped?" in line, line
    assert outcome in line, line
    assert proc.returncode == 4, line
    if outcome == "nothing was changed":
        view.assert_restored()
    else:
        assert (view.state_dir / "state.json").exists(), "the plan cleanup needs is gone"
        # A cleanup that QEMU does not answer either: one line, and the plan stays.
        proxy.hold = [Hold("query-named-block-nodes")]
        args = ["cleanup", view.vm.vmid, "--qmp", str(proxy.path)]
        proc, took = timed(view.snapfs, *args, check=False)
        line = error_line(proc, proc.stderr)
        assert took < BOUND, took
        assert "QEMU did not answer query-named-block-nodes" in line, line
        assert (view.state_dir / "state.json").exists()
        cleanup(view)


def test_an_unanswered_qmp_capabilities_is_not_a_missing_greeting(
    snapfs: Snapfs, tmp_path: Path
) -> None:
    path = tmp_path / "silent.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    srv.listen(4)
    stop = threading.Event()
    greeting = {
        "QMP": {
            "version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""},
            "capabilities": [],
        }
    }

    def serve() -> None:
        srv.settimeout(0.1)
        conns = []
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            conns.append(c)
            c.sendall(json.dumps(greeting).encode() + b"\r\n")  # and never a reply
        for c in conns:
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        args = ["mount", "4242", str(mnt), "--qmp", str(path)]
        proc, took = timed(snapfs, *args, "--fleecing-dir", str(tmp_path / "fl"), check=False)
    finally:
        stop.set()
        t.join(5)
        srv.close()
    line = error_line(proc, proc.stderr)
    assert took < BOUND, took
    assert "did not answer qmp_capabilities" in line, line
    assert "nothing was changed" in line, line
    assert list(mnt.iterdir()) == []


@pytest.mark.parametrize(
    ("command", "running"),
    [("blockdev-add", False), ("qom-set", True), ("block-export-add", False)],
)
def test_qemu_stopped_during_the_setup_then_cleanup_restores_it(
    view: View, proxy: QMPProxy, command: str, running: bool
) -> None:
    vm = view.vm
    if running:
        vm.qmp("cont")
        view.status = "running"
    stopped = threading.Event()

    def stop_qemu(cmd: str, args: dict[str, Any]) -> None:
        # QEMU gets the command, but stopped: it runs it only once it is resumed.
        if cmd == command and not stopped.is_set():
            stopped.set()
            os.kill(vm.pid, signal.SIGSTOP)

    proxy.on_command = stop_qemu
    try:
        proc, took = timed(view.mount, proxy.path)
        assert stopped.is_set(), proxy.command_names()
        line = error_line(proc, proc.stderr)
        assert took < BOUND, took
        assert f"QEMU did not answer {command} within {TIMEOUT}s" in line, line
        assert f"'snapfs cleanup {vm.vmid}'" in line, line
        assert not os.path.ismount(view.mnt)
        assert (view.state_dir / "state.json").exists(), "the plan cleanup needs is gone"
        # While QEMU is stopped, cleanup cannot do anything, and says so within seconds.
        proc, took = timed(view.snapfs, "cleanup", vm.vmid, "--qmp", str(vm.qmp_path), check=False)
        error_line(proc, proc.stderr)
        assert took < BOUND, took
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    cleanup(view)


def test_qemu_stopped_before_the_nbd_handshake(view: View, proxy: QMPProxy) -> None:
    vm = view.vm
    exported: list[str] = []

    def stop_after_the_last_export(cmd: str) -> None:
        # The QMP set-up is complete: the serving process connects to QEMU's NBD server next.
        if cmd == "block-export-add":
            exported.append(cmd)
            if len(exported) == len(vm.disks):
                os.kill(vm.pid, signal.SIGSTOP)

    proxy.on_reply = stop_after_the_last_export
    try:
        proc, took = timed(view.mount, proxy.path)
        line = error_line(proc, proc.stderr)
        assert took < BOUND, took
        assert "no handshake within 10s (QEMU stopped?)" in line, line
        assert f"'snapfs cleanup {vm.vmid}'" in line, line
        assert proc.returncode == 7, line
        assert not os.path.ismount(view.mnt)
        assert (view.state_dir / "state.json").exists(), "the state cleanup needs is gone"
    finally:
        os.kill(vm.pid, signal.SIGCONT)
    cleanup(view)


# -- the serving process does not answer `snapfs umount` --------------------------------------


@pytest.mark.parametrize("then", ["resume", "kill"])
def test_umount_of_a_stopped_serving_process(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path, then: str
) -> None:
    graph = vm.graph()
    mnt = snapfs.mount(vm, tmp_path / "mnt")
    (pid,) = snapfs.pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        proc, took = timed(snapfs, "umount", str(mnt), check=False)
        line = error_line(proc, proc.stderr)
        assert took < BOUND, took
        assert "does not answer (stopped?)" in line, line
        assert f"snapfs cleanup {vm.vmid}" in line, line
        assert proc.returncode == 3, line
        status, took = timed(snapfs, "status", vm.vmid)
        assert took < BOUND, took
        assert "does not answer" in status.stdout, status.stdout
        assert "Traceback" not in status.stderr
        proc = snapfs("cleanup", vm.vmid, "--qmp", str(vm.qmp_path), check=False)
        assert "is stopped" in error_line(proc, proc.stderr)
        if then == "kill":
            os.kill(pid, signal.SIGKILL)
            poll(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the serving process to die")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    if then == "resume":
        # The request it was stopped with was given up by its client: not acted upon late.
        snapfs("umount", str(mnt))
    else:
        snapfs("cleanup", vm.vmid, "--qmp", str(vm.qmp_path))
    assert not os.path.ismount(mnt)
    assert vm.graph() == graph
    assert not (snapfs.run_dir / ".state" / vm.vmid).exists()


def test_serving_process_killed_during_umount_commit(view: View, proxy: QMPProxy) -> None:
    vm, snapfs = view.vm, view.snapfs
    assert view.mount(proxy.path, "--incremental", "k").returncode == 0
    snapfs("umount", str(view.mnt), "--commit")
    committed = vm.graph()
    vm.guest_write("virtio0", 3 * G, G, 7)
    assert view.mount(proxy.path, "--incremental", "k").returncode == 0
    (pid,) = snapfs.pids()
    hold = Hold("block-export-del")  # the teardown hangs before anything is committed
    proxy.hold.append(hold)
    umount = subprocess.Popen(
        [sys.executable, "-m", "snapfs", "umount", str(view.mnt), "--commit"],
        env=snapfs.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        poll(lambda: hold.hits > 0, 20, "the teardown to reach block-export-del")
        os.kill(pid, signal.SIGKILL)
        _, stderr = umount.communicate(timeout=BOUND)
    finally:
        if umount.poll() is None:
            umount.kill()
            umount.wait()
    line = error_line(umount, stderr)
    assert "died during the teardown" in line, line
    assert f"snapfs cleanup {vm.vmid}" in line, line
    assert umount.returncode == 6, line
    proxy.hold.clear()
    snapfs("cleanup", vm.vmid, "--qmp", str(vm.qmp_path))
    assert vm.graph() == committed
    # Nothing was committed: the next incremental still has the write.
    with snapfs.mounted(vm, view.mnt, "--incremental", "k") as mnt:
        assert covers(sidecar(mnt, "virtio0"), 3 * G, G), sidecar(mnt, "virtio0")
    assert vm.graph() == committed


# -- malformed replies ---------------------------------------------------------------------------


MALFORMED: dict[str, tuple[str, Any]] = {
    "query-block an object": ("query-block", {"not": "a list"}),
    "query-block a string medium": (
        "query-block",
        [{"device": "x", "qdev": "virtio0", "removable": False, "inserted": "yes"}],
    ),
    "query-named-block-nodes a number name": (
        "query-named-block-nodes",
        [{"node-name": 5, "drv": "raw"}],
    ),
    "x-debug-query-block-graph no list": ("x-debug-query-block-graph", {"nodes": "n", "edges": []}),
    "query-block-exports numbers": ("query-block-exports", [1, 2]),
    "query-version a string major": (
        "query-version",
        {"qemu": {"major": "7", "minor": 2, "micro": 0}, "package": ""},
    ),
    "query-status no running": ("query-status", {"status": "running"}),
    "query-status null": ("query-status", None),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_reply_is_an_error_in_words(view: View, proxy: QMPProxy, case: str) -> None:
    command, value = MALFORMED[case]
    rule = Rewrite(command, value)
    proxy.rewrite.append(rule)
    proc, took = timed(view.mount, proxy.path)
    line = error_line(proc, proc.stderr)
    assert rule.hits >= 1
    assert took < BOUND, took
    assert f"malformed reply to {command}: " in line, line
    assert "internal error" not in line, line
    assert proc.returncode == 4, line
    view.assert_restored()


def test_a_malformed_reply_during_teardown_leaves_it_for_cleanup(
    view: View, proxy: QMPProxy
) -> None:
    assert view.mount(proxy.path).returncode == 0
    (pid,) = view.snapfs.pids()
    proxy.rewrite.append(Rewrite("query-named-block-nodes", {"x": 1}))
    proc, took = timed(view.snapfs, "umount", str(view.mnt), check=False)
    line = error_line(proc, proc.stderr)
    assert took < BOUND, took
    assert "malformed reply to query-named-block-nodes: the reply is an object" in line, line
    assert f"snapfs cleanup {view.vm.vmid}" in line, line
    assert not os.path.ismount(view.mnt)
    proxy.rewrite.clear()
    poll(lambda: not os.path.exists(f"/proc/{pid}"), 10, "the serving process to exit")
    cleanup(view)
