"""snapfs.qmp against a real, paused QEMU (dev/devvm.py); each test runs trio under
trio-asyncio."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from dev.devvm import QEMU_IMG, DiskSpec, TestVM, running_vm, which_all
from snapfs.errors import (
    QMPError,
    SetupError,
    StateError,
    TeardownError,
    UsageError,
    VMGoneError,
)
from snapfs.qmp import QMP, GraphState, list_disks, setup, teardown
from snapfs.qmp import cleanup_orphans as cleanup_orphans_
from snapfs.runner import run_trio

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.skipif(not which_all("qemu-system-x86_64", "qemu-img"), reason="needs QEMU"),
]

T = TypeVar("T")
KiB = 1024
CDROM = [
    "-drive",
    "if=none,id=drive-ide2,media=cdrom",
    "-device",
    "ide-cd,drive=drive-ide2,id=ide2",
]


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run ``fn`` as snapfs's CLI does: trio with an asyncio loop, errors out of their groups."""
    result: T = run_trio(fn)
    return result


def two_disks() -> list[DiskSpec]:
    return [DiskSpec("virtio0", "qcow2", "virtio"), DiskSpec("scsi0", "raw", "scsi")]


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[TestVM]:
    with running_vm(tmp_path, two_disks(), extra_args=CDROM) as v:
        yield v


def do_setup(vm: TestVM, tmp_path: Path, **kw: Any) -> GraphState:
    async def go() -> GraphState:
        async with QMP.connect(vm.qmp_path) as q:
            return await setup(
                q,
                vmid="100",
                fleecing_dir=tmp_path / "fleece",
                nbd_socket=tmp_path / "nbd.sock",
                **kw,
            )

    return run(go)


def do_teardown(vm: TestVM, state: GraphState, *, commit: bool) -> None:
    async def go() -> None:
        async with QMP.connect(vm.qmp_path) as q:
            await teardown(q, state, commit=commit)

    run(go)


def bitmaps_on(vm: TestVM, state: GraphState) -> dict[tuple[str, str], dict[str, Any]]:
    """(disk, bitmap name) -> info, on each disk's original node (where snapfs keeps them)."""
    nodes = {n["node-name"]: n for n in vm.qmp("query-named-block-nodes", flat=True)}
    return {
        (d.name, b["name"]): b
        for d in state.disks
        for b in nodes[d.node].get("dirty-bitmaps", [])
        if "name" in b
    }


def fleecing_actual(path: str) -> int:
    out = subprocess.run(
        [QEMU_IMG, "info", "-U", "--output=json", path], check=True, capture_output=True
    ).stdout
    size: int = json.loads(out)["actual-size"]
    return size


# -- 1. set-up and teardown ---------------------------------------------------------------------


def test_setup_teardown_roundtrip(vm: TestVM, tmp_path: Path) -> None:
    before = vm.graph()
    for _cycle in range(2):
        state = do_setup(vm, tmp_path)
        assert sorted(d.name for d in state.disks) == ["scsi0", "virtio0"]
        assert state.skipped == {"ide2": "no medium (empty drive)"}
        assert state.pause_ms is None  # the VM was paused (-S): never resumed
        assert vm.qmp("query-status")["status"] == "prelaunch"
        assert state.qemu_version.startswith(vm.qemu_version())
        nodes = {n["node-name"]: n["drv"] for n in vm.qmp("query-named-block-nodes", flat=True)}
        exports = {e["id"]: e["node-name"] for e in vm.qmp("query-block-exports")}
        devices = {
            b.get("qdev"): b["inserted"]["node-name"]
            for b in vm.qmp("query-block")
            if "inserted" in b
        }
        for d in state.disks:
            for node in (d.fleecing_node, d.cbw_node, d.access_node, d.export_id):
                assert node.startswith("snapfs-")
            assert nodes[d.fleecing_node] == "qcow2"
            assert nodes[d.cbw_node] == "copy-before-write"
            assert nodes[d.access_node] == "snapshot-access"
            assert exports[d.export_id] == d.access_node
            assert Path(d.fleecing_path).stat().st_mode & 0o777 == 0o600
        assert devices["scsi0"] == "snapfs-cbw-scsi0"
        assert devices["/machine/peripheral/virtio0/virtio-backend"] == "snapfs-cbw-virtio0"
        # The state survives a trip through JSON (another process tears down).
        copy = GraphState.from_dict(json.loads(json.dumps(state.to_dict())))
        assert copy == state
        assert abs(copy.snapshot_epoch - time.time()) < 60
        assert all(d.export_bitmap is None for d in copy.disks)
        state = copy
        do_teardown(vm, state, commit=False)
        assert vm.graph() == before
        assert not any(Path(d.fleecing_path).exists() for d in state.disks)
        # Idempotent: a second teardown is quiet.
        do_teardown(vm, state, commit=False)


def test_list_disks_skips_empty_cdrom(vm: TestVM) -> None:
    async def go() -> list[str]:
        async with QMP.connect(vm.qmp_path) as q:
            return [d.name for d in await list_disks(q)]

    assert sorted(run(go)) == ["scsi0", "virtio0"]


def test_running_vm_is_paused_briefly_and_resumed(vm: TestVM, tmp_path: Path) -> None:
    vm.qmp("cont")
    before = vm.graph()
    state = do_setup(vm, tmp_path)
    assert state.pause_ms is not None
    assert 0 < state.pause_ms < 1000
    assert vm.qmp("query-status")["status"] == "running"
    do_teardown(vm, state, commit=False)
    assert vm.graph() == before
    assert vm.qmp("query-status")["status"] == "running"


def test_exclude(vm: TestVM, tmp_path: Path) -> None:
    before = vm.graph()
    with pytest.raises(UsageError, match="nosuch"):
        do_setup(vm, tmp_path, exclude=["nosuch"])
    state = do_setup(vm, tmp_path, exclude=["scsi0"])
    assert [d.name for d in state.disks] == ["virtio0"]
    do_teardown(vm, state, commit=False)
    assert vm.graph() == before


def test_second_session_refused(vm: TestVM, tmp_path: Path) -> None:
    state = do_setup(vm, tmp_path)
    with pytest.raises(StateError, match="already active on VM 100"):
        do_setup(vm, tmp_path / "other")
    do_teardown(vm, state, commit=False)


def test_teardown_reports_what_it_cannot_restore(vm: TestVM, tmp_path: Path) -> None:
    """Every step is tried; what is left is listed; a later teardown finishes the job."""
    before = vm.graph()
    state = do_setup(vm, tmp_path)
    # Someone else uses virtio0's fleecing node: it cannot be deleted.
    vm.qmp("blockdev-add", driver="raw", file="snapfs-fl-virtio0", **{"node-name": "intruder"})
    with pytest.raises(TeardownError, match="delete snapfs-fl-virtio0") as exc:
        do_teardown(vm, state, commit=False)
    assert "scsi0" not in str(exc.value)
    devices = {
        b.get("qdev"): b["inserted"]["node-name"] for b in vm.qmp("query-block") if "inserted" in b
    }
    assert devices["scsi0"] != "snapfs-cbw-scsi0"  # the rest was restored
    assert devices["/machine/peripheral/virtio0/virtio-backend"] == "virtio0-fmt"
    fleecing = {d.name: Path(d.fleecing_path) for d in state.disks}
    assert fleecing["virtio0"].exists()  # still open in QEMU: kept
    assert not fleecing["scsi0"].exists()
    vm.qmp("blockdev-del", **{"node-name": "intruder"})
    do_teardown(vm, state, commit=False)
    assert vm.graph() == before


def test_cleanup_orphans(vm: TestVM, tmp_path: Path) -> None:
    before = vm.graph()
    state = do_setup(vm, tmp_path, incremental="t1")

    async def go() -> list[str]:
        async with QMP.connect(vm.qmp_path) as q:
            return await cleanup_orphans_(q)

    assert run(go)
    assert vm.graph() == before
    assert not any(Path(d.fleecing_path).exists() for d in state.disks)


# -- 2. the filter is live --------------------------------------------------------------------


def test_guest_write_lands_in_fleecing_image(vm: TestVM, tmp_path: Path) -> None:
    state = do_setup(vm, tmp_path)
    for d in state.disks:
        size0 = fleecing_actual(d.fleecing_path)
        vm.guest_write(d.name, 1024 * KiB, 1024 * KiB, 0x5A)
        assert fleecing_actual(d.fleecing_path) >= size0 + 1024 * KiB, d.name
    assert not vm.io_errors()
    do_teardown(vm, state, commit=False)


# -- 3. rollback --------------------------------------------------------------------------------


def test_existing_nbd_server_refused(vm: TestVM, tmp_path: Path) -> None:
    vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "o.sock")}})
    before = vm.graph()
    with pytest.raises(StateError, match="NBD server is already running"):
        do_setup(vm, tmp_path)
    assert vm.graph() == before
    assert not (tmp_path / "fleece").exists()


def test_unwritable_fleecing_dir(vm: TestVM, tmp_path: Path) -> None:
    before = vm.graph()
    (tmp_path / "file").write_text("")

    async def go() -> None:
        async with QMP.connect(vm.qmp_path) as q:
            await setup(
                q,
                vmid="100",
                fleecing_dir=tmp_path / "file" / "fleece",
                nbd_socket=tmp_path / "nbd.sock",
            )

    with pytest.raises(SetupError, match=r"create fleecing directory: .*file is not a directory"):
        run(go)
    assert vm.graph() == before
    # The NBD server was stopped again: a new one can start.
    vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(tmp_path / "o.sock")}})


@pytest.mark.parametrize(
    "at",
    [
        "add fleecing node",
        "add copied bitmap",
        "prepare bitmaps",
        "add copy-before-write filter",
        "insert filter",
        "add snapshot-access node",
        "add NBD export",
    ],
)
def test_qemu_failure_midway_rolls_back(vm: TestVM, tmp_path: Path, at: str) -> None:
    """QEMU refuses a step (for scsi0 where there is one): rollback restores the graph.

    The fault is injected through snapfs's own monitor from ``on_step``, just before the step.
    """
    major, minor = (int(x) for x in vm.qemu_version().split(".")[:2])
    if at == "add copied bitmap" and (major, minor) >= (8, 0):
        pytest.skip("QEMU 8.0 and later need no copied bitmap")
    before = vm.graph()
    inject: dict[str, tuple[str, dict[str, Any]]] = {
        "add fleecing node": (
            "blockdev-add",
            {"driver": "null-co", "node-name": "snapfs-fl-scsi0"},
        ),
        # The same name already on the fleecing node.
        "add copied bitmap": (
            "block-dirty-bitmap-add",
            {"node": "snapfs-fl-scsi0", "name": "snapfs--copied"},
        ),
        "prepare bitmaps": (
            "block-dirty-bitmap-add",
            {"node": "virtio0-fmt", "name": "snapfs-t1-next"},
        ),
        "add copy-before-write filter": (
            "blockdev-add",
            {"driver": "null-co", "node-name": "snapfs-cbw-scsi0"},
        ),
        # qom-set then finds no node to switch to.
        "insert filter": ("blockdev-del", {"node-name": "snapfs-cbw-scsi0"}),
        "add snapshot-access node": (
            "blockdev-add",
            {"driver": "null-co", "node-name": "snapfs-acc-scsi0"},
        ),
        # The export then has no server.
        "add NBD export": ("nbd-server-stop", {}),
    }
    undo_injection = {
        "add fleecing node": ("blockdev-del", {"node-name": "snapfs-fl-scsi0"}),
        "prepare bitmaps": (
            "block-dirty-bitmap-remove",
            {"node": "virtio0-fmt", "name": "snapfs-t1-next"},
        ),
        "add copy-before-write filter": ("blockdev-del", {"node-name": "snapfs-cbw-scsi0"}),
        "add snapshot-access node": ("blockdev-del", {"node-name": "snapfs-acc-scsi0"}),
    }
    injected: list[str] = []

    async def go() -> None:
        async with QMP.connect(vm.qmp_path) as q:

            async def on_step(step: str, disk: str | None) -> None:
                if step == at and disk in ("scsi0", None) and not injected:
                    cmd, args = inject[at]
                    await q.execute(cmd, args)
                    injected.append(step)

            try:
                await setup(
                    q,
                    vmid="100",
                    fleecing_dir=tmp_path / "fleece",
                    nbd_socket=tmp_path / "nbd.sock",
                    incremental="t1",
                    on_step=on_step,
                )
            finally:
                if at in undo_injection:
                    cmd, args = undo_injection[at]
                    await q.execute(cmd, args)

    with pytest.raises(SetupError, match=f"^{at}") as exc:
        run(go)
    assert injected
    if at != "prepare bitmaps":
        assert "for scsi0: " in str(exc.value)
    assert vm.graph() == before
    assert list((tmp_path / "fleece").glob("snapfs-*")) == []


def test_cancelled_setup_rolls_back(vm: TestVM, tmp_path: Path) -> None:
    before = vm.graph()

    async def go() -> None:
        async with QMP.connect(vm.qmp_path) as q:
            with trio.CancelScope() as scope:

                def on_step(step: str, disk: str | None) -> None:
                    if step == "add snapshot-access node":
                        scope.cancel()

                await setup(
                    q,
                    vmid="100",
                    fleecing_dir=tmp_path / "fleece",
                    nbd_socket=tmp_path / "nbd.sock",
                    on_step=on_step,
                )
            assert scope.cancelled_caught

    run(go)
    assert vm.graph() == before


# -- 4. incremental bitmaps ---------------------------------------------------------------------


def modes(state: GraphState) -> dict[str, str]:
    return {d.name: d.bitmap.mode for d in state.disks}


def test_bitmaps_new_reuse_commit_abort(vm: TestVM, tmp_path: Path) -> None:
    n = "snapfs-t1"
    state = do_setup(vm, tmp_path, incremental="t1")
    assert modes(state) == {"virtio0": "new", "scsi0": "new"}
    assert all("no bitmap" in d.bitmap.reason for d in state.disks)
    vm.guest_write("virtio0", 0, 64 * KiB, 1)  # after the snapshot point: next round
    do_teardown(vm, state, commit=True)
    bm = bitmaps_on(vm, state)
    assert bm[("virtio0", n)]["count"] == 64 * KiB
    assert bm[("virtio0", n)]["persistent"] is True
    assert bm[("scsi0", n)]["persistent"] is False  # raw: lives as long as QEMU
    assert bm[("scsi0", n)]["count"] == 0
    assert set(bm) == {("virtio0", n), ("scsi0", n)}

    vm.guest_write("scsi0", 128 * KiB, 128 * KiB, 2)
    state = do_setup(vm, tmp_path, incremental="t1")
    assert modes(state) == {"virtio0": "reuse", "scsi0": "reuse"}
    bm = bitmaps_on(vm, state)
    assert bm[("virtio0", f"{n}-frozen")]["count"] == 64 * KiB
    assert bm[("scsi0", f"{n}-frozen")]["count"] == 128 * KiB
    assert bm[("scsi0", f"{n}-frozen")]["recording"] is False
    assert bm[("scsi0", f"{n}-next")]["count"] == 0
    scsi0 = next(d for d in state.disks if d.name == "scsi0")
    assert scsi0.export_bitmap == f"{n}-frozen"
    assert scsi0.granularity == bm[("scsi0", f"{n}-frozen")]["granularity"]
    exported = {e["id"] for e in vm.qmp("query-block-exports")}
    assert {d.export_id for d in state.disks} <= exported
    if which_all("nbdinfo"):
        # F is exported through snapshot-access although it lives on the disk node below.
        out = subprocess.run(
            [
                "nbdinfo",
                f"--map=qemu:dirty-bitmap:{n}-frozen",
                f"nbd+unix:///scsi0?socket={state.nbd_socket}",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        assert out[:8] == ["0", "131072", "0", "clean", "131072", "131072", "1", "dirty"]
    vm.guest_write("scsi0", 1024 * KiB, 64 * KiB, 3)
    do_teardown(vm, state, commit=False)  # abort: B keeps everything
    bm = bitmaps_on(vm, state)
    assert set(bm) == {("virtio0", n), ("scsi0", n)}
    assert bm[("scsi0", n)]["count"] == 192 * KiB

    state = do_setup(vm, tmp_path, incremental="t1")
    assert modes(state) == {"virtio0": "reuse", "scsi0": "reuse"}
    bm = bitmaps_on(vm, state)
    assert bm[("scsi0", f"{n}-frozen")]["count"] == 192 * KiB
    assert bm[("virtio0", f"{n}-frozen")]["count"] == 64 * KiB
    vm.guest_write("virtio0", 2048 * KiB, 64 * KiB, 4)  # during the session: next round
    do_teardown(vm, state, commit=True)
    bm = bitmaps_on(vm, state)
    assert bm[("virtio0", n)]["count"] == 64 * KiB
    assert bm[("scsi0", n)]["count"] == 0
    assert set(bm) == {("virtio0", n), ("scsi0", n)}


def test_write_during_setup_is_in_frozen_bitmap(vm: TestVM, tmp_path: Path) -> None:
    """A write before the snapshot point is in the snapshot, so this incremental must read it."""
    state = do_setup(vm, tmp_path, incremental="t1")
    do_teardown(vm, state, commit=True)

    async def go() -> GraphState:
        async with QMP.connect(vm.qmp_path) as q:

            async def on_step(step: str, disk: str | None) -> None:
                if step == "add fleecing node" and disk == "virtio0":
                    # A guest write through the device, as vm.guest_write does.
                    line = (
                        "qemu-io -d /machine/peripheral/virtio0/virtio-backend "
                        '"write -P 9 512k 64k"'
                    )
                    await q.execute("human-monitor-command", {"command-line": line})

            return await setup(
                q,
                vmid="100",
                fleecing_dir=tmp_path / "fleece",
                nbd_socket=tmp_path / "nbd.sock",
                incremental="t1",
                on_step=on_step,
            )

    state = run(go)
    bm = bitmaps_on(vm, state)
    assert bm[("virtio0", "snapfs-t1-frozen")]["count"] == 64 * KiB
    assert bm[("virtio0", "snapfs-t1-next")]["count"] == 0
    do_teardown(vm, state, commit=False)


def test_bitmap_after_restarts(tmp_path: Path) -> None:
    with running_vm(tmp_path, [DiskSpec("virtio0", "qcow2", "virtio")]) as vm:
        state = do_setup(vm, tmp_path, incremental="t1")
        do_teardown(vm, state, commit=True)
        vm.guest_write("virtio0", 0, 64 * KiB, 1)
        vm.stop()  # clean: the persistent bitmap is stored
        vm.start()
        state = do_setup(vm, tmp_path, incremental="t1")
        assert modes(state) == {"virtio0": "reuse"}
        assert bitmaps_on(vm, state)[("virtio0", "snapfs-t1-frozen")]["count"] == 64 * KiB
        do_teardown(vm, state, commit=True)

        vm.stop(kill=True)  # the bitmap stays marked in use in the image: inconsistent
        vm.start()
        # Teardown after a restart: nothing left, quiet.
        do_teardown(vm, state, commit=True)
        state = do_setup(vm, tmp_path, incremental="t1")
        assert modes(state) == {"virtio0": "new"}
        assert "inconsistent" in state.disks[0].bitmap.reason
        do_teardown(vm, state, commit=True)
        bm = bitmaps_on(vm, state)
        assert bm[("virtio0", "snapfs-t1")].get("inconsistent", False) is False


def test_bitmap_resized_disk_is_new(vm: TestVM, tmp_path: Path) -> None:
    state = do_setup(vm, tmp_path, incremental="t1")
    do_teardown(vm, state, commit=True)
    vm.qmp("block_resize", **{"node-name": "virtio0-fmt", "size": 64 * 1024 * KiB})
    state = do_setup(vm, tmp_path, incremental="t1")
    assert modes(state) == {"virtio0": "new", "scsi0": "reuse"}
    assert "size changed" in next(d for d in state.disks if d.name == "virtio0").bitmap.reason
    do_teardown(vm, state, commit=False)


# -- 5. not QEMU --------------------------------------------------------------------------------


def fake_monitor(path: Path, greeting: bytes | None) -> Callable[[], None]:
    """A unix socket server that says ``greeting`` (or nothing) and keeps the connection open."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    conns: list[socket.socket] = []
    done = threading.Event()

    def serve() -> None:
        srv.settimeout(10)
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        conns.append(conn)
        if greeting is not None:
            conn.sendall(greeting)
        done.wait(30)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def stop() -> None:
        done.set()
        thread.join(5)
        for c in conns:
            c.close()
        srv.close()

    return stop


@pytest.mark.parametrize(
    "greeting", [None, b"garbage\n", b"\x00\xff" * 100 + b"\n", b'{"hello": 1}\n']
)
def test_not_a_qemu_monitor(tmp_path: Path, greeting: bytes | None) -> None:
    path = tmp_path / "fake.sock"
    stop = fake_monitor(path, greeting)
    try:

        async def go() -> None:
            async with QMP.connect(path, timeout=1.0):
                pass

        start = time.monotonic()
        with pytest.raises(QMPError, match="not a QEMU monitor") as exc:
            run(go)
        assert not isinstance(exc.value, VMGoneError)
        assert time.monotonic() - start < 5
    finally:
        stop()


def test_missing_socket(tmp_path: Path) -> None:
    async def go() -> None:
        async with QMP.connect(tmp_path / "nothing.sock"):
            pass

    with pytest.raises(VMGoneError, match=r"nothing\.sock"):
        run(go)


def test_qmp_error_and_lost_connection(tmp_path: Path) -> None:
    with running_vm(tmp_path, [DiskSpec("virtio0", fill=0)]) as vm:

        async def go() -> None:
            async with QMP.connect(vm.qmp_path) as q:
                with pytest.raises(QMPError, match=r"^blockdev-del: .*nosuch"):
                    await q.execute("blockdev-del", {"node-name": "nosuch"})
                assert vm.proc is not None
                vm.proc.kill()
                vm.proc.wait()
                with pytest.raises(VMGoneError, match=r"qmp\.sock"):
                    await q.execute("query-status")

        run(go)
