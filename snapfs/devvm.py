"""A real, throwaway QEMU VM for the tests, the demo and the benchmark.

QEMU starts paused (``-S``): no guest OS is needed. It has two QMP monitors: ``qmp_path`` is for
snapfs, the second one is the test's own, used for guest writes through HMP ``qemu-io`` (they go
through the guest device's BlockBackend exactly like a guest's writes would) and for inspecting
the block graph. Each disk's content is tracked in memory (``expected``), so a test can say what
the disk held at any instant without reading it back through QEMU.

Invariant: ``stop()`` (also run by ``__exit__``) leaves no QEMU process behind, whatever happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

QEMU = shutil.which("qemu-system-x86_64") or "/usr/bin/qemu-system-x86_64"
QEMU_IMG = shutil.which("qemu-img") or "/usr/bin/qemu-img"
MiB = 1024 * 1024


def poll(condition: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    """Call ``condition()`` until it returns something truthy; raise after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class Monitor:
    """A minimal synchronous QMP client for the test's own monitor.

    Deliberately not qemu.qmp: its synchronous shim shares the thread's asyncio event loop with
    the trio-asyncio loops that snapfs's own code runs in the same test process.
    """

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        # Tests write from a background thread while the main thread inspects the graph.
        self.lock = threading.Lock()
        self._receive()  # the greeting
        self.cmd_raw("qmp_capabilities")

    def _receive(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise EOFError("QEMU closed the monitor connection")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def cmd_raw(self, cmd: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send a command; return QEMU's reply (with "return" or "error"), skipping events."""
        req: dict[str, Any] = {"execute": cmd}
        if args:
            req["arguments"] = args
        with self.lock:
            self.file.write(json.dumps(req).encode() + b"\n")
            self.file.flush()
            while True:
                msg = self._receive()
                if "return" in msg or "error" in msg:
                    return msg

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        self.sock.close()


@dataclass
class DiskSpec:
    """One guest disk. ``name`` is the guest device id (``virtio0``, ``scsi0``)."""

    name: str
    fmt: Literal["qcow2", "raw"] = "qcow2"
    bus: Literal["virtio", "scsi"] = "virtio"
    size: int = 32 * MiB
    # None: random content over the whole disk; 0: an empty (all-zero, sparse) disk.
    fill: int | None = None
    # False: an empty sparse image whose content is not tracked in memory (huge disks).
    modelled: bool = True
    path: Path = field(default=Path(), init=False)

    @property
    def qom_io_path(self) -> str:
        """What HMP ``qemu-io -d`` takes to write through the guest device."""
        if self.bus == "virtio":
            return f"/machine/peripheral/{self.name}/virtio-backend"
        return self.name


class TestVM:
    """A paused QEMU process with the given disks; use as a context manager."""

    __test__ = False  # not a pytest class

    def __init__(self, workdir: Path, disks: list[DiskSpec], *, seed: int = 1,
                 extra_args: list[str] | None = None,
                 contents: dict[str, bytes] | None = None) -> None:
        self.workdir = workdir
        self.disks = {d.name: d for d in disks}
        self.seed = seed
        self.extra_args = extra_args or []
        self.contents = contents or {}
        # A VMID that stays the same across restarts of this VM (bitmap records are per VMID).
        self.vmid = str(random.Random(str(workdir)).randrange(100000, 999999999))
        self.qmp_path = workdir / "qmp.sock"
        self.test_qmp_path = workdir / "qmp-test.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.monitor: Monitor | None = None
        self.expected: dict[str, bytearray] = {}
        self._created = False

    # -- lifecycle -----------------------------------------------------------------------------

    def create_images(self) -> None:
        rng = random.Random(self.seed)
        self._created = True
        for disk in self.disks.values():
            disk.path = self.workdir / f"{disk.name}.{disk.fmt}"
            if not disk.modelled:
                subprocess.run([QEMU_IMG, "create", "-q", "-f", disk.fmt, str(disk.path),
                                str(disk.size)], check=True)
                continue
            raw = self.workdir / f"{disk.name}.init.raw"
            if disk.name in self.contents:
                content = bytearray(self.contents[disk.name])
            elif disk.fill is None:
                content = bytearray(rng.randbytes(disk.size))
            else:
                content = bytearray(bytes([disk.fill]) * disk.size)
            with open(raw, "wb") as f:
                if disk.fill == 0:
                    f.truncate(disk.size)
                else:
                    f.write(content)
            self.expected[disk.name] = content
            if disk.fmt == "raw":
                raw.rename(disk.path)
            else:
                subprocess.run([QEMU_IMG, "convert", "-q", "-f", "raw", "-O", "qcow2", "-S", "4k",
                                str(raw), str(disk.path)], check=True)
                raw.unlink()

    def qemu_args(self) -> list[str]:
        args = [QEMU, "-S", "-nodefaults", "-display", "none", "-machine", "q35",
                "-m", "64", "-name", f"snapfs-test-{self.workdir.name}",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-qmp", f"unix:{self.test_qmp_path},server=on,wait=off"]
        if any(d.bus == "scsi" for d in self.disks.values()):
            args += ["-device", "virtio-scsi-pci,id=scsihw0"]
        for d in self.disks.values():
            if d.bus == "virtio":
                args += ["-blockdev", f"driver=file,filename={d.path},node-name={d.name}-file",
                         "-blockdev", f"driver={d.fmt},file={d.name}-file,node-name={d.name}-fmt",
                         "-device", f"virtio-blk-pci,drive={d.name}-fmt,id={d.name}"]
            else:
                # Proxmox style: a legacy -drive with an id of drive-<device id>.
                args += ["-drive", f"file={d.path},if=none,id=drive-{d.name},format={d.fmt}",
                         "-device", f"scsi-hd,bus=scsihw0.0,drive=drive-{d.name},id={d.name}"]
        return args + self.extra_args

    def start(self) -> TestVM:
        if not self._created:
            self.create_images()
        for sock in (self.qmp_path, self.test_qmp_path):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        log = open(self.workdir / "qemu.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(self.qemu_args(), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited: {(self.workdir / 'qemu.log').read_text()}")
            return self.qmp_path.exists() and self.test_qmp_path.exists()

        def connected() -> Monitor | None:
            # The socket file appears at bind(), a moment before QEMU listens on it.
            try:
                return Monitor(self.test_qmp_path)
            except ConnectionRefusedError:
                return None

        try:
            poll(ready, what="QEMU's QMP sockets")
            self.monitor = poll(connected, what="QEMU's test monitor")
        except BaseException:
            self.stop(kill=True)
            raise
        return self

    def __enter__(self) -> TestVM:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self, *, kill: bool = False) -> None:
        """Stop QEMU: ``quit`` (a clean exit that flushes persistent bitmaps) or SIGKILL."""
        if self.monitor is not None:
            if not kill:
                with contextlib.suppress(Exception):
                    self.monitor.cmd_raw("quit")
            with contextlib.suppress(Exception):
                self.monitor.close()
            self.monitor = None
        if self.proc is not None:
            if kill:
                self.proc.send_signal(signal.SIGKILL)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    # -- the test's monitor --------------------------------------------------------------------

    def qmp(self, cmd: str, **args: Any) -> Any:
        """Run a QMP command on the test's own monitor; raise on an error reply."""
        assert self.monitor is not None
        reply = self.monitor.cmd_raw(cmd, dict(args))
        if "error" in reply:
            raise RuntimeError(f"{cmd}: {reply['error']}")
        return reply["return"]

    def hmp(self, line: str) -> str:
        out: str = self.qmp("human-monitor-command", **{"command-line": line})
        return out

    def guest_write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        """Write ``pattern`` bytes through the guest device, as the guest would."""
        spec = self.disks[disk]
        # qemu-io prints its results on QEMU's stdout (qemu.log), only monitor errors come back.
        out = self.hmp(f'qemu-io -d {spec.qom_io_path} "write -P {pattern:#x} {offset} {length}"')
        if out.strip():
            raise RuntimeError(f"guest write to {disk} failed: {out.strip()}")
        if spec.modelled:
            self.expected[disk][offset:offset + length] = bytes([pattern]) * length

    def io_errors(self) -> list[str]:
        """Guest-visible I/O errors so far: qemu-io reports them on QEMU's stdout."""
        log = (self.workdir / "qemu.log").read_text(errors="replace")
        return [line for line in log.splitlines() if "failed" in line or "error" in line.lower()]

    def graph(self) -> dict[str, Any]:
        """What a restored VM must look like again: devices, their nodes, all named nodes."""
        block = self.qmp("query-block")
        nodes = self.qmp("query-named-block-nodes", flat=True)
        return {
            "devices": sorted((b.get("qdev", ""), b["device"],
                               b.get("inserted", {}).get("node-name")) for b in block),
            "nodes": sorted((n["node-name"], n["drv"], n["file"]) for n in nodes),
            "exports": self.qmp("query-block-exports"),
            # Filters keep internal, anonymous bitmaps: only named ones are the VM's.
            "bitmaps": sorted((n["node-name"], b["name"], b.get("persistent", False))
                              for n in nodes for b in n.get("dirty-bitmaps", []) if "name" in b),
        }

    # -- content -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, bytes]:
        """The disks' content as of now, from the in-memory model."""
        return {name: bytes(data) for name, data in self.expected.items()}

    def image_content(self, disk: str) -> bytes:
        """The disk image's real content, read from the file (QEMU should be stopped)."""
        spec = self.disks[disk]
        if spec.fmt == "raw":
            return spec.path.read_bytes()
        out = self.workdir / f"{disk}.check.raw"
        subprocess.run([QEMU_IMG, "convert", "-U", "-q", "-O", "raw", str(spec.path), str(out)],
                       check=True)
        try:
            return out.read_bytes()
        finally:
            out.unlink()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def running_vm(workdir: Path, disks: list[DiskSpec], **kw: Any) -> Iterator[TestVM]:
    vm = TestVM(workdir, disks, **kw)
    try:
        yield vm.start()
    finally:
        vm.stop()


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


def which_all(*names: str) -> bool:
    return all(shutil.which(n) for n in names)


def is_root() -> bool:
    return os.geteuid() == 0
