"""Fixtures for integration tests: a real QEMU VM, the real snapfs CLI, real mounts.

Every test gets its own run directory (SNAPFS_RUN_DIR) so sessions never collide; the
``snapfs`` fixture kills serving processes and lazily unmounts whatever a failing test left
mounted below its tmp_path, so nothing outlives a test. SIGTERM and SIGHUP unwind the test in
progress like Ctrl-C and stop the run (tests/stopsignals.py).
"""

from __future__ import annotations

import os as _os

# Hypothesis keeps what it learns in .hypothesis/ of the working directory: the work tree.
_os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", "/tmp/snapfs-hypothesis")

import contextlib
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio

from dev.devvm import QEMU_IMG, DiskSpec, MiB, TestVM, poll
from snapfs.datapath import DiskReader, SharedDepth
from snapfs.errors import FuseError
from snapfs.fuse import kernel
from snapfs.fuse.ops import FuseErrno
from snapfs.fuse.reply import ReadReply
from snapfs.fuse.splice import ReplyPipe

# The hooks of tests/stopsignals.py, found here by their names.
from tests.stopsignals import pytest_configure as pytest_configure
from tests.stopsignals import pytest_runtest_protocol as pytest_runtest_protocol


def mounts_below(path: Path) -> list[str]:
    out = []
    with open("/proc/self/mounts") as f:
        for line in f:
            mp = line.split()[1].replace("\\040", " ")
            if mp.startswith(str(path)):
                out.append(mp)
    return out


def processes_naming(path: Path) -> dict[int, str]:
    """Running processes (but this one) whose command line names something below ``path``:
    pid -> command line."""
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue  # gone meanwhile
            if str(path) in cmd:
                out[int(proc.name)] = cmd
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


# -- the data path without a mount: replies arrive in a pipe standing in for /dev/fuse ----------

FUSE_OUT_HEADER = struct.Struct("=IiQ")


class FakeDevice:
    """A pipe in place of /dev/fuse: what a DiskReader sends arrives here."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_CLOEXEC)
        # Big enough for a reply; the test reads each reply before the next one is sent.
        self.replies: list[tuple[int, int, bytes]] = []

    def factory(self, size: int) -> ReplyPipe:
        return ReplyPipe(self.w, size)

    def take(self) -> tuple[int, int, bytes]:
        """The next reply: (unique, error, payload)."""
        length, error, unique = FUSE_OUT_HEADER.unpack(self._exact(FUSE_OUT_HEADER.size))
        return unique, error, self._exact(length - FUSE_OUT_HEADER.size)

    def take_until(self, done: threading.Event) -> Iterator[tuple[int, int, bytes]]:
        """Replies as they come, until ``done`` is set while none is waiting (so the reading
        thread ends instead of being left blocked on the pipe)."""
        while True:
            ready, _, _ = select.select([self.r], [], [], 0.05)
            if ready:
                yield self.take()
            elif done.is_set():
                return

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            out += os.read(self.r, n - len(out))
        return bytes(out)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


async def read_back(
    reader: DiskReader,
    dev: FakeDevice,
    unique: int,
    offset: int,
    length: int,
    ahead: Sequence[tuple[int, int]] = (),
) -> bytes:
    """One READ through the reader; the reply is taken off the fake device concurrently (a
    1 MiB reply does not fit into the fake device's pipe at once)."""
    got: list[tuple[int, int, bytes]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: trio.to_thread.run_sync(lambda: got.append(dev.take()), abandon_on_cancel=True)
        )
        try:
            await reader.read(ReadReply(unique), offset, length, ahead)
        except BaseException:
            nursery.cancel_scope.cancel()
            raise
    ((u, error, payload),) = got
    assert (u, error) == (unique, 0)
    return payload


def with_reader(
    sock: str,
    name: str,
    body: object,
    *,
    pipe_size: int = 1 << 20,
    depth: SharedDepth | None = None,
    confine: int = 0,
    copied: str = "",
    tune: bool = True,
) -> DiskReader:
    """Run ``body(reader, dev)`` with a running DiskReader; return the reader (stopped)."""
    dev = FakeDevice()
    reader = DiskReader(
        sock,
        name,
        dev.factory,
        pipe_size=pipe_size,
        depth=depth,
        confine=confine,
        copied=copied,
        tune=tune,
    )

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.run)
            try:
                with trio.fail_after(60):
                    await body(reader, dev)  # type: ignore[operator]
            finally:
                reader.close()

    try:
        trio.run(main)
    finally:
        dev.close()
    return reader


class RecordingReply(ReadReply):
    """A READ's reply handle without a FUSE server (model and adapter tests): it records the
    answer; ``settle`` runs the work given to ``later`` as the server's task would."""

    def __init__(self) -> None:
        super().__init__(0)
        self.payload: bytes | None = None
        self.errno: int | None = None
        self.work: Callable[[], Awaitable[None]] | None = None

    def data(self, payload: bytes | bytearray | memoryview) -> None:
        self._claim()
        self.payload = bytes(payload)

    def error(self, errno: int) -> None:
        self._claim()
        self.errno = errno

    def later(self, work: Callable[[], Awaitable[None]]) -> None:
        self.spawned = True
        self.work = work

    async def settle(self) -> None:
        work, self.work = self.work, None
        if work is not None:
            try:
                await work()
            except FuseErrno as err:
                self.error(err.errno)


# -- QEMU's NBD server, driven from the test's own monitor -----------------------------------

QEMU_IO = "qemu-io"


def start_server(vm: TestVM, tmp_path: Path) -> str:
    sock = str(tmp_path / "nbd.sock")
    vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    return sock


def export(vm: TestVM, node: str, name: str, *, writable: bool = False, **extra: Any) -> None:
    # The guest device does not share writes on its node: only other nodes can be writable.
    vm.qmp(
        "block-export-add",
        type="nbd",
        id=name,
        **{"node-name": node},
        name=name,
        writable=writable,
        **extra,
    )


def unexport(vm: TestVM, name: str) -> None:
    vm.qmp("block-export-del", id=name)
    poll(
        lambda: not any(e["id"] == name for e in vm.qmp("query-block-exports")),
        what=f"export {name} to go away",
    )


@contextlib.contextmanager
def fleecing(vm: TestVM, tmp_path: Path) -> Iterator[None]:
    """The copy-before-write graph snapfs builds, on the test monitor; torn down in reverse."""
    fl = tmp_path / "fl.qcow2"
    subprocess.run(
        [QEMU_IMG, "create", "-q", "-f", "qcow2", str(fl), str(len(vm.expected["virtio0"]))],
        check=True,
    )
    steps: list[Callable[[], Any]] = []
    try:
        vm.qmp(
            "blockdev-add",
            driver="qcow2",
            **{"node-name": "fl"},
            discard="unmap",
            file={"driver": "file", "filename": str(fl)},
        )
        steps.append(lambda: vm.qmp("blockdev-del", **{"node-name": "fl"}))
        vm.qmp(
            "blockdev-add",
            driver="copy-before-write",
            **{"node-name": "cbw"},
            file="virtio0-fmt",
            target="fl",
            bitmap={"node": "virtio0-fmt", "name": "b0"},
        )
        steps.append(lambda: vm.qmp("blockdev-del", **{"node-name": "cbw"}))
        vm.qmp("qom-set", path="/machine/peripheral/virtio0", property="drive", value="cbw")
        steps.append(
            lambda: vm.qmp(
                "qom-set", path="/machine/peripheral/virtio0", property="drive", value="virtio0-fmt"
            )
        )
        vm.qmp(
            "blockdev-add",
            driver="snapshot-access",
            **{"node-name": "acc"},
            file="cbw",
            discard="unmap",
        )
        steps.append(lambda: vm.qmp("blockdev-del", **{"node-name": "acc"}))
        export(vm, "acc", "acc", writable=True)
        steps.append(lambda: unexport(vm, "acc"))
        yield
    finally:
        for step in reversed(steps):
            step()


# -- images in memory, and what a view's sidecar says ----------------------------------------


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory in memory for the images (removed afterwards)."""
    path = Path("/dev/shm") / f"snapfs-test-{tmp_path.name}-{os.getpid()}"
    path.mkdir()
    try:
        yield path
    finally:
        if (path / "qemu.log").exists():  # kept with the test's other files
            shutil.copy(path / "qemu.log", tmp_path / "qemu.log")
        shutil.rmtree(path, ignore_errors=True)


def disk_content(seed: int, size: int = 8 * MiB) -> bytes:
    """Random data with zero stretches of several sizes, as a used thin disk has."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    for start, length in (
        (64 * 1024, 960 * 1024),
        (3 * MiB, 256 * 1024),
        (5 * MiB + 4096, 8192),
        (size - 512 * 1024, 512 * 1024),
    ):
        data[start : start + length] = bytes(length)
    return bytes(data)


def sidecar(mnt: Path, disk: str) -> list[tuple[int, int]]:
    return [
        (int(o), int(n))
        for o, n in (line.split() for line in (mnt / f"{disk}.dirty").read_text().splitlines())
    ]


def covers(regions: list[tuple[int, int]], offset: int, length: int) -> bool:
    return any(o <= offset and offset + length <= o + n for o, n in regions)


# -- a mount whose QMP goes through a proxy (tests/qmp_proxy.py) ------------------------------


@dataclass
class View:
    """Where a mount through the proxy goes, and what the VM looked like before it."""

    vm: TestVM
    snapfs: Snapfs
    mnt: Path
    fleecing: Path
    graph: dict[str, Any] = field(default_factory=dict)
    status: str = ""

    def mount(self, qmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
        self.mnt.mkdir(exist_ok=True)
        return self.snapfs(
            "mount",
            self.vm.vmid,
            str(self.mnt),
            "--qmp",
            str(qmp),
            "--fleecing-dir",
            str(self.fleecing),
            *args,
            check=False,
        )

    @property
    def state_dir(self) -> Path:
        return self.snapfs.run_dir / ".state" / self.vm.vmid

    def assert_restored(self) -> None:
        """The VM as before the mount; no mount, fleecing file, state or process left."""
        assert self.vm.graph() == self.graph
        assert self.vm.qmp("query-status")["status"] == self.status
        assert not os.path.ismount(self.mnt)
        assert list(self.mnt.iterdir()) == []
        assert sorted(p.name for p in self.fleecing.glob("*.qcow2")) == []
        assert not self.state_dir.exists()
        assert self.snapfs.pids() == []
