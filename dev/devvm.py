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
QEMU_IO = shutil.which("qemu-io") or "/usr/bin/qemu-io"
MiB = 1024 * 1024
_ZERO_BLOCK = bytes(65536)
#: A root file system with another QEMU (``make qemu10`` builds Debian 13's): when set, test VMs
#: run that QEMU in a chroot, with the host's /tmp, /var/tmp, /run and /dev bound in at the same
#: paths, so sockets and images are shared. snapfs itself always runs on the host.
QEMU_ROOT_ENV = "SNAPFS_TEST_QEMU_ROOT"
# Runs in a private mount namespace (so nothing leaks onto the host), as a slave of the host's:
# where the host's mounts are shared (systemd makes them so), mounts made and removed on the
# host later are seen inside; where they are not, only those that exist when QEMU starts. FUSE
# mounts copied in are dropped: a copy would keep a view's connection alive after the host
# unmounts it. exec keeps QEMU's pid the one the test started.
_CHROOT_QEMU = r"""set -e
root=$1; shift
for d in /tmp /var/tmp /run /dev; do mount --rbind "$d" "$root$d"; done
mount -t proc proc "$root/proc"
awk '$0 ~ / - fuse/ {print $5}' /proc/self/mountinfo | sort -r | while read -r m; do
    umount -l "$(printf '%b' "$m")" 2>/dev/null || true
done
exec chroot "$root" qemu-system-x86_64 "$@"
"""


def qemu_command() -> list[str]:
    """The command that starts the QEMU under test (the system's, or the one in
    ``$SNAPFS_TEST_QEMU_ROOT``)."""
    root = os.environ.get(QEMU_ROOT_ENV)
    if not root:
        return [QEMU]
    return ["unshare", "-m", "--propagation", "slave", "sh", "-c", _CHROOT_QEMU, "qemu", root]


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
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(str(path))
        except BaseException:
            self.sock.close()  # QEMU may not listen yet: the caller tries again
            raise
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


Bus = Literal["virtio", "scsi", "sata", "ide", "pflash"]


@dataclass
class DiskSpec:
    """One guest disk. ``name`` is the guest device id (``virtio0``, ``scsi0``, ``efidisk0``).

    ``bus`` "pflash" is a UEFI vars drive (Proxmox's ``efidisk0``: unit 1, drive id
    ``drive-<name>``); ``throttle`` (bytes/s) puts a throttle node with a group of its own
    between the device and the format node (virtio only); ``backing`` makes a qcow2 a linked
    clone whose first half lives in a backing image; ``iothread`` gives the disk an I/O thread
    of its own (virtio and scsi; a scsi disk then gets a controller of its own, as Proxmox's
    "VirtIO SCSI single" does), so its nodes live in that thread's AioContext.
    """

    name: str
    fmt: Literal["qcow2", "raw"] = "qcow2"
    bus: Bus = "virtio"
    size: int = 32 * MiB
    # None: random content over the whole disk; 0: an empty (all-zero, sparse) disk.
    fill: int | None = None
    # False: an empty sparse image whose content is not tracked in memory (huge disks).
    modelled: bool = True
    # The drive's detect-zeroes ("off", "on", "unmap") and whether discards reach the image.
    detect_zeroes: Literal["off", "on", "unmap"] = "off"
    discard: bool = True
    # cache=none,aio=native (O_DIRECT: the image must not be on tmpfs).
    direct: bool = False
    throttle: int | None = None
    backing: bool = False
    iothread: bool = False
    path: Path = field(default=Path(), init=False)

    @property
    def qemu_io_target(self) -> str:
        """What HMP ``qemu-io`` takes to write through the guest device."""
        if self.bus == "virtio":
            return f"-d /machine/peripheral/{self.name}/virtio-backend"
        if self.bus == "pflash":
            return f"drive-{self.name}"  # the BlockBackend's name
        return f"-d {self.name}"

    def cluster(self) -> int:
        """The granularity below which the image ignores a discard (qcow2: its cluster)."""
        return 65536 if self.fmt == "qcow2" else 1

    def drive_args(self) -> list[str]:
        """QEMU arguments for the drive and the device."""
        opts = f"detect-zeroes={self.detect_zeroes},discard={'unmap' if self.discard else 'ignore'}"
        if self.bus == "virtio":
            file_opts = ",cache.direct=on,aio=native" if self.direct else ""
            args = [
                "-blockdev",
                f"driver=file,filename={self.path},node-name={self.name}-file"
                f"{file_opts},discard={'unmap' if self.discard else 'ignore'}",
                "-blockdev",
                f"driver={self.fmt},file={self.name}-file,node-name={self.name}-fmt,{opts}",
            ]
            top = f"{self.name}-fmt"
            if self.throttle is not None:
                args += [
                    "-object",
                    f"throttle-group,id={self.name}-tg,x-bps-total={self.throttle}",
                    "-blockdev",
                    f"driver=throttle,throttle-group={self.name}-tg,"
                    f"file={top},node-name={self.name}-thr,"
                    f"discard={'unmap' if self.discard else 'ignore'}",
                ]
                top = f"{self.name}-thr"
            device = f"virtio-blk-pci,drive={top},id={self.name}"
            if self.iothread:
                args += ["-object", f"iothread,id=iothread-{self.name}"]
                device += f",iothread=iothread-{self.name}"
            return [*args, "-device", device]
        cache = ",cache=none,aio=native" if self.direct else ""
        drive = f"file={self.path},id=drive-{self.name},format={self.fmt},{opts}{cache}"
        if self.bus == "pflash":
            return ["-drive", f"if=pflash,unit=1,{drive}"]
        args = ["-drive", f"if=none,{drive}"]
        if self.bus == "scsi":
            # Proxmox style: a legacy -drive with an id of drive-<device id>.
            bus = "scsihw0"
            if self.iothread:
                bus = f"virtioscsi{self.name.removeprefix('scsi')}"
                args += [
                    "-object",
                    f"iothread,id=iothread-{bus}",
                    "-device",
                    f"virtio-scsi-pci,id={bus},iothread=iothread-{bus}",
                ]
            return [
                *args,
                "-device",
                f"scsi-hd,bus={bus}.0,drive=drive-{self.name},id={self.name}",
            ]
        # ide: q35's own AHCI ports; sata: a controller of its own, as Proxmox adds.
        bus = f"ahci0.{self.name[-1]}" if self.bus == "sata" else f"ide.{self.name[-1]}"
        return [*args, "-device", f"ide-hd,bus={bus},drive=drive-{self.name},id={self.name}"]


class TestVM:
    """A paused QEMU process with the given disks (subclasses may run a guest); use as a
    context manager."""

    __test__ = False  # not a pytest class

    #: ``-S``: no guest code runs, so the disks change only through ``guest_write`` and friends.
    START_PAUSED = True
    MEMORY_MIB = 64

    def __init__(
        self,
        workdir: Path,
        disks: list[DiskSpec],
        *,
        seed: int = 1,
        extra_args: list[str] | None = None,
        contents: dict[str, bytes] | None = None,
    ) -> None:
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
        # Guest I/O may come from a thread of its own while a test takes snapshots.
        self.model_lock = threading.Lock()
        self._created = False

    # -- lifecycle -----------------------------------------------------------------------------

    def create_images(self) -> None:
        rng = random.Random(self.seed)
        self._created = True
        for disk in self.disks.values():
            disk.path = self.workdir / f"{disk.name}.{disk.fmt}"
            if not disk.modelled:
                subprocess.run(
                    [QEMU_IMG, "create", "-q", "-f", disk.fmt, str(disk.path), str(disk.size)],
                    check=True,
                )
                continue
            raw = self.workdir / f"{disk.name}.init.raw"
            if disk.name in self.contents:
                content = bytearray(self.contents[disk.name])
            elif disk.fill is None:
                content = bytearray(rng.randbytes(disk.size))
            else:
                content = bytearray(bytes([disk.fill]) * disk.size)
            with open(raw, "wb") as f:
                # Sparse: zero blocks stay holes, as on a thin disk.
                view = memoryview(content)
                for off in range(0, disk.size, 65536):
                    block = view[off : off + 65536]
                    if block != _ZERO_BLOCK[: len(block)]:
                        f.seek(off)
                        f.write(block)
                f.truncate(disk.size)
            self.expected[disk.name] = content
            if disk.fmt == "raw":
                raw.rename(disk.path)
                continue
            target = disk.path.with_suffix(".base.qcow2") if disk.backing else disk.path
            subprocess.run(
                [
                    QEMU_IMG,
                    "convert",
                    "-q",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    "-S",
                    "4k",
                    str(raw),
                    str(target),
                ],
                check=True,
            )
            raw.unlink()
            if disk.backing:
                # A linked clone: the overlay holds every fourth MiB's first 64 KiB anew.
                subprocess.run(
                    [
                        QEMU_IMG,
                        "create",
                        "-q",
                        "-f",
                        "qcow2",
                        "-F",
                        "qcow2",
                        "-b",
                        str(target),
                        str(disk.path),
                    ],
                    check=True,
                )
                writes = [f"write -P 0xa5 {off} 65536" for off in range(0, disk.size, 4 * MiB)]
                subprocess.run(
                    [
                        QEMU_IO,
                        "-f",
                        "qcow2",
                        *[a for w in writes for a in ("-c", w)],
                        str(disk.path),
                    ],
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                for off in range(0, disk.size, 4 * MiB):
                    content[off : off + 65536] = b"\xa5" * 65536

    def qemu_args(self) -> list[str]:
        args = [
            *qemu_command(),
            *(["-S"] if self.START_PAUSED else []),
            "-nodefaults",
            "-display",
            "none",
            "-machine",
            "q35",
            "-m",
            str(self.MEMORY_MIB),
            "-name",
            f"snapfs-test-{self.workdir.name}",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-qmp",
            f"unix:{self.test_qmp_path},server=on,wait=off",
        ]
        if any(d.bus == "scsi" and not d.iothread for d in self.disks.values()):
            args += ["-device", "virtio-scsi-pci,id=scsihw0"]
        if any(d.bus == "sata" for d in self.disks.values()):
            args += ["-device", "ahci,id=ahci0"]
        if any(d.bus == "pflash" for d in self.disks.values()):
            # UEFI: the firmware's code, read-only (any bytes do: the VM never runs them).
            code = self.workdir / "OVMF_CODE.fd"
            if not code.exists():
                code.write_bytes(bytes(2 * MiB))
            args += ["-drive", f"if=pflash,unit=0,format=raw,readonly=on,file={code}"]
        for d in self.disks.values():
            args += d.drive_args()
        return args + self.extra_args

    def start(self) -> TestVM:
        if not self._created:
            self.create_images()
        for sock in (self.qmp_path, self.test_qmp_path):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        log = open(self.workdir / "qemu.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            self.qemu_args(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
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

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
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

    def qemu_version(self) -> str:
        """QEMU's version as "major.minor.micro" (the test matrix runs several)."""
        v = self.qmp("query-version")["qemu"]
        return f"{v['major']}.{v['minor']}.{v['micro']}"

    def hmp(self, line: str) -> str:
        out: str = self.qmp("human-monitor-command", **{"command-line": line})
        return out

    def _qemu_io(self, disk: str, command: str) -> None:
        spec = self.disks[disk]
        # qemu-io prints its results on QEMU's stdout (qemu.log), only monitor errors come back.
        out = self.hmp(f'qemu-io {spec.qemu_io_target} "{command}"')
        if out.strip():
            raise RuntimeError(f"guest I/O on {disk} ({command}) failed: {out.strip()}")

    def guest_write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        """Write ``pattern`` bytes through the guest device, as the guest would."""
        self._qemu_io(disk, f"write -P {pattern:#x} {offset} {length}")
        if self.disks[disk].modelled:
            with self.model_lock:
                self.expected[disk][offset : offset + length] = bytes([pattern]) * length

    def guest_zero(self, disk: str, offset: int, length: int, *, unmap: bool = False) -> None:
        """A guest write of zeros (WRITE ZEROES; ``unmap``: the guest allows unmapping)."""
        self._qemu_io(disk, f"write -z{' -u' if unmap else ''} {offset} {length}")
        if self.disks[disk].modelled:
            with self.model_lock:
                self.expected[disk][offset : offset + length] = bytes(length)

    def guest_discard(self, disk: str, offset: int, length: int) -> None:
        """A guest discard. The model follows the image: a raw file punches the range, a
        qcow2 drops only the whole clusters in it; with discard=ignore nothing changes."""
        self._qemu_io(disk, f"discard {offset} {length}")
        spec = self.disks[disk]
        if spec.modelled and spec.discard:
            g = spec.cluster()
            start = -(-offset // g) * g
            end = min((offset + length) // g * g, spec.size)
            if offset + length >= spec.size:
                end = spec.size
            if end > start:
                with self.model_lock:
                    self.expected[disk][start:end] = bytes(end - start)

    def io_errors(self) -> list[str]:
        """Guest-visible I/O errors so far: qemu-io reports them on QEMU's stdout. QEMU's NBD
        server also logs there when a client goes away in its handshake (a killed reader):
        that is not the guest's."""
        log = (self.workdir / "qemu.log").read_text(errors="replace")
        return [
            line
            for line in log.splitlines()
            if ("failed" in line or "error" in line.lower())
            and "option negotiation failed" not in line
        ]

    def graph(self) -> dict[str, Any]:
        """What a restored VM must look like again: devices, their nodes, all named nodes."""
        block = self.qmp("query-block")
        nodes = self.qmp("query-named-block-nodes", flat=True)
        return {
            "devices": sorted(
                (b.get("qdev", ""), b["device"], b.get("inserted", {}).get("node-name"))
                for b in block
            ),
            "nodes": sorted((n["node-name"], n["drv"], n["file"]) for n in nodes),
            "exports": self.qmp("query-block-exports"),
            # Filters keep internal, anonymous bitmaps: only named ones are the VM's.
            "bitmaps": sorted(
                (n["node-name"], b["name"], b.get("persistent", False))
                for n in nodes
                for b in n.get("dirty-bitmaps", [])
                if "name" in b
            ),
        }

    # -- content -------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, bytes]:
        """The disks' content as of now, from the in-memory model."""
        with self.model_lock:
            return {name: bytes(data) for name, data in self.expected.items()}

    def image_content(self, disk: str) -> bytes:
        """The disk image's real content, read from the file (QEMU should be stopped)."""
        spec = self.disks[disk]
        if spec.fmt == "raw":
            return spec.path.read_bytes()
        out = self.workdir / f"{disk}.check.raw"
        subprocess.run(
            [QEMU_IMG, "convert", "-U", "-q", "-O", "raw", str(spec.path), str(out)], check=True
        )
        try:
            return out.read_bytes()
        finally:
            out.unlink()


class GuestIO:
    """Random guest I/O of the kinds real guests do, through the guest devices: data writes,
    zero writes (with and without unmap), discards; of any size from one byte to a MiB, at any
    alignment, often across 64 KiB boundaries. ``storm()`` runs it in a thread, racing
    whatever the test does meanwhile. The VM's model follows every operation."""

    KINDS = ("write", "write", "small", "zero", "zero-unmap", "discard")

    def __init__(
        self,
        vm: TestVM,
        seed: int,
        disks: list[str] | None = None,
        kinds: tuple[str, ...] | None = None,
    ) -> None:
        self.vm = vm
        self.rng = random.Random(seed)
        self.disks = disks or [d.name for d in vm.disks.values() if d.modelled]
        self.kinds = kinds or self.KINDS
        self.done = 0

    def one(self) -> None:
        rng = self.rng
        disk = rng.choice(self.disks)
        size = self.vm.disks[disk].size
        kind = rng.choice(self.kinds)
        length = rng.choice([1, 511, 4096, 4097, 65536, 65536 + 3000, 200_000, MiB])
        if kind == "small":
            length = rng.randrange(1, 4096)
        length = min(length, size)
        where = rng.choice(["any", "4k", "64k", "across"])
        if where == "across":  # straddle a 64 KiB boundary
            offset = rng.randrange(1, max(2, size // 65536)) * 65536 - rng.randrange(1, 4096)
        else:
            offset = rng.randrange(0, size - length + 1)
            if where != "any":
                offset -= offset % (4096 if where == "4k" else 65536)
        offset = max(0, min(offset, size - length))
        if kind in ("write", "small"):
            self.vm.guest_write(disk, offset, length, rng.randrange(1, 256))
        elif kind == "discard":
            self.vm.guest_discard(disk, offset, length)
        else:
            self.vm.guest_zero(disk, offset, length, unmap=kind == "zero-unmap")
        self.done += 1

    def run(self, count: int) -> None:
        for _ in range(count):
            self.one()

    @contextlib.contextmanager
    def storm(self) -> Iterator[None]:
        """Guest I/O in a thread for the ``with`` body (at least one operation)."""
        stop = threading.Event()
        failed: list[BaseException] = []

        def loop() -> None:
            try:
                self.one()
                while not stop.is_set():
                    self.one()
            except BaseException as err:  # reported in the test's thread
                failed.append(err)

        thread = threading.Thread(target=loop, name="guest-io", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(60)
        if failed:
            raise failed[0]


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
