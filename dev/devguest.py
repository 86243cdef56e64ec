"""A REAL Linux guest running Debian's REAL qemu-guest-agent, for the guest-freeze tests.

Development code, not product. ``build_guest()`` assembles, once, a kernel and an initramfs from
Debian 12 packages fetched with the host's ``apt-get download`` (nothing is installed on the
host) and caches them in ``/var/cache/snapfs-dev/guest`` (``$SNAPFS_GUEST_CACHE``):

- the kernel of ``linux-image-cloud-amd64`` and the few modules it needs for a virtio-blk disk
  and a virtio-serial port (the cloud kernel builds them as modules), with their dependencies;
- ``busybox-static`` as the whole userland;
- ``qemu-guest-agent``'s ``qemu-ga`` with the shared libraries and the dynamic loader from the
  packages it depends on (so the guest runs Debian's binary exactly as a Debian guest would);
- ``/init`` (``INIT``): mounts the virtio disk (ext4, made on the host) at ``/data``, keeps it
  busy with a writer, and starts ``qemu-ga`` on ``org.qemu.guest_agent.0``.

The guest runs from the initramfs; it has no root disk. ``GuestVM`` runs it under QEMU (KVM when
it can run it, TCG otherwise: see ``accel()``) with the ext4 disk as ``virtio0``, a virtio-serial
agent channel at ``<workdir>/qga.sock`` and the serial console in ``<workdir>/console.log``.
``AgentClient`` is a small synchronous client for that channel (the tests' own, not snapfs's).

What is real: kernel, ext4, the FIFREEZE ioctl, qemu-ga, QEMU. What is not: the "application"
is a shell loop (``writer`` in ``INIT``), and the guest has no systemd, udev or root disk.

    python -m dev.devguest     # builds the cache (``make guest``) and prints what it holds
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dev.devvm import DiskSpec, MiB, TestVM, poll

CACHE_ENV = "SNAPFS_GUEST_CACHE"
DEFAULT_CACHE = Path("/var/cache/snapfs-dev/guest")
KERNEL_PACKAGE = "linux-image-cloud-amd64"  # a metapackage: depends on the versioned kernel
AGENT_PACKAGE = "qemu-guest-agent"
BUSYBOX_PACKAGE = "busybox-static"
#: What /init loads, by module name; their dependencies are added (and loaded first).
MODULES = ("virtio_pci", "virtio_blk", "virtio_console")
AGENT_PORT = "org.qemu.guest_agent.0"
#: Libraries go here in the guest; init points qemu-ga's loader at it explicitly.
LIBDIR = "lib/x86_64-linux-gnu"
LOADER = "lib64/ld-linux-x86-64.so.2"  # qemu-ga's PT_INTERP on amd64

# PID 1 of the guest. Everything it says goes to the serial console (console.log on the host),
# prefixed "snapfs-guest:", so a failing test shows how far the guest got. Kernel command line:
# snapfs.noagent=1 (do not start qemu-ga), snapfs.disk=NAME (default vda).
INIT = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
say() { echo "snapfs-guest: $*"; }
# poweroff -f makes QEMU exit at once (-no-reboot), so a test fails now, not at its timeout.
fail() { say "init: FAILED: $*"; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/virtio-ports /data
arg() {
    for w in $(cat /proc/cmdline); do
        case $w in "$1"=*) echo "${w#*=}"; return;; esac
    done
}
# Bounded (30 s): devices appear asynchronously after insmod (PCI probe, virtio PORT_ADD).
wait_for() {
    i=0
    until "$@"; do
        i=$((i + 1))
        [ $i -gt 300 ] && return 1
        usleep 100000
    done
}
# No udev here: find the agent's port by its name, as udev's /dev/virtio-ports/NAME link would.
agent_port() {
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = AGENT_PORT ] && port=${p##*/} && return 0
    done
    return 1
}
say "init: kernel $(uname -r)"
for m in $(cat /etc/snapfs-modules); do
    insmod "/lib/modules/$m.ko" || fail "insmod $m"
done
disk=/dev/$(arg snapfs.disk)
[ "$disk" = /dev/ ] && disk=/dev/vda
wait_for test -b "$disk" || fail "no $disk"
mount -t ext4 "$disk" /data || fail "mount $disk"
say "init: $disk mounted at /data"

# The writer: an application that never stops writing. Each file's name holds the SHA-256 of
# its content and is renamed into place only once complete, so in a consistent snapshot every
# f<slot>.<sha256> holds exactly those bytes; "big" is rewritten in place, "log" appended to.
writer() {
    mkdir -p /data/w && cd /data/w || fail "writer: no /data/w"
    n=0
    say "writer: started"
    while :; do
        n=$((n + 1))
        slot=$((n % 16))
        dd if=/dev/urandom of=tmp bs=4096 count=$((n % 32 + 1)) 2>/dev/null
        sum=$(sha256sum tmp)
        sum=${sum%% *}
        rm -f f$slot.*
        mv tmp f$slot.$sum
        dd if=/dev/urandom of=big bs=4096 count=4 seek=$((n * 4 % 256)) conv=notrunc 2>/dev/null
        echo "$n f$slot.$sum" >> log
        [ $((n % 4096)) -eq 0 ] && mv log log.old
        [ $((n % 16)) -eq 0 ] && sync
        [ $((n % 64)) -eq 0 ] && say "writer: $n"
    done
}
writer &

if [ "$(arg snapfs.noagent)" = 1 ]; then
    say "init: qemu-ga not started (snapfs.noagent=1)"
else
    wait_for agent_port || fail "no virtio port AGENT_PORT"
    ln -sf "../$port" /dev/virtio-ports/AGENT_PORT
    (
        LD_LIBRARY_PATH=/LIBDIR qemu-ga -m virtio-serial -p /dev/virtio-ports/AGENT_PORT \
            -t /run -f /run/qemu-ga.pid
        say "init: qemu-ga exited with status $?"
    ) &
    say "init: qemu-ga started on /dev/$port"
fi
say "init: ready"
# PID 1 must never exit (the kernel would panic) and reaps whatever is reparented to it.
while :; do
    wait
    usleep 1000000
done
""".replace("AGENT_PORT", AGENT_PORT).replace("LIBDIR", LIBDIR)

#: Bump when the recipe changes in a way the hash below cannot see.
RECIPE_VERSION = 1


def _recipe_hash() -> str:
    recipe = [RECIPE_VERSION, KERNEL_PACKAGE, AGENT_PACKAGE, BUSYBOX_PACKAGE, MODULES, INIT]
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]


class GuestBuildError(RuntimeError):
    """The guest could not be built (no network, no apt, a package changed shape)."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel and initramfs, and what went into them (``info``)."""

    kernel: Path
    initrd: Path
    info: dict[str, Any]


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def build_guest(cache: Path | None = None, *, verbose: bool = False) -> GuestImage:
    """The cached guest, built first if missing or built from another recipe.

    Safe to call from concurrent test sessions: builds are serialised by a lock file, and the
    results are renamed into place, so a reader never sees half a kernel or initramfs.
    """
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        image = _cached(cache)
        if image is not None:
            return image
        start = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="build-", dir=cache) as tmp:
            info = _build(Path(tmp), verbose=verbose)
            info["build_seconds"] = round(time.monotonic() - start, 1)
            for name in ("vmlinuz", "initrd.gz"):
                os.replace(Path(tmp) / name, cache / name)
            _write_atomic(cache / "guest.json", json.dumps(info, indent=1, sort_keys=True))
    image = _cached(cache)
    assert image is not None
    return image


def _cached(cache: Path) -> GuestImage | None:
    try:
        info = json.loads((cache / "guest.json").read_text())
    except (OSError, ValueError):
        return None
    kernel, initrd = cache / "vmlinuz", cache / "initrd.gz"
    if info.get("recipe") != _recipe_hash() or not (kernel.exists() and initrd.exists()):
        return None
    return GuestImage(kernel, initrd, info)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _run(cmd: list[str], **kw: Any) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    out: str = proc.stdout
    return out


# -- packages ------------------------------------------------------------------------------------


def _apt_download(names: list[str], dest: Path) -> None:
    """``apt-get download`` into ``dest``; ``apt-get update`` once if apt knows no candidate."""
    # Sandbox user root: apt's _apt user may not be able to write into dest.
    cmd = ["apt-get", "-q", "-o", "APT::Sandbox::User=root", "download", *names]
    try:
        _run(cmd, cwd=dest)
    except GuestBuildError as first:
        try:
            _run(["apt-get", "-q", "update"])
            _run(cmd, cwd=dest)
        except GuestBuildError as err:
            raise GuestBuildError(
                f"cannot download {' '.join(names)} from Debian's archive (no network?): "
                f"{err} (first attempt: {first})"
            ) from err


def _deb_field(deb: Path, name: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), name]).strip()


def _depends(deb: Path) -> list[str]:
    """Package names a .deb depends on (first of each alternative; versions dropped)."""
    names = []
    for dep in _deb_field(deb, "Depends").split(","):
        first = dep.split("|")[0].strip()
        if first:
            names.append(re.split(r"[\s:(]", first, maxsplit=1)[0])
    return names


def _fetch_closure(roots: list[str], dest: Path) -> dict[str, Path]:
    """Download ``roots`` and the library packages they depend on, recursively: package -> .deb.

    Only ``lib*`` packages are followed: what a binary loads comes from those; the others
    (Pre-Depends, perl, init-system-helpers) serve maintainer scripts that never run here.
    ``_libraries`` then checks that nothing is missing."""
    debs: dict[str, Path] = {}
    want = list(roots)
    while want:
        _apt_download(want, dest)
        for deb in dest.glob("*.deb"):
            debs.setdefault(_deb_field(deb, "Package"), deb)
        missing = [n for n in want if n not in debs]
        if missing:
            raise GuestBuildError(f"apt-get download gave no .deb for {missing}")
        deps = {d for n in want for d in _depends(debs[n]) if d.startswith("lib")}
        want = sorted(deps - debs.keys())
    return debs


# -- kernel modules ------------------------------------------------------------------------------


def _modinfo(ko: Path) -> dict[str, str]:
    """The ``.modinfo`` section of a (not compressed) ELF64 kernel module."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise GuestBuildError(f"{ko}: not an ELF64 module (compressed modules are not handled)")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        if data[stroff + name : data.index(b"\0", stroff + name)] == b".modinfo":
            fields = data[offset : offset + size].split(b"\0")
            return dict(f.decode().split("=", 1) for f in fields if b"=" in f)
    return {}


def _modules_in_load_order(moddir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """The .ko files for ``wanted`` and their dependencies, each after what it depends on.
    Modules built into the kernel are left out."""
    by_name = {ko.name.removesuffix(".ko").replace("-", "_"): ko for ko in moddir.rglob("*.ko")}
    builtin = {
        Path(line.strip()).name.removesuffix(".ko").replace("-", "_")
        for line in (moddir / "modules.builtin").read_text().splitlines()
    }
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        ko = by_name.get(name)
        if ko is None:
            raise GuestBuildError(f"kernel module {name} not found in {moddir}")
        for dep in filter(None, _modinfo(ko).get("depends", "").split(",")):
            visit(dep)
        order.append(ko)

    for name in wanted:
        visit(name)
    return order


# -- shared libraries ----------------------------------------------------------------------------


def _libraries(root: Path, binary: Path) -> dict[str, Path]:
    """soname -> file in ``root`` for what ``binary`` needs, resolved by the loader from the
    extracted packages (``--list``), never from the host's libraries."""
    loader = root / LOADER
    if not loader.exists():
        raise GuestBuildError(f"no dynamic loader at {loader}")
    libpath = ":".join(
        str(d) for d in (root / LIBDIR, root / "usr" / LIBDIR, root / "lib", root / "usr/lib")
    )
    out = _run([str(loader), "--library-path", libpath, "--list", str(binary)])
    libs: dict[str, Path] = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) => (.*?) \(0x", line)
        if not m or "/" in m.group(1):  # the loader itself: copied by the caller
            continue
        if m.group(2) == "not found" or not m.group(2).startswith(str(root)):
            raise GuestBuildError(f"{binary.name} needs {m.group(1)}, not in the packages: {line}")
        libs[m.group(1)] = Path(m.group(2))
    if not libs:
        raise GuestBuildError(f"the loader found no libraries for {binary}: {out}")
    return libs


# -- initramfs -----------------------------------------------------------------------------------


class Cpio:
    """A cpio archive in the "newc" format the kernel unpacks; device nodes and ownership come
    from the archive, so building one needs neither root nor the cpio tool."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.ino = 0
        self.dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self.ino += 1
        fields = (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
        self.out += b"070701" + b"".join(b"%08X" % f for f in fields) + name.encode() + b"\0"
        self.out += b"\0" * (-len(self.out) % 4) + data
        self.out += b"\0" * (-len(self.out) % 4)

    def dir(self, name: str) -> None:
        parent = os.path.dirname(name)
        if parent and parent not in self.dirs:
            self.dir(parent)
        if name not in self.dirs:
            self.dirs.add(name)
            self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name))
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name))
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self.dir(os.path.dirname(name))
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.out)


def _build(work: Path, *, verbose: bool) -> dict[str, Any]:
    """Download, extract and assemble; leaves ``vmlinuz`` and ``initrd.gz`` in ``work``."""

    def step(msg: str) -> None:
        if verbose:
            print(f"guest: {msg}", file=sys.stderr, flush=True)

    debs_dir, root = work / "debs", work / "root"
    debs_dir.mkdir()
    root.mkdir()
    step(f"resolving {KERNEL_PACKAGE}")
    _apt_download([KERNEL_PACKAGE], debs_dir)
    meta = next(debs_dir.glob(f"{KERNEL_PACKAGE}_*.deb"))
    kernel_pkg = next((d for d in _depends(meta) if d.startswith("linux-image-")), None)
    if kernel_pkg is None:
        raise GuestBuildError(f"{KERNEL_PACKAGE} depends on no linux-image-*: {_depends(meta)}")
    meta.unlink()
    step(f"downloading {kernel_pkg}, {BUSYBOX_PACKAGE}, {AGENT_PACKAGE} and its dependencies")
    debs = _fetch_closure([AGENT_PACKAGE, BUSYBOX_PACKAGE], debs_dir)
    # The kernel alone: its dependencies (kmod, initramfs-tools) are for installing it.
    _apt_download([kernel_pkg], debs_dir)
    debs[kernel_pkg] = next(debs_dir.glob(f"{kernel_pkg}_*.deb"))
    versions = {name: _deb_field(deb, "Version") for name, deb in sorted(debs.items())}
    step("extracting " + " ".join(sorted(debs)))
    for deb in debs.values():
        _run(["dpkg-deb", "-x", str(deb), str(root)])

    (kver,) = (d.name for d in (root / "lib/modules").iterdir())
    cpio = Cpio()
    for d in ("proc", "sys", "dev", "run", "tmp", "data", "etc", "lib/modules"):
        cpio.dir(d)
    cpio.symlink("var/run", "../run")
    cpio.chardev("dev/console", 5, 1)  # init's stdio before devtmpfs is mounted

    busybox = root / "bin/busybox"
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    applets = _run([str(busybox), "--list-full"]).split()
    for path in applets:
        if path != "bin/busybox":
            cpio.symlink(path, "/bin/busybox")

    modules = _modules_in_load_order(root / "lib/modules" / kver, MODULES)
    for ko in modules:
        cpio.file(f"lib/modules/{ko.stem}.ko", ko.read_bytes())
    cpio.file("etc/snapfs-modules", "".join(f"{ko.stem}\n" for ko in modules).encode())

    qga = root / "usr/sbin/qemu-ga"
    cpio.file("usr/sbin/qemu-ga", qga.read_bytes(), 0o755)
    libs = _libraries(root, qga)
    for soname, lib in sorted(libs.items()):
        cpio.file(f"{LIBDIR}/{soname}", lib.resolve().read_bytes(), 0o755)
    loader = (root / LOADER).resolve()
    cpio.file(f"{LIBDIR}/{loader.name}", loader.read_bytes(), 0o755)
    if f"{LIBDIR}/{loader.name}" != LOADER:
        cpio.symlink(LOADER, f"/{LIBDIR}/{loader.name}")
    cpio.file("init", INIT.encode(), 0o755)

    step("writing the initramfs")
    with gzip.open(work / "initrd.gz", "wb", compresslevel=6) as f:
        f.write(cpio.finish())
    shutil.copyfile(root / f"boot/vmlinuz-{kver}", work / "vmlinuz")
    return {
        "recipe": _recipe_hash(),
        "kernel": kver,
        "kernel_package": f"{kernel_pkg} {versions[kernel_pkg]}",
        "qemu_ga": versions[AGENT_PACKAGE],
        "busybox": versions[BUSYBOX_PACKAGE],
        "modules": [ko.stem for ko in modules],
        "libraries": sorted(libs),
        "packages": versions,
        "initrd_bytes": (work / "initrd.gz").stat().st_size,
    }


# -- the guest's agent channel -------------------------------------------------------------------


class AgentClient:
    """A minimal synchronous guest agent client: one connection, one command at a time.

    The agent behind the virtio-serial port serves one client at a time and QEMU accepts one
    connection on the socket: close this before anything else (snapfs) connects.
    """

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.buf = bytearray()
        self.ids = int.from_bytes(os.urandom(3), "big")
        try:
            self.sock.connect(str(path))
            self.sync()
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _more(self) -> None:
        chunk = self.sock.recv(65536)  # socket.timeout (a TimeoutError) when the agent is mute
        if not chunk:
            raise EOFError("the guest agent socket was closed")
        self.buf += chunk

    def _line(self) -> bytes:
        while (end := self.buf.find(b"\n")) < 0:
            self._more()
        line = bytes(self.buf[:end])
        del self.buf[: end + 1]
        return line

    def sync(self) -> None:
        """0xFF resets the agent's parser; its reply to guest-sync-delimited follows a 0xFF, so
        whatever an earlier client left unread is dropped."""
        self.ids += 1
        req = {"execute": "guest-sync-delimited", "arguments": {"id": self.ids}}
        self.sock.sendall(b"\xff" + json.dumps(req).encode() + b"\n")
        while True:
            while (at := self.buf.find(b"\xff")) < 0:
                self.buf.clear()
                self._more()
            del self.buf[: at + 1]
            with contextlib.suppress(ValueError):
                if json.loads(self._line()).get("return") == self.ids:
                    return

    def cmd(self, name: str, **args: Any) -> Any:
        """Run a command; RuntimeError on an error reply."""
        req: dict[str, Any] = {"execute": name}
        if args:
            req["arguments"] = args
        self.sock.sendall(json.dumps(req).encode() + b"\n")
        while True:
            line = self._line().strip(b"\xff \r\t")
            if not line:
                continue
            msg = json.loads(line)
            if "error" in msg:
                raise RuntimeError(f"{name}: {msg['error']}")
            if "return" in msg:
                return msg["return"]


# -- the VM --------------------------------------------------------------------------------------


ACCEL_ENV = "SNAPFS_GUEST_ACCEL"


def accel() -> str:
    """The accelerator for the guest, "kvm" or "tcg": ``$SNAPFS_GUEST_ACCEL`` if set, else KVM
    when it can run a stock kernel."""
    forced = os.environ.get(ACCEL_ENV)
    if forced:
        return forced
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    # PVM (kvm_pvm, e.g. inside a Firecracker sandbox) runs only guest kernels built for it:
    # the stock kernel hangs as soon as it leaves real mode.
    if Path("/sys/module/kvm_pvm").exists():
        return "tcg"
    return "kvm"


class GuestVM(TestVM):
    """The real guest under QEMU, running (no ``-S``), with one ext4 disk ``virtio0`` (raw, made
    on the host) that snapfs snapshots like any other.

    The guest writes to its disk itself, so the disk is not modelled (``expected`` stays empty;
    ``guest_write`` and friends must not be used). ``agent=False`` boots without qemu-ga: the
    channel exists in QEMU but nothing in the guest answers it. ``iothread``: the disk is
    served by an I/O thread, which a running guest's virtio-blk driver puts to work.
    """

    START_PAUSED = False
    MEMORY_MIB = 256

    def __init__(
        self,
        workdir: Path,
        image: GuestImage,
        *,
        agent: bool = True,
        disk_size: int = 64 * MiB,
        iothread: bool = False,
    ) -> None:
        disk = DiskSpec("virtio0", "raw", "virtio", disk_size, modelled=False, iothread=iothread)
        super().__init__(workdir, [disk])
        self.image = image
        self.agent = agent
        self.agent_path = workdir / "qga.sock"
        self.console_path = workdir / "console.log"
        self.accel = accel()

    def create_images(self) -> None:
        super().create_images()
        disk = self.disks["virtio0"]
        # Fully initialised: no lazy inode-table init racing the guest's writer.
        _run(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "snapfs-guest",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                str(disk.path),
            ]
        )

    def qemu_args(self) -> list[str]:
        # The QEMU-10 chroot sees /tmp but not /var/cache: kernel and initramfs go to workdir.
        boot = {}
        for src in (self.image.kernel, self.image.initrd):
            dst = self.workdir / src.name
            if not dst.exists():
                try:
                    os.link(src, dst)
                except OSError:  # another file system
                    shutil.copyfile(src, dst)
            boot[src.name] = dst
        append = "console=ttyS0 panic=-1 loglevel=4"
        if not self.agent:
            append += " snapfs.noagent=1"
        return [
            *super().qemu_args(),
            "-accel",
            self.accel,
            "-kernel",
            str(boot[self.image.kernel.name]),
            "-initrd",
            str(boot[self.image.initrd.name]),
            "-append",
            append,
            "-no-reboot",
            "-serial",
            f"file:{self.console_path}",
            "-device",
            "virtio-serial-pci,id=vser0",
            "-chardev",
            f"socket,path={self.agent_path},server=on,wait=off,id=qga0",
            "-device",
            f"virtserialport,bus=vser0.0,chardev=qga0,name={AGENT_PORT}",
        ]

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"the guest's QEMU exited ({self.proc.returncode}); console:\n"
                f"{self.console()[-4000:]}\nqemu.log:\n"
                f"{(self.workdir / 'qemu.log').read_text(errors='replace')[-2000:]}"
            )

    def writer_progress(self) -> int:
        """The writer's last reported iteration (0: started, -1: not yet)."""
        counts = re.findall(r"^snapfs-guest: writer: (\d+|started)\r?$", self.console(), re.M)
        if not counts:
            return -1
        return 0 if counts[-1] == "started" else int(counts[-1])

    def _timeout(self, kvm: float) -> float:
        # TCG emulates the CPU instruction by instruction: everything in the guest is slower.
        return kvm if self.accel == "kvm" else kvm * 5

    def wait_writer(self, beyond: int, timeout: float | None = None) -> int:
        """Wait until the writer reports an iteration past ``beyond``; return it. (It reports
        every 64 iterations.)"""
        if timeout is None:
            timeout = self._timeout(30.0)

        def advanced() -> int | None:
            self._check_alive()
            n = self.writer_progress()
            return n if n > beyond else None

        try:
            value: int = poll(advanced, timeout, f"the guest's writer to pass {beyond}")
        except TimeoutError as err:
            raise TimeoutError(f"{err}; console:\n{self.console()[-3000:]}") from None
        return value

    @contextlib.contextmanager
    def agent_client(self, timeout: float = 10.0) -> Iterator[AgentClient]:
        """A connection to the guest's agent for the ``with`` body (closed after it)."""
        with AgentClient(self.agent_path, timeout) as client:
            yield client

    def agent_cmd(self, name: str, **args: Any) -> Any:
        """One agent command on a connection of its own."""
        with self.agent_client() as client:
            return client.cmd(name, **args)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until init is done, the writer has written, and (unless ``agent=False``) the
        agent answers guest-ping. Raises with the console's tail if the guest does not get
        there in ``timeout`` seconds (default: 60 with KVM, 300 with TCG)."""
        if timeout is None:
            timeout = self._timeout(60.0)
        deadline = time.monotonic() + timeout

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        def init_done() -> bool:
            self._check_alive()
            console = self.console()
            if "snapfs-guest: init: FAILED" in console:
                raise RuntimeError(f"the guest's init failed; console:\n{console[-4000:]}")
            return "snapfs-guest: init: ready" in console

        try:
            poll(init_done, left(), "the guest's init")
        except TimeoutError as err:
            raise TimeoutError(f"{err}; console:\n{self.console()[-4000:]}") from None
        self.wait_writer(0, left())
        if not self.agent:
            return

        def pinged() -> bool:
            self._check_alive()
            try:
                with self.agent_client(timeout=min(2.0, left())) as client:
                    client.cmd("guest-ping")
            except (OSError, EOFError):  # timeouts included: qemu-ga not listening yet
                return False
            return True

        try:
            poll(pinged, left(), "the guest agent to answer guest-ping")
        except TimeoutError as err:
            raise TimeoutError(f"{err}; console:\n{self.console()[-4000:]}") from None


def main() -> None:
    image = build_guest(verbose=True)
    print(json.dumps({"kernel": str(image.kernel), "initrd": str(image.initrd), **image.info}))


if __name__ == "__main__":
    main()
