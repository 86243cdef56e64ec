"""``make bench``: snapfs side by side with nbdfuse, QEMU's FUSE export and nbdcopy.

All tools read the SAME snapshot: snapfs is mounted first, and the references connect to the
NBD exports (or, for QEMU's FUSE export, the snapshot-access nodes) named in its state file.
Tools alternate within every round (the order rotates), the page cache is dropped before every
measured run, and only medians are reported: the machine is small and noisy.

Where the disk images live (``--images``): by default in memory (a directory on /dev/shm) when
the machine has room for them. Dropping the page cache before a run then still empties every
FUSE file's cache (what a tool could otherwise read from), but QEMU reads the images at memory
speed. From the machine's disk, QEMU's reads decided the result: on the 2-core machine this was
written on, QEMU's CPU seconds per GiB for the same bytes varied threefold from run to run, for
every tool alike, and drowned the differences between the readers, which are what this measures.
``--images disk`` measures with the storage instead.

A guest kernel with free page reporting (virtio-balloon) gives free memory back to its
hypervisor, and the first write to such a page then waits for the hypervisor. Every drop of the
page cache frees gigabytes, so each run that fills the page cache or writes into memory paid for
that by chance, whichever tool ran: the same ``cp`` of one view took several times as long in
some runs as in others. The bench raises the reporting order while it runs
(``hold_page_reporting``), writes the free memory once so that the hypervisor maps it before
the first run, restores the order at the end, and says so in the report's caption.

Workloads (docs/performance.md describes each): (a)-(c) sequential reads of full views, (d) an
incremental view's scattered 64 KiB regions (also read by libnbd straight from snapfs's export,
the ceiling, and, where a C compiler is installed, through the prototype of a compiled worker in
dev/cworker.c), (e) mount and umount, (f) peak RSS, (g) the guest's pause, (h) confined reads,
(i) a throttled disk, (j) small reads of a full view (a disk of random data, and a thin disk of
data and holes in turn that only (j) mounts), (k) ``snapfs copy`` of a full view against
``cp`` + ``sync``, (l) a 1 TiB disk with a million dirty extents.

Figures per run: wall time, bytes, CPU seconds of the reader (dd, cp, nbdcopy: from wait4) and
of the serving process (snapfs or nbdfuse: /proc/PID/stat deltas), and QEMU's CPU seconds
separately (QEMU is the NBD server of every tool and the FUSE server of its own export).

Invariant: whatever fails, every mount, nbdfuse, prototype worker and QEMU process started here
is gone when ``main`` returns (``Bench.close`` in ``finally``), and the number of runs is
bounded. SIGTERM and SIGHUP stop the bench as Ctrl-C does, through the same cleanup.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from dev.devvm import QEMU_IO, QEMU_ROOT_ENV, DiskSpec, MiB, TestVM, poll
from dev.readers import prefill

GiB = 1024 * MiB
TiB = 1024 * GiB
THROTTLE = 10_000_000  # bytes/s of the throttled disk in (i)
CLK_TCK = os.sysconf("SC_CLK_TCK")
REGION = 64 * 1024
#: (l): the disk's virtual size, and the distance between two of its dirty extents.
SCALE_SIZE = TiB
SCALE_STEP = MiB
#: The checkout this file belongs to: every Python process the bench starts imports snapfs and
#: dev from it (PYTHONPATH), whatever the working directory or an installed snapfs.
SOURCE_ROOT = Path(__file__).resolve().parents[1]
#: The checkout's packages whose code the bench's Python processes run.
PACKAGES = ("snapfs", "dev")

SNAPFS = "snapfs"
NBDFUSE = "nbdfuse"
QEMU_FUSE = "qemu-fuse"
NBDCOPY = "nbdcopy"
#: (d)'s prototype of a compiled worker (dev/cworker.c): not a product, see that file.
CWORKER = "cworker"
CWORKER_SOURCE = SOURCE_ROOT / "dev" / "cworker.c"
#: Regions of (d) the prototype's bytes are compared with the view's before it is measured.
CWORKER_CHECKED = 64
#: (d)'s ceiling: libnbd straight on the export, 16 requests in flight, buffers reused.
CEILING_REQUESTS = 16
CEILING = f"libnbd-{CEILING_REQUESTS}"
#: (d)'s readers with several pread threads.
PREAD_THREADS = 8
#: (j)'s and (k)'s tools.
DD_1M = "snapfs-dd1M"
DD_4K = "snapfs-dd4K"
TAR = "snapfs-tar"
TAR_IMAGE = "tar-image"
CP_SYNC = "cp+sync"
#: The tool each row of a workload is divided by in the ``ref_ratio`` column (MiB/s ÷ MiB/s).
REFERENCE = {"d-incr": CEILING, "j-small": DD_1M, "j-thin": DD_1M, "k-full": CP_SYNC}
#: (j)'s thin disk: this much random data, then a hole as long, in turn (less on tiny disks). GNU
#: tar archives a file with holes as sparse and reads its data 512 bytes at a time.
THIN_STEP = 4 * MiB


#: This machine's CPUs (steal is summed over them), and how often a run is measured again when the
#: hypervisor took more than ``--steal-limit`` of their time during it.
CPUS = os.cpu_count() or 1
STEAL_RETRIES = 2
#: A guest kernel with free page reporting hands free blocks of at least this order back to its
#: hypervisor, and the first write to such a page then waits for the hypervisor to map it again.
PAGE_REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
#: Orders to hold it at while measuring, highest first: one above the largest free block
#: (MAX_PAGE_ORDER, 10 on x86-64) reports nothing; where the kernel refuses that, 10 reports
#: only whole 4 MiB blocks.
HELD_ORDERS = (11, 10)
#: The order found and the one held, while held: a bench killed by SIGKILL cannot give the
#: order back, so the next one finds it here and gives back the one found before.
PAGE_REPORTING_RECORD = Path("/run/snapfs-bench-page-reporting.json")
#: The most free memory the bench writes once it holds the reporting (touch_free_memory), what
#: it leaves unwritten so that nothing else runs short meanwhile, and how long it may take.
TOUCHED_MEMORY = 64 * GiB
TOUCH_MARGIN = GiB
TOUCH_TIMEOUT = 600.0
#: The child that writes it: anonymous memory, so that if the kernel's estimate of what is
#: available was wrong, the OOM killer can take the child back (pages of a file on /dev/shm it
#: could not).
_TOUCH_CHILD = """
import mmap, sys
n = int(sys.argv[1])
m = mmap.mmap(-1, n)
chunk = bytes(8 << 20)
for off in range(0, n, len(chunk)):
    k = min(len(chunk), n - off)
    m[off : off + k] = chunk[:k]
print(n)
"""

#: Every workload's letter (see the module's docstring).
WORKLOADS = "abcdefghijkl"


def parse_size(text: str) -> int:
    """``2G``, ``512M``, ``64K`` or bytes."""
    units = {"K": 1024, "M": MiB, "G": GiB}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (none if the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return []


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (0 if it is gone)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK if fields else 0.0


def steal_seconds() -> float:
    """CPU time the hypervisor gave other guests, summed over this machine's CPUs (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / CLK_TCK if len(fields) > 8 else 0.0


def minor_faults(pid: int) -> int:
    """Minor page faults of a live process so far (0 if it is gone)."""
    fields = _stat(pid)
    return int(fields[7]) if fields else 0


def peak_rss(pid: int) -> int:
    """VmHWM of a live process, in bytes (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except FileNotFoundError:
        pass
    return 0


def _has_text(path: Path) -> bool:
    return path.exists() and bool(path.read_text().strip())


def hold_page_reporting(touch: int) -> tuple[str, str] | None:
    """Raise the guest's free page reporting order (see PAGE_REPORTING_ORDER) for the run, and
    write ``touch`` bytes of free memory once (touch_free_memory); the (old, held) values, or
    None if this kernel reports no free pages or refuses. Otherwise every run that fills the
    page cache or writes into memory pays for pages the hypervisor took back after the last
    drop of the page cache, by chance, whichever tool runs."""
    try:
        old = PAGE_REPORTING_ORDER.read_text().strip()
        current = int(old)
    except (OSError, ValueError):
        return None
    left = held_before(old)
    if left is not None:
        print(f"free page reporting was left at order {old} by a bench that was killed: {left}")
        old, current = left, int(left)
    for order in HELD_ORDERS:
        if current >= order:
            return None
        try:
            PAGE_REPORTING_ORDER.write_text(f"{order}\n")
        except OSError:
            continue
        try:
            PAGE_REPORTING_RECORD.write_text(json.dumps({"found": old, "held": str(order)}))
        except OSError as err:  # only a bench killed by SIGKILL needs it
            print(f"warning: cannot record the order held: {err}", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            done = touch_free_memory(touch)
        except BaseException:  # stopped meanwhile: nobody else would give the order back
            release_page_reporting((old, str(order)))
            raise
        print(
            f"free page reporting held at order {order} (from {old}); {done // MiB} MiB of free "
            f"memory written in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        return old, str(order)
    print(f"warning: cannot raise {PAGE_REPORTING_ORDER}", file=sys.stderr)
    return None


def held_before(current: str) -> str | None:
    """The order an earlier bench found, if it still holds ``current`` (it was killed before
    it gave the order back); a record that does not match is removed."""
    try:
        record = json.loads(PAGE_REPORTING_RECORD.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("held") == current:
        found = record.get("found")
        if isinstance(found, str) and found.isdigit():
            return found
    PAGE_REPORTING_RECORD.unlink(missing_ok=True)
    return None


def touch_free_memory(nbytes: int) -> int:
    """Write ``nbytes`` of memory once (at most TOUCHED_MEMORY, and what is available less
    TOUCH_MARGIN) in a child process and free it, so that the hypervisor maps the pages it took
    back now, not during a measured run; held (hold_page_reporting), they stay mapped. All of
    it, not what the runs need: which free pages the allocator hands out next is not which
    were freed last (half of the free memory written still left three of seven rounds paying).
    Returns the bytes written."""
    n = max(0, min(nbytes, mem_available() - TOUCH_MARGIN, TOUCHED_MEMORY)) // MiB * MiB
    if n == 0:
        return 0
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _TOUCH_CHILD, str(n)],
            capture_output=True,
            text=True,
            timeout=TOUCH_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        print(f"warning: writing free memory took over {TOUCH_TIMEOUT:.0f} s", file=sys.stderr)
        return 0
    if proc.returncode != 0 or proc.stdout.strip() != str(n):
        # killed (out of memory after all): fewer pages mapped, the runs stay right
        print(f"warning: writing free memory failed ({proc.returncode})", file=sys.stderr)
        return 0
    return n


def release_page_reporting(held: tuple[str, str] | None) -> None:
    """Give back the order ``hold_page_reporting`` found (None: nothing was held)."""
    if held is not None:
        try:
            PAGE_REPORTING_ORDER.write_text(f"{held[0]}\n")
        except OSError as err:
            print(f"warning: cannot restore {PAGE_REPORTING_ORDER}: {err}", file=sys.stderr)
            return  # the record lets the next bench try again
        PAGE_REPORTING_RECORD.unlink(missing_ok=True)


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as err:  # not root, or a container: say so once in the output
        print(f"warning: cannot drop the page cache: {err}", file=sys.stderr)


@dataclass
class Run:
    """One measured run of one tool on one workload."""

    workload: str
    tool: str
    round: int
    nbytes: int
    wall: float
    cpu_reader: float
    cpu_server: float
    cpu_qemu: float
    #: QEMU's minor page faults: it faults its read buffers in when its allocator maps them anew.
    qemu_faults: int = 0
    #: CPU seconds the hypervisor took from this machine during the run (all CPUs).
    steal: float = 0.0

    @property
    def mib_s(self) -> float:
        return self.nbytes / MiB / self.wall

    @property
    def cpu_per_gib(self) -> float:
        return (self.cpu_reader + self.cpu_server) / (self.nbytes / GiB)

    @property
    def qemu_per_gib(self) -> float:
        return self.cpu_qemu / (self.nbytes / GiB)


@dataclass
class Results:
    args: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    #: Runs measured again because the hypervisor took too much of the CPUs (not in the medians).
    repeated: list[Run] = field(default_factory=list)
    mount_s: list[float] = field(default_factory=list)
    umount_s: list[float] = field(default_factory=list)
    rss: dict[str, list[int]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    dirty_regions: int = 0
    # (g) guest pause at the snapshot point, ms: full views and incremental (reuse) views.
    pause_ms: dict[str, list[float]] = field(default_factory=dict)
    # The QEMU measured, and whether snapfs confines its reads there by default.
    qemu: str = ""
    confined: bool = False
    #: (l): dirty extents of the 1 TiB disk, and per round the wall time of ``snapfs mount``
    #: and of ``cat`` of the sidecar, and the serving process's peak RSS (bytes).
    scale_extents: int = 0
    scale_mount_s: list[float] = field(default_factory=list)
    scale_cat_s: list[float] = field(default_factory=list)
    scale_rss: list[int] = field(default_factory=list)
    #: (l): how long the offline qemu-io took to make the extents, and the image's size after.
    scale_setup_s: float = 0.0
    scale_image_bytes: int = 0
    #: The guest's free page reporting order before the run and while it ran (see
    #: hold_page_reporting), or empty if it was left alone.
    page_reporting: list[str] = field(default_factory=list)


def _wait_all(procs: Sequence[subprocess.Popen[bytes]]) -> float:
    """Wait for the processes; fail if one failed; return their CPU seconds (wait4 rusage)."""
    cpu = 0.0
    failed = []
    for proc in procs:
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu += usage.ru_utime + usage.ru_stime
        if proc.returncode != 0:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            failed.append(f"{proc.args!r} exited {proc.returncode}: {err.strip()}")
    if failed:
        raise RuntimeError("; ".join(failed))
    return cpu


def images_in_memory(choice: str, nbytes: int) -> bool:
    """Whether ``nbytes`` of images go to /dev/shm: ``memory``, ``disk``, or ``auto`` (memory
    if /dev/shm has room for them and the machine half as much again to spare)."""
    if choice != "auto":
        return choice == "memory"
    try:
        free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return False
    available = mem_available()
    return free >= nbytes + GiB and available >= nbytes * 3 // 2 + 2 * GiB


def mem_available() -> int:
    """The kernel's estimate of the memory available without swapping (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            return next(
                int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")
            )
    except (OSError, StopIteration, ValueError):
        return 0


def thin_step(size: int) -> int:
    """The length of each stretch of data and of each hole of a thin disk of ``size`` bytes: a
    multiple of 64 KiB, THIN_STEP at most, and at least two of each on a disk of 256 KiB or more."""
    return max(REGION, min(THIN_STEP, size // 4 // REGION * REGION))


class BenchVM(TestVM):
    """A TestVM whose disks are written with random data in chunks, never held in memory,
    into ``image_dir``; the disks named in ``thin`` get data and holes in turn (thin_step)."""

    def __init__(
        self,
        workdir: Path,
        disks: list[DiskSpec],
        *,
        seed: int,
        image_dir: Path,
        thin: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir, disks, seed=seed)
        self.image_dir = image_dir
        self.thin = set(thin)

    def create_images(self) -> None:
        rng = random.Random(self.seed)
        for disk in self.disks.values():
            raw = self.image_dir / f"{disk.name}.init.raw"
            # Random data everywhere, or on a thin disk every other stretch of step bytes.
            chunk, step = (thin_step(disk.size),) * 2 if disk.name in self.thin else (16 * MiB, 0)
            with open(raw, "wb") as f:
                for pos in range(0, disk.size, chunk):
                    if step and pos // step % 2:
                        continue
                    f.seek(pos)
                    f.write(rng.randbytes(min(chunk, disk.size - pos)))
                f.truncate(disk.size)
            self.expected[disk.name] = bytearray()  # not tracked: the bench checks no content
            disk.path = self.image_dir / f"{disk.name}.{disk.fmt}"
            if disk.fmt == "raw":
                raw.rename(disk.path)
            else:
                subprocess.run(
                    [
                        "qemu-img",
                        "convert",
                        "-q",
                        "-f",
                        "raw",
                        "-O",
                        "qcow2",
                        str(raw),
                        str(disk.path),
                    ],
                    check=True,
                )
                raw.unlink()


class Bench:
    """Owns the VM, the snapfs mount and every reference mount; ``close`` undoes all of it.

    ``dest_dir`` is where (d) writes its copies (in memory, on /dev/shm, when there is room);
    (k) writes into the work directory, on the disk that holds it."""

    def __init__(
        self,
        args: argparse.Namespace,
        workdir: Path,
        image_dir: Path | None = None,
        dest_dir: Path | None = None,
    ) -> None:
        self.args = args
        self.workdir = workdir
        self.dest_dir = dest_dir or workdir
        self.size: int = args.size_bytes
        self.names = [f"virtio{i}" for i in range(args.disks)]
        #: (j)'s thin disk, left out of every other view (and of the names (a)-(k) read).
        self.thin = f"virtio{args.disks}" if "j" in args.only else ""
        self.run_dir = workdir / "r"  # short: QEMU's NBD socket lives below it (108-byte limit)
        self.mnt = workdir / "snapfs"
        path = os.environ.get("PYTHONPATH")
        self.env = dict(
            os.environ,
            SNAPFS_RUN_DIR=str(self.run_dir),
            SNAPFS_LOG_FILE=str(workdir / "snapfs.log"),
            PYTHONPATH=str(SOURCE_ROOT) + (f":{path}" if path else ""),
        )
        # Run from byte code, as an installed copy does (pip compiles at install): setup
        # compiles the checkout first, into its __pycache__ directories (ignored by git).
        self.env.pop("PYTHONDONTWRITEBYTECODE", None)
        self.vm = BenchVM(
            workdir,
            [
                DiskSpec(n, args.format, "virtio", size=self.size)
                for n in self.names + ([self.thin] if self.thin else [])
            ],
            seed=7,
            image_dir=image_dir or workdir,
            thin=[self.thin] if self.thin else [],
        )
        self.results = Results(args={k: v for k, v in vars(args).items() if k != "func"})
        self.state: dict[str, Any] = {}
        self.snapfs_pid = 0
        self.nbdfuse: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        self.qemu_fuse: dict[str, Path] = {}
        self.has_qemu_fuse = False
        self.cworker: tuple[subprocess.Popen[bytes], Path] | None = None

    # -- processes -------------------------------------------------------------------------------

    def snapfs(self, *argv: str, timeout: float = 600, env: dict[str, str] | None = None) -> float:
        """Run the snapfs CLI; return its wall time."""
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "snapfs", *argv],
            env={**self.env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(
                f"snapfs {' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}"
            )
        return wall

    def mount(self, *extra: str, env: dict[str, str] | None = None, thin: bool = False) -> float:
        """Mount the VM's view (without the thin disk unless ``thin``); return the wall time."""
        if self.thin and not thin:
            extra = (*extra, "--exclude", self.thin)
        self.mnt.mkdir(exist_ok=True)
        wall = self.snapfs(
            "mount",
            self.vm.vmid,
            str(self.mnt),
            "--qmp",
            str(self.vm.qmp_path),
            "--fleecing-dir",
            str(self.workdir / "fleecing"),
            *extra,
            env=env,
        )
        sdir = self.run_dir / ".state" / self.vm.vmid
        self.state = json.loads((sdir / "state.json").read_text())
        self.snapfs_pid = int((sdir / "pid").read_text())
        return wall

    def umount(self, *extra: str) -> float:
        wall = self.snapfs("umount", str(self.mnt), *extra)
        self.snapfs_pid = 0
        return wall

    def disk_state(self, name: str) -> dict[str, Any]:
        for d in self.state["graph"]["disks"]:
            if d["name"] == name:
                return dict(d)
        raise KeyError(name)

    def uri(self, name: str) -> str:
        sock = self.state["graph"]["nbd_socket"]
        return f"nbd+unix:///{self.disk_state(name)['export_name']}?socket={sock}"

    def start_nbdfuse(self, names: Sequence[str]) -> None:
        for name in names:
            mnt = self.workdir / "nbdfuse" / name
            mnt.mkdir(parents=True, exist_ok=True)
            pidfile = self.workdir / "nbdfuse" / f"{name}.pid"
            pidfile.unlink(missing_ok=True)
            # -r: read-only, as a backup reader would mount it. nbdfuse stays in the foreground.
            proc = subprocess.Popen(
                ["nbdfuse", "-r", "-P", str(pidfile), str(mnt / "disk"), self.uri(name)],
                stdin=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            self.nbdfuse[name] = (proc, mnt)
            poll(lambda p=pidfile: _has_text(p), 30, "nbdfuse to be ready")

    def stop_nbdfuse(self) -> None:
        for proc, mnt in self.nbdfuse.values():
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr:
                proc.stderr.close()
        self.nbdfuse.clear()

    def start_qemu_fuse(self, names: Sequence[str]) -> None:
        if not self.has_qemu_fuse:
            return
        for name in names:
            target = self.workdir / "qemu-fuse" / f"{name}.raw"
            target.parent.mkdir(exist_ok=True)
            target.touch()
            self.vm.qmp(
                "block-export-add",
                type="fuse",
                id=f"bench-fuse-{name}",
                **{"node-name": self.disk_state(name)["access_node"]},
                mountpoint=str(target),
                writable=False,
            )
            if os.environ.get(QEMU_ROOT_ENV):
                # QEMU mounts its export in its own mount namespace (dev.devvm runs it so):
                # the host reaches it through QEMU's root, not at the path QEMU was given.
                self.qemu_fuse[name] = Path(f"/proc/{self.vm.pid}/root") / target.relative_to("/")
            else:
                self.qemu_fuse[name] = target
            # What the readers will see must be the export, not the file under its mountpoint.
            with open(self.qemu_fuse[name], "rb") as f, open(self.mnt / f"{name}.raw", "rb") as g:
                if f.read(1 << 20) != g.read(1 << 20):
                    raise RuntimeError(f"QEMU's FUSE export of {name} does not read as the view")

    def stop_qemu_fuse(self) -> None:
        for name in list(self.qemu_fuse):
            with contextlib.suppress(RuntimeError):
                self.vm.qmp("block-export-del", id=f"bench-fuse-{name}")
            del self.qemu_fuse[name]
        if self.vm.monitor is not None:
            # Deletion is asynchronous: snapfs's teardown must not find the node still in use.
            poll(
                lambda: (
                    not any(
                        e["id"].startswith("bench-fuse-")
                        for e in self.vm.qmp("query-block-exports")
                    )
                ),
                30,
                "QEMU's FUSE exports to go away",
            )

    def start_cworker(self, name: str, regions: Path) -> bool:
        """Build and mount (d)'s prototype of a compiled worker on ``name``'s export; False (and
        why, in the results) if there is no C compiler. Its bytes must be the view's: the first
        CWORKER_CHECKED regions are compared before it is measured."""
        cc = shutil.which("cc") or shutil.which("gcc")
        if cc is None:
            self.results.unavailable[CWORKER] = "no C compiler"
            return False
        binary = self.workdir / "cworker"
        subprocess.run(
            [cc, "-O2", "-o", str(binary), str(CWORKER_SOURCE)],
            check=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
        mnt = self.workdir / "cworker-mnt"
        mnt.mkdir(exist_ok=True)
        sock = self.state["graph"]["nbd_socket"]
        proc = subprocess.Popen(
            [str(binary), str(mnt), sock, self.disk_state(name)["export_name"]],
            stdin=subprocess.DEVNULL,
        )
        self.cworker = (proc, mnt)
        poll(lambda: os.path.ismount(mnt) or proc.poll() is not None, 30, "cworker to mount")
        if proc.poll() is not None:
            raise RuntimeError(f"cworker exited with status {proc.returncode}")
        with (
            open(mnt / "f", "rb", buffering=0) as ours,
            open(self.mnt / f"{name}.raw", "rb", buffering=0) as view,
            open(regions) as lines,
        ):
            for _, line in zip(range(CWORKER_CHECKED), lines, strict=False):
                offset, length = (int(x) for x in line.split())
                if os.pread(ours.fileno(), length, offset) != os.pread(
                    view.fileno(), length, offset
                ):
                    raise RuntimeError(f"cworker read other bytes than the view at {offset}")
        return True

    def stop_cworker(self) -> None:
        if self.cworker is None:
            return
        proc, mnt = self.cworker
        self.cworker = None
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        """Undo everything, whatever state it is in. Never raises."""
        with contextlib.suppress(Exception):
            self.stop_cworker()
        with contextlib.suppress(Exception):
            self.stop_qemu_fuse()
        with contextlib.suppress(Exception):
            self.stop_nbdfuse()
        if self.snapfs_pid:
            try:
                self.umount()
            except Exception as err:
                print(f"bench: snapfs umount failed ({err}); killing it", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.snapfs_pid, 9)
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
                with contextlib.suppress(Exception):
                    self.snapfs("cleanup", self.vm.vmid, "--qmp", str(self.vm.qmp_path))
        self.vm.stop()

    # -- measuring -------------------------------------------------------------------------------

    def file_of(self, tool: str, name: str) -> str:
        if tool.startswith(SNAPFS):
            return str(self.mnt / f"{name}.raw")
        if tool == NBDFUSE:
            return str(self.nbdfuse[name][1] / "disk")
        if tool == QEMU_FUSE:
            return str(self.qemu_fuse[name])
        if tool == CWORKER and self.cworker is not None:
            return str(self.cworker[1] / "f")
        return self.uri(name)

    def server_pids(self, tool: str, names: Sequence[str]) -> list[int]:
        tool = tool.split("-")[0]  # (d)'s labels: "snapfs-copy", "nbdfuse-pread"
        if tool == SNAPFS:
            return [self.snapfs_pid]
        if tool == NBDFUSE:
            return [self.nbdfuse[n][0].pid for n in names]
        if tool == CWORKER and self.cworker is not None:
            return [self.cworker[0].pid]
        return []  # QEMU's FUSE export and nbdcopy: QEMU is the server, counted apart

    def reader(self, workload: str, tool: str, name: str) -> list[str]:
        src = self.file_of(tool, name)
        if tool == NBDCOPY:
            return ["nbdcopy", src, "null:"]
        if workload == "b-cp":
            return ["cp", "--sparse=always", src, "/dev/null"]
        return ["dd", f"if={src}", "of=/dev/null", "bs=1M", "iflag=direct", "status=none"]

    def argv(self, workload: str, tool: str) -> Callable[[str], list[str]]:
        return lambda name: self.reader(workload, tool, name)

    def measure(
        self,
        workload: str,
        tool: str,
        rnd: int,
        names: Sequence[str],
        argv: Callable[[str], list[str]],
        nbytes: int,
        *,
        servers: Sequence[int] | None = None,
        before: Callable[[], None] | None = None,
    ) -> Run:
        """Run one reader per disk in ``names`` at once and account for it. ``servers``: the
        serving processes whose CPU counts (by default those of ``tool``). ``before`` runs before
        every attempt: a run the hypervisor took more than ``--steal-limit`` of the CPUs from is
        measured again, STEAL_RETRIES times at most, and kept apart."""
        if servers is None:
            servers = self.server_pids(tool, names)
        for attempt in range(STEAL_RETRIES + 1):
            if before is not None:
                before()
            run = self._measure_once(workload, tool, rnd, names, argv, nbytes, servers)
            share = run.steal / (run.wall * CPUS)
            if share <= self.args.steal_limit or attempt == STEAL_RETRIES:
                break
            self.results.repeated.append(run)
            print(
                f"  round {rnd} {workload:10} {tool:13} {run.mib_s:8.0f} MiB/s  measured again: "
                f"the hypervisor took {share:.0%} of the CPUs",
                flush=True,
            )
        self.results.runs.append(run)
        print(
            f"  round {rnd} {workload:10} {tool:13} {run.mib_s:8.0f} MiB/s  "
            f"cpu {run.cpu_per_gib:5.2f} s/GiB  qemu {run.qemu_per_gib:5.2f} s/GiB  "
            f"steal {run.steal:4.2f} s",
            flush=True,
        )
        return run

    def _measure_once(
        self,
        workload: str,
        tool: str,
        rnd: int,
        names: Sequence[str],
        argv: Callable[[str], list[str]],
        nbytes: int,
        servers: Sequence[int],
    ) -> Run:
        if not self.args.no_drop_caches:
            drop_caches()
        s0 = sum(cpu_seconds(p) for p in servers)
        q0 = cpu_seconds(self.vm.pid)
        f0 = minor_faults(self.vm.pid)
        st0 = steal_seconds()
        t0 = time.perf_counter()
        procs = [
            subprocess.Popen(
                argv(n),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for n in names
        ]
        try:
            cpu_reader = _wait_all(procs)
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    proc.wait()
                if proc.stderr:
                    proc.stderr.close()
        wall = time.perf_counter() - t0
        return Run(
            workload,
            tool,
            rnd,
            nbytes,
            wall,
            cpu_reader,
            sum(cpu_seconds(p) for p in servers) - s0,
            cpu_seconds(self.vm.pid) - q0,
            minor_faults(self.vm.pid) - f0,
            steal_seconds() - st0,
        )

    # -- the phases ------------------------------------------------------------------------------

    def setup(self) -> None:
        t0 = time.perf_counter()
        print(
            f"creating {len(self.names)} disk(s) of {self.size // MiB} MiB of random data "
            + ("and a thin one " if self.thin else "")
            + f"in {self.vm.image_dir}",
            flush=True,
        )
        self.vm.start()
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", *(str(SOURCE_ROOT / d) for d in PACKAGES)],
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
            timeout=300,
        )
        schema = self.vm.qmp("query-qmp-schema")
        self.has_qemu_fuse = any(
            e.get("meta-type") == "enum"
            and "fuse" in e.get("values", [])
            and "nbd" in e.get("values", [])
            for e in schema
        )
        if not self.has_qemu_fuse:
            self.results.unavailable[QEMU_FUSE] = "this QEMU build has no FUSE export"
        self.results.qemu = self.vm.qemu_version()
        major, minor = (int(x) for x in self.results.qemu.split(".")[:2])
        self.results.confined = (major, minor) < (8, 0)
        print(
            f"VM ready in {time.perf_counter() - t0:.1f} s (QEMU {self.results.qemu})", flush=True
        )

    def rounds(self) -> None:
        tools = [SNAPFS, NBDFUSE] + ([QEMU_FUSE] if self.has_qemu_fuse else []) + [NBDCOPY]
        first = self.names[0]
        for rnd in range(self.args.rounds):
            print(f"round {rnd + 1}/{self.args.rounds}", flush=True)
            drop_caches()
            self.results.mount_s.append(self.mount())
            try:
                self.start_nbdfuse(self.names)
                self.start_qemu_fuse(self.names)
                order = tools[rnd % len(tools) :] + tools[: rnd % len(tools)]
                for tool in order:
                    self.measure("a-dd", tool, rnd, [first], self.argv("a-dd", tool), self.size)
                    if tool == SNAPFS:
                        self.results.rss.setdefault(SNAPFS, []).append(peak_rss(self.snapfs_pid))
                    elif tool == NBDFUSE:
                        self.results.rss.setdefault(NBDFUSE, []).append(
                            peak_rss(self.nbdfuse[first][0].pid)
                        )
                for tool in order:
                    if tool != NBDCOPY:  # cp needs a file
                        self.measure("b-cp", tool, rnd, [first], self.argv("b-cp", tool), self.size)
                for tool in order:
                    self.measure(
                        "c-parallel",
                        tool,
                        rnd,
                        self.names,
                        self.argv("c-parallel", tool),
                        self.size * len(self.names),
                    )
            finally:
                self.stop_qemu_fuse()
                self.stop_nbdfuse()
            self.results.umount_s.append(self.umount())
            print(
                f"  mount {self.results.mount_s[-1]:.2f} s, "
                f"umount {self.results.umount_s[-1]:.2f} s",
                flush=True,
            )

    def confinement(self) -> None:
        """(h): what confining every NBD request to one copy-before-write cluster costs (what
        QEMU before 8.0 needs, see snapfs.qmp.confine_reads): snapfs as it reads on this QEMU
        against snapfs forced to confine (SNAPFS_CONFINE_READS=1), and against snapfs with
        1 MiB fleecing clusters (``--fleecing-cluster 1M``: where reads are confined, to
        1 MiB), alternated, for (a) and (c). On a QEMU before 8.0 the first two confine to
        64 KiB: run with --qemu-root to measure on a newer one."""
        first = self.names[0]
        kinds: list[tuple[str, tuple[str, ...], dict[str, str] | None]] = [
            (SNAPFS, (), None),
            (f"{SNAPFS}-confined", (), {"SNAPFS_CONFINE_READS": "1"}),
            (f"{SNAPFS}-1M", ("--fleecing-cluster", "1M"), None),
        ]
        for rnd in range(self.args.rounds):
            turn = rnd % len(kinds)
            for tool, extra, env in kinds[turn:] + kinds[:turn]:
                self.mount(*extra, env=env)
                try:
                    self.measure("h-a", tool, rnd, [first], self.argv("a-dd", tool), self.size)
                    self.measure(
                        "h-c",
                        tool,
                        rnd,
                        self.names,
                        self.argv("c-parallel", tool),
                        self.size * len(self.names),
                    )
                finally:
                    self.umount()

    def throttled(self) -> None:
        """(i): a disk behind a throttle node (10 MB/s, as Proxmox VE 9 puts on every disk)
        reads as fast as one without: snapfs's filter sits below the throttle."""
        size = min(self.size, 256 * MiB)
        workdir = self.workdir / "thr"
        workdir.mkdir()
        vm = BenchVM(
            workdir,
            [
                DiskSpec("virtio0", self.args.format, "virtio", size=size),
                DiskSpec("virtio1", self.args.format, "virtio", size=size, throttle=THROTTLE),
            ],
            seed=8,
            image_dir=self.vm.image_dir,
        )
        mnt = workdir / "mnt"
        mnt.mkdir()
        vm.start()
        try:
            self.snapfs(
                "mount",
                vm.vmid,
                str(mnt),
                "--qmp",
                str(vm.qmp_path),
                "--fleecing-dir",
                str(workdir / "fleecing"),
            )
            try:
                tools = [(SNAPFS, "virtio0"), (f"{SNAPFS}-throttled", "virtio1")]
                for rnd in range(self.args.rounds):
                    for tool, name in tools[rnd % 2 :] + tools[: rnd % 2]:
                        if not self.args.no_drop_caches:
                            drop_caches()
                        t0 = time.perf_counter()
                        subprocess.run(
                            [
                                "dd",
                                f"if={mnt / name}.raw",
                                "of=/dev/null",
                                "bs=1M",
                                "iflag=direct",
                                "status=none",
                            ],
                            check=True,
                            timeout=size / THROTTLE * 4 + 60,
                        )
                        wall = time.perf_counter() - t0
                        self.results.runs.append(
                            Run("i-throttled", tool, rnd, size, wall, 0.0, 0.0, 0.0)
                        )
                        print(
                            f"  round {rnd} i-throttled {tool:16} {size / MiB / wall:8.0f} MiB/s",
                            flush=True,
                        )
            finally:
                self.snapfs("umount", str(mnt))
        finally:
            vm.stop()
            for d in vm.disks.values():
                d.path.unlink(missing_ok=True)

    def pause(self) -> None:
        """(g): how long a running guest stays paused at the snapshot point, for a full view
        and for an incremental one (the bitmap hand-over happens inside the pause)."""
        self.vm.qmp("cont")  # no guest OS: the firmware idles, which is all a pause needs
        incremental = ("--incremental", "pause")
        self.mount(*incremental)  # the first one creates the bitmaps the others reuse
        self.umount("--commit")
        for _ in range(self.args.rounds):
            for kind, extra in (("full", ()), ("incremental", incremental)):
                self.mount(*extra)
                facts = json.loads((self.mnt / "snapfs.json").read_text())
                self.umount("--commit")
                self.results.pause_ms.setdefault(kind, []).append(float(facts["pause_ms"]))

    def incremental(self) -> None:
        """(d): an incremental view with scattered 64 KiB dirty regions, copied into memory by
        the reference provider, by pread/pwrite loops (one thread and several) through snapfs
        and through nbdfuse, and read by libnbd straight from snapfs's export with 16 requests
        in flight (the ceiling: no FUSE, no destination)."""
        first = self.names[0]
        exclude = [a for n in self.names[1:] for a in ("--exclude", n)]
        dest = self.dest_dir / "backup"
        shutil.rmtree(dest, ignore_errors=True)
        print("(d) full backup of the incremental chain's base", flush=True)
        self.mount("--incremental", "bench", *exclude)
        self.snapfs("copy", str(self.mnt), str(dest))
        self.umount("--commit")
        slots = self.size // REGION
        # Every other 64 KiB slot at most, so no two dirty regions touch and merge.
        count = min(self.args.dirty_regions, slots // 2)
        picks = sorted(random.Random(3).sample(range(slots // 2), count))
        print(f"(d) {count} guest writes of 64 KiB", flush=True)
        qom = self.vm.disks[first].qemu_io_target
        for i, slot in enumerate(picks):
            out = self.vm.hmp(
                f'qemu-io {qom} "write -P {i % 250 + 1} {slot * 2 * REGION} {REGION}"'
            )
            if out.strip():
                raise RuntimeError(f"guest write failed: {out.strip()}")
        self.mount("--incremental", "bench", *exclude)
        try:
            facts = json.loads((self.mnt / "snapfs.json").read_text())
            disk = facts["disks"][first]
            if disk["bitmap"]["mode"] != "reuse":
                raise RuntimeError(f"expected an incremental (reuse) view, got {disk['bitmap']}")
            self.results.dirty_regions = disk["dirty_regions"]
            nbytes = disk["dirty_bytes"]
            regions = self.workdir / "regions.txt"
            shutil.copyfile(self.mnt / f"{first}.dirty", regions)
            self.start_nbdfuse([first])
            ref = self.dest_dir / "ref.raw"
            prefill(str(regions), str(ref))
            has_cworker = self.start_cworker(first, regions)
            readers = [sys.executable, "-m", "dev.readers"]

            def pread(tool: str, threads: int) -> Callable[[str], list[str]]:
                return lambda n: [
                    *readers,
                    "pread",
                    self.file_of(tool, n),
                    str(regions),
                    str(ref),
                    "--threads",
                    str(threads),
                ]

            runs: list[tuple[str, Callable[[str], list[str]]]] = [
                (
                    "snapfs-copy",
                    lambda n: [sys.executable, "-m", "snapfs", "copy", str(self.mnt), str(dest)],
                ),
                (
                    CEILING,
                    lambda n: [
                        *readers,
                        "nbd",
                        self.uri(n),
                        str(regions),
                        "--requests",
                        str(CEILING_REQUESTS),
                    ],
                ),
                ("snapfs-pread", pread(SNAPFS, 1)),
                (f"snapfs-pread{PREAD_THREADS}", pread(SNAPFS, PREAD_THREADS)),
                ("nbdfuse-pread", pread(NBDFUSE, 1)),
                (f"nbdfuse-pread{PREAD_THREADS}", pread(NBDFUSE, PREAD_THREADS)),
            ]
            if has_cworker:
                runs.append((f"{CWORKER}-pread{PREAD_THREADS}", pread(CWORKER, PREAD_THREADS)))
            for rnd in range(self.args.rounds):
                for label, argv in runs[rnd % len(runs) :] + runs[: rnd % len(runs)]:
                    self.measure("d-incr", label, rnd, [first], argv, nbytes)
        finally:
            self.stop_cworker()
            self.stop_nbdfuse()
            shutil.rmtree(dest, ignore_errors=True)
            ref.unlink(missing_ok=True)
        self.umount()

    def small_reads(self) -> None:
        """(j): small sequential reads of a full view, which goes through the page cache with
        the kernel's read-ahead: ``dd bs=4K`` and ``tar --sparse`` (10 KiB reads, into a pipe:
        GNU tar does not read a file whose archive is /dev/null) against ``dd bs=1M``; and
        ``tar --sparse`` of the thin disk (which tar reads 512 bytes at a time, being sparse)
        against ``dd bs=1M`` of it."""
        first = self.names[0]
        tar = 'tar --sparse -cf - "$1" | cat >/dev/null'
        runs: list[tuple[str, str, str, list[str]]] = []  # workload, tool, disk, argv
        for workload, name in (("j-small", first), ("j-thin", self.thin)):
            if not name:
                continue
            src = str(self.mnt / f"{name}.raw")
            runs += [
                (
                    workload,
                    DD_1M,
                    name,
                    ["dd", f"if={src}", "of=/dev/null", "bs=1M", "status=none"],
                ),
                (workload, TAR, name, ["sh", "-c", tar, "sh", src]),
            ]
            if workload == "j-small":
                runs.insert(
                    1,
                    (
                        workload,
                        DD_4K,
                        name,
                        ["dd", f"if={src}", "of=/dev/null", "bs=4K", "status=none"],
                    ),
                )
            if self.args.images_in_memory and self.args.format == "raw":
                # tar's own speed: the same bytes from a file in memory, no FUSE (the VM is
                # paused, so the image holds what the snapshot holds).
                image = str(self.vm.disks[name].path)
                runs.append((workload, TAR_IMAGE, name, ["sh", "-c", tar, "sh", image]))
        self.mount(thin=True)
        try:
            if self.thin:
                # tar must see the holes, or the thin row measures the other case.
                st = os.stat(self.mnt / f"{self.thin}.raw")
                if st.st_blocks * 512 >= st.st_size:
                    raise RuntimeError(
                        f"(j): the view of {self.thin} shows no holes "
                        f"({st.st_blocks * 512} of {st.st_size} bytes allocated)"
                    )
            for rnd in range(self.args.rounds):
                turn = rnd % len(runs)
                for workload, tool, name, argv in runs[turn:] + runs[:turn]:
                    self.measure(
                        workload,
                        tool,
                        rnd,
                        [name],
                        _fixed(argv),
                        self.size,
                        servers=[self.snapfs_pid],
                    )
        finally:
            self.umount()

    def full_copy(self) -> None:
        """(k): ``snapfs copy`` of a full view into a directory on the work directory's disk,
        against ``cp --sparse=always`` of the same files and ``sync`` of them and of the
        directory (what snapfs copy fsyncs), the destination removed before every run."""
        first = self.names[0]
        exclude = [a for n in self.names[1:] for a in ("--exclude", n)]
        dest = self.workdir / "full-copy"
        self.mount(*exclude)
        try:
            files = [str(p) for p in sorted(self.mnt.iterdir())]
            tools: list[tuple[str, list[str]]] = [
                ("snapfs-copy", [sys.executable, "-m", "snapfs", "copy", str(self.mnt), str(dest)]),
                (
                    CP_SYNC,
                    [
                        "sh",
                        "-c",
                        'd=$1; shift; cp --sparse=always "$@" "$d"/ && sync "$d" "$d"/*',
                        "sh",
                        str(dest),
                        *files,
                    ],
                ),
            ]

            def empty() -> None:
                shutil.rmtree(dest, ignore_errors=True)
                dest.mkdir()

            for rnd in range(self.args.rounds):
                for tool, argv in tools[rnd % 2 :] + tools[: rnd % 2]:
                    self.measure(
                        "k-full",
                        tool,
                        rnd,
                        [first],
                        _fixed(argv),
                        self.size,
                        servers=[self.snapfs_pid],
                        before=empty,
                    )
        finally:
            shutil.rmtree(dest, ignore_errors=True)
            self.umount()

    def scale(self) -> None:
        """(l): a 1 TiB qcow2 disk with ``--scale-extents`` dirty extents of 64 KiB, 1 MiB
        apart: the wall time of ``snapfs mount --incremental``, of ``cat`` of the sidecar, and
        the serving process's peak RSS. The extents are made offline by one qemu-io process
        (the persistent bitmap records its writes as QEMU would) with zero writes, which only
        change the image's metadata: about 128 MiB of L2 tables for a million of them."""
        extents = self.args.scale_extents
        workdir = self.workdir / "scale"
        workdir.mkdir()
        spec = DiskSpec("virtio0", "qcow2", "virtio", size=SCALE_SIZE, modelled=False)
        vm = TestVM(workdir, [spec])
        mnt = workdir / "mnt"
        mnt.mkdir()
        incremental = ("--incremental", "scale")

        def mount() -> float:
            return self.snapfs(
                "mount",
                vm.vmid,
                str(mnt),
                "--qmp",
                str(vm.qmp_path),
                "--fleecing-dir",
                str(workdir / "fleecing"),
                *incremental,
            )

        try:
            vm.start()
            mount()
            self.snapfs("umount", str(mnt), "--commit")
            vm.stop()
            print(f"(l) {extents} zero writes of 4 KiB, {SCALE_STEP >> 20} MiB apart", flush=True)
            script = "".join(f"write -q -z {i * SCALE_STEP} 4096\n" for i in range(extents))
            t0 = time.perf_counter()
            # cache=unsafe: no flush after every write (a million flushes take minutes); the
            # metadata is written out all the same when qemu-io closes the image.
            proc = subprocess.run(
                [QEMU_IO, "-t", "unsafe", "-f", "qcow2", str(spec.path)],
                input=script.encode(),
                stdout=subprocess.DEVNULL,  # a prompt per command
                stderr=subprocess.PIPE,
                check=False,
            )
            if proc.returncode != 0 or proc.stderr.strip():
                raise RuntimeError(f"qemu-io failed: {proc.stderr.decode(errors='replace')}")
            self.results.scale_setup_s = time.perf_counter() - t0
            self.results.scale_image_bytes = spec.path.stat().st_blocks * 512
            print(
                f"(l) made in {self.results.scale_setup_s:.0f} s; the image holds "
                f"{self.results.scale_image_bytes / MiB:.0f} MiB",
                flush=True,
            )
            vm.start()
            for rnd in range(self.args.rounds):
                if not self.args.no_drop_caches:
                    drop_caches()
                self.results.scale_mount_s.append(mount())
                try:
                    pid = int((self.run_dir / ".state" / vm.vmid / "pid").read_text())
                    t0 = time.perf_counter()
                    text = subprocess.run(
                        ["cat", str(mnt / f"{spec.name}.dirty")], capture_output=True, check=True
                    ).stdout
                    self.results.scale_cat_s.append(time.perf_counter() - t0)
                    self.results.scale_rss.append(peak_rss(pid))
                    if rnd == 0:
                        _check_extents(text, extents)
                finally:
                    self.snapfs("umount", str(mnt))  # no --commit: the next round sees the same
                print(
                    f"  round {rnd} l-scale mount {self.results.scale_mount_s[-1]:.2f} s, "
                    f"cat {self.results.scale_cat_s[-1]:.2f} s, "
                    f"peak RSS {self.results.scale_rss[-1] / MiB:.0f} MiB",
                    flush=True,
                )
            self.results.scale_extents = extents
        finally:
            vm.stop()
            spec.path.unlink(missing_ok=True)


def _fixed(argv: list[str]) -> Callable[[str], list[str]]:
    """The same command line whatever the disk (for workloads of one disk)."""
    return lambda _name: argv


def _check_extents(text: bytes, extents: int) -> None:
    """(l)'s sidecar lists exactly the extents made: one 64 KiB block every SCALE_STEP."""
    lines = text.splitlines()
    if len(lines) != extents:
        raise RuntimeError(f"(l) the sidecar has {len(lines)} lines, not {extents}")
    for i, line in enumerate(lines):
        if line != b"%d %d" % (i * SCALE_STEP, REGION):
            raise RuntimeError(f"(l) sidecar line {i + 1} is {line!r}")


# -- the report ------------------------------------------------------------------------------


def _med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def summarize(res: Results) -> dict[str, Any]:
    """Medians per (workload, tool); snapfs's ratio to each tool (``snapfs_ratio``: snapfs's
    MiB/s over the tool's) and, where a workload has a reference, each tool's ratio to it
    (``ref_ratio``: the tool's MiB/s over the reference's); the headline (``headline``)."""
    out: dict[str, Any] = {}
    for workload in dict.fromkeys(r.workload for r in res.runs):
        rows: dict[str, Any] = {}
        for tool in dict.fromkeys(r.tool for r in res.runs if r.workload == workload):
            runs = [r for r in res.runs if r.workload == workload and r.tool == tool]
            rows[tool] = {
                "rounds": len(runs),
                "mib_s": _med([r.mib_s for r in runs]),
                "cpu_s_per_gib": _med([r.cpu_per_gib for r in runs]),
                "qemu_cpu_s_per_gib": _med([r.qemu_per_gib for r in runs]),
            }
        ours = next((v for k, v in rows.items() if k.startswith(SNAPFS)), None)
        ref = rows.get(REFERENCE.get(workload, ""))
        for row in rows.values():
            row["snapfs_ratio"] = ours["mib_s"] / row["mib_s"] if ours else None
            row["ref_ratio"] = row["mib_s"] / ref["mib_s"] if ref else None
        out[workload] = rows
    out["mount_s"] = _med(res.mount_s)
    out["umount_s"] = _med(res.umount_s)
    out["peak_rss_mib"] = {k: max(v) / MiB for k, v in res.rss.items()}
    out["pause_ms"] = {k: _med(v) for k, v in res.pause_ms.items()}
    out["qemu"] = res.qemu
    out["confined"] = res.confined
    if res.scale_extents:
        out["scale"] = {
            "extents": res.scale_extents,
            "mount_s": _med(res.scale_mount_s),
            "cat_s": _med(res.scale_cat_s),
            "peak_rss_mib": max(res.scale_rss) / MiB,
            "setup_s": res.scale_setup_s,
            "image_mib": res.scale_image_bytes / MiB,
        }
    out["headline"] = [asdict(h) for h in headline(res, out)]
    return out


@dataclass
class Headline:
    """One row of the report's first table (the README's): a measure of one workload, its
    values in this run, and the goal it has, if any (``met``: whether the first value meets
    it)."""

    workload: str
    measure: str
    values: list[float]
    unit: str = ""  # "" for ratios, else "s", "ms", "MiB"
    goal: str = ""  # "≥ 0.8", "≤ 2", "< 3": an operator and a number
    met: bool | None = None

    def __post_init__(self) -> None:
        if self.goal and self.values:
            op, limit = self.goal.split()
            value, bound = self.values[0], float(limit)
            self.met = {
                "≥": value >= bound,
                "≤": value <= bound,
                "<": value < bound,
            }[op]

    def text(self) -> str:
        """The values as the table shows them."""
        if self.unit == "":
            return ", ".join(f"{v:.2f}" for v in self.values)
        digits = {"s": 2, "ms": 1, "MiB": 0}[self.unit]
        return ", ".join(f"{v:.{digits}f} {self.unit}" for v in self.values)

    def goal_text(self) -> str:
        if not self.goal:
            return ""
        return f"{self.goal} {self.unit}".strip() + (" (met)" if self.met else " (missed)")


def _ratios(
    summary: dict[str, Any], workload: str, tools: Sequence[str]
) -> tuple[str, list[float]]:
    """snapfs ÷ each of ``tools`` that ran in ``workload`` (MiB/s over MiB/s)."""
    rows = summary.get(workload, {})
    present = [t for t in tools if t in rows and SNAPFS in rows]
    values = [rows[SNAPFS]["mib_s"] / rows[t]["mib_s"] for t in present]
    return "snapfs ÷ " + ", ÷ ".join(present), values


def headline(res: Results, summary: dict[str, Any]) -> list[Headline]:
    """The ratios and figures the README shows, with the goals some of them have."""
    a = res.args
    disks = f"{a['disks']} disk" + ("s" if a["disks"] != 1 else "")
    refs = [NBDFUSE, NBDCOPY, QEMU_FUSE]
    out: list[Headline] = []
    for workload, title in (
        ("a-dd", "(a) `dd bs=1M iflag=direct`, one disk"),
        ("b-cp", "(b) `cp --sparse=always` to /dev/null, one disk"),
        ("c-parallel", f"(c) {disks} at once, `dd bs=1M iflag=direct`"),
    ):
        measure, values = _ratios(summary, workload, refs)
        if values:
            out.append(Headline(title, measure + " (MiB/s)", values))
    d = summary.get("d-incr", {})
    if CEILING in d:
        where = "memory" if a.get("dest_in_memory") else "files on disk"
        title = (
            f"(d) incremental view, {res.dirty_regions:,} regions of 64 KiB, copied into {where}"
        )
        for tool, what, goal in (
            ("snapfs-copy", "`snapfs copy`", "≥ 0.8"),
            (
                f"snapfs-pread{PREAD_THREADS}",
                f"{PREAD_THREADS} pread threads through snapfs",
                "≥ 0.8",
            ),
            (
                f"{CWORKER}-pread{PREAD_THREADS}",
                f"the same through a prototype of a compiled worker (`dev/{CWORKER_SOURCE.name}`)",
                "",
            ),
        ):
            if tool in d:
                out.append(
                    Headline(
                        title,
                        f"{what} ÷ libnbd, {CEILING_REQUESTS} requests in flight (MiB/s)",
                        [d[tool]["ref_ratio"]],
                        goal=goal,
                    )
                )
                title = ""
    if res.mount_s:
        out.append(
            Headline(
                f"(e) {disks}",
                "`snapfs mount`, `snapfs umount`",
                [summary["mount_s"], summary["umount_s"]],
                unit="s",
            )
        )
    if summary["peak_rss_mib"]:
        rss = summary["peak_rss_mib"]
        out.append(
            Headline("(f) peak RSS during (a)", ", ".join(rss), list(rss.values()), unit="MiB")
        )
    if summary["pause_ms"]:
        pause = summary["pause_ms"]
        out.append(
            Headline(
                f"(g) a running guest's pause at the snapshot point, {disks}",
                ", ".join(f"{k} view" for k in pause),
                list(pause.values()),
                unit="ms",
            )
        )
    h = [summary.get(w, {}) for w in ("h-a", "h-c")]
    for kind, workload, measure in (
        (
            "confined",
            "(h) reads confined to one cluster per request (QEMU before 8.0)",
            "confined ÷ as this QEMU is read, (a), (c) (MiB/s)",
        ),
        ("1M", "", "`--fleecing-cluster 1M` ÷ the default 64K, (a), (c) (MiB/s)"),
    ):
        tool = f"{SNAPFS}-{kind}"
        if all(SNAPFS in r and tool in r for r in h):
            out.append(
                Headline(workload, measure, [r[tool]["mib_s"] / r[SNAPFS]["mib_s"] for r in h])
            )
    i = summary.get("i-throttled", {})
    if SNAPFS in i and f"{SNAPFS}-throttled" in i:
        out.append(
            Headline(
                "(i) a disk throttled to 10 MB/s",
                "throttled ÷ unthrottled (MiB/s)",
                [i[f"{SNAPFS}-throttled"]["mib_s"] / i[SNAPFS]["mib_s"]],
            )
        )
    title = "(j) small reads of a full view"
    j = summary.get("j-small", {})
    if DD_1M in j and DD_4K in j:
        out.append(
            Headline(
                title, "`dd bs=4K` ÷ `dd bs=1M` (MiB/s)", [j[DD_4K]["ref_ratio"]], goal="≥ 0.5"
            )
        )
        title = ""
    step = thin_step(parse_size(a["size"])) / MiB
    for workload, tar_measure, image_measure in (
        (
            "j-small",
            "`tar --sparse -cf - \\| cat` ÷ `dd bs=1M` (time)",
            "the same `tar` of the disk's image in memory, no FUSE ÷ `dd bs=1M` (time)",
        ),
        (
            "j-thin",
            f"the same of a thin disk ({step:g} MiB of data and holes in turn: tar reads its "
            "data 512 bytes at a time) ÷ `dd bs=1M` of it (time)",
            "the same `tar` of the thin disk's image in memory ÷ `dd bs=1M` of it (time)",
        ),
    ):
        rows = summary.get(workload, {})
        if DD_1M not in rows:
            continue
        if TAR in rows:
            out.append(Headline(title, tar_measure, [1 / rows[TAR]["ref_ratio"]], goal="≤ 2"))
            title = ""
        if TAR_IMAGE in rows:
            out.append(Headline(title, image_measure, [1 / rows[TAR_IMAGE]["ref_ratio"]]))
            title = ""
    k = summary.get("k-full", {})
    if "snapfs-copy" in k and CP_SYNC in k:
        out.append(
            Headline(
                "(k) a full view copied into a directory on disk",
                "`snapfs copy` ÷ `cp --sparse=always` + `sync` (time)",
                [1 / k["snapfs-copy"]["ref_ratio"]],
                goal="≤ 1",
            )
        )
    scale = summary.get("scale")
    if scale:
        title = f"(l) 1 TiB disk with {scale['extents']:,} dirty extents"
        out += [
            Headline(title, "`snapfs mount`", [scale["mount_s"]], unit="s", goal="< 3"),
            Headline("", "`cat` of the `.dirty` sidecar", [scale["cat_s"]], unit="s", goal="< 1"),
            Headline(
                "", "serving process's peak RSS", [scale["peak_rss_mib"]], unit="MiB", goal="< 200"
            ),
        ]
    return out


WORKLOAD_TITLES = {
    "a-dd": "(a) dd bs=1M iflag=direct",
    "b-cp": "(b) cp --sparse=always to /dev/null",
    "c-parallel": "(c) 4 disks in parallel, dd bs=1M iflag=direct (aggregate)",
    "d-incr": "(d) incremental view, 64 KiB regions",
    "h-a": "(h) confined reads: (a)",
    "h-c": "(h) confined reads: (c)",
    "i-throttled": "(i) a disk throttled to 10 MB/s, against an unthrottled one",
    "j-small": "(j) full view, sequential reads through the page cache",
    "j-thin": "(j) full view of a thin disk (data and holes in turn), through the page cache",
    "k-full": "(k) full view copied into a directory on disk",
}


def steal_share(runs: Sequence[Run]) -> float:
    """The share of the CPUs' time the hypervisor took during ``runs`` (0 to 1)."""
    wall = sum(r.wall for r in runs) * CPUS
    return sum(r.steal for r in runs) / wall if wall else 0.0


def caption(res: Results) -> str:
    """What the run was: the line above the report's tables."""
    a = res.args
    return (
        f"{a['disks']} disk(s) x {a['size']} of random data ({a['format']}), "
        f"{a['rounds']} alternated rounds, medians; images in "
        f"{'memory' if a.get('images_in_memory') else 'files on disk'}; page cache dropped "
        "before every run" + (" (not)" if a["no_drop_caches"] else "") + f"; QEMU {res.qemu}; "
        f"{CPUS} CPUs, {steal_share(res.runs):.0%} of their time taken by the hypervisor during "
        f"the runs kept (steal); {len(res.repeated)} run(s) measured again because it took more "
        f"than {a['steal_limit']:.0%}"
        + (
            f"; free page reporting held at order {res.page_reporting[1]} "
            f"(from {res.page_reporting[0]})."
            if res.page_reporting
            else "."
        )
    )


def markdown(res: Results, summary: dict[str, Any]) -> str:
    """The report: the caption and the headline table (what the README shows), then every
    tool's medians (what docs/performance.md keeps)."""
    a = res.args
    lines = [
        caption(res),
        "",
        "| workload | measure | latest | goal |",
        "| --- | --- | ---: | --- |",
    ]
    for h in summary["headline"]:
        row = Headline(**h)
        lines.append(f"| {row.workload} | {row.measure} | {row.text()} | {row.goal_text()} |")
    lines += [
        "",
        f"QEMU {res.qemu}: snapfs confines its reads there "
        + ("by default (before 8.0)." if res.confined else "only in (h).")
        + " Ratios of MiB/s are of the median MiB/s; a ratio of time is the inverse.",
        "",
        "| workload | tool | MiB/s | CPU s/GiB (reader+server) | QEMU CPU s/GiB | snapfs ratio "
        "| ÷ reference |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for workload, rows in summary.items():
        if not isinstance(rows, dict) or workload not in WORKLOAD_TITLES:
            continue
        title = WORKLOAD_TITLES[workload]
        if workload == "c-parallel":
            title = title.replace("4 disks", f"{a['disks']} disks")
        if workload == "d-incr":
            where = "memory" if a.get("dest_in_memory") else "files on disk"
            title += f" ({res.dirty_regions} regions), copied into {where}"
        if workload in REFERENCE:
            title += f"; reference: {REFERENCE[workload]}"
        for tool, row in rows.items():
            ref = "" if row["ref_ratio"] is None else f"{row['ref_ratio']:.2f}"
            lines.append(
                f"| {title} | {tool} | {row['mib_s']:.0f} | {row['cpu_s_per_gib']:.2f} "
                f"| {row['qemu_cpu_s_per_gib']:.2f} | {row['snapfs_ratio']:.2f} | {ref} |"
            )
            title = ""
    for tool, why in res.unavailable.items():
        lines.append(f"| all | {tool} | not available: {why} | | | | |")
    scale = summary.get("scale")
    if scale:
        lines += [
            "",
            f"(l) {scale['extents']:,} extents made offline by one qemu-io in "
            f"{scale['setup_s']:.0f} s; the image holds {scale['image_mib']:.0f} MiB.",
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dev.bench", description=__doc__.split("\n")[0])
    p.add_argument("--size", default="2G", help="size of each disk (default 2G)")
    p.add_argument("--disks", type=int, default=4, help="disks in the VM (default 4)")
    p.add_argument("--rounds", type=int, default=7, help="alternated rounds (default 7)")
    p.add_argument(
        "--format",
        choices=["raw", "qcow2"],
        default="raw",
        help="image format of the disks (default raw)",
    )
    p.add_argument(
        "--dirty-regions",
        type=int,
        default=10000,
        help="64 KiB dirty regions of the incremental view (default 10000; 0 skips)",
    )
    p.add_argument(
        "--scale-extents",
        type=int,
        default=1_000_000,
        help="dirty extents of the 1 TiB disk of (l) (default 1000000, at most "
        f"{SCALE_SIZE // SCALE_STEP}; 0 skips)",
    )
    p.add_argument(
        "--workdir",
        default="/var/tmp",
        help="where the work directory goes: sockets, mounts, the copies of (k), the disk of "
        "(l), and the images and (d)'s copies unless they are in memory (default /var/tmp)",
    )
    p.add_argument(
        "--images",
        choices=["auto", "memory", "disk"],
        default="auto",
        help="where the disk images go: memory (/dev/shm), disk (the work directory), or auto "
        "(memory if there is room; the default)",
    )
    p.add_argument("--json", default="bench-results.json", help="raw figures (JSON)")
    p.add_argument(
        "--qemu-root",
        help="run the VM with the QEMU of this root file system (make qemu10 builds one with "
        "Debian 13's QEMU 10.0 in /var/cache/snapfs-dev/qemu-10.0)",
    )
    p.add_argument(
        "--no-drop-caches", action="store_true", help="do not drop the page cache before every run"
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--steal-limit",
        type=float,
        default=0.1,
        metavar="SHARE",
        help="repeat a run (twice at most) when the hypervisor took more than this share of the "
        "CPUs' time during it (default 0.1; 1 never repeats)",
    )
    p.add_argument(
        "--only",
        default=WORKLOADS,
        metavar="LETTERS",
        help="run only these workloads, e.g. 'd' or 'dk' ((a), (b), (c), (e) and (f) run "
        "together; default: all)",
    )
    return p


class Stopped(BaseException):
    """SIGTERM or SIGHUP: unwinds like KeyboardInterrupt, through every cleanup."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, _frame: FrameType | None) -> None:
    # Once: a second signal must not cut the cleanup short (its waits are bounded).
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def run(args: argparse.Namespace) -> Results:
    """Run the whole benchmark; cleans up everything it started, even on failure."""
    args.size_bytes = parse_size(args.size)
    if args.size_bytes % REGION or args.size_bytes <= 0:
        raise SystemExit("--size must be a positive multiple of 64 KiB")
    if args.rounds < 1 or args.disks < 1:
        raise SystemExit("--rounds and --disks must be at least 1")
    if not 0 <= args.steal_limit <= 1:
        raise SystemExit("--steal-limit must be between 0 and 1")
    if not 0 <= args.scale_extents <= SCALE_SIZE // SCALE_STEP:
        raise SystemExit(f"--scale-extents must be between 0 and {SCALE_SIZE // SCALE_STEP}")
    only = set(args.only)
    if not only or not only <= set(WORKLOADS):
        raise SystemExit(f"--only takes letters of {WORKLOADS}, not {args.only!r}")
    # (j)'s thin disk holds half its size.
    images = args.size_bytes * args.disks + (args.size_bytes // 2 if "j" in only else 0)
    args.images_in_memory = images_in_memory(args.images, images)
    # (d)'s copies (a full image of one disk, and the readers' regions) go to memory too when
    # there is room beside the images.
    args.dest_in_memory = images_in_memory(
        "auto", 2 * args.size_bytes + (images if args.images_in_memory else 0)
    )
    if args.qemu_root:
        os.environ[QEMU_ROOT_ENV] = args.qemu_root
    workdir = Path(tempfile.mkdtemp(prefix="snapfs-bench-", dir=args.workdir))
    image_dir = dest_dir = None
    if args.images_in_memory:
        image_dir = Path(tempfile.mkdtemp(prefix="snapfs-bench-", dir="/dev/shm"))
    if args.dest_in_memory:
        dest_dir = Path(tempfile.mkdtemp(prefix="snapfs-bench-dest-", dir="/dev/shm"))
    bench = Bench(args, workdir, image_dir, dest_dir)
    held = None
    try:
        # All the free memory: the runs put gigabytes into it (every disk's bytes in the page
        # cache, (d)'s copies), and any free page may be the next one handed out.
        held = hold_page_reporting(touch=TOUCHED_MEMORY)
        bench.results.page_reporting = list(held or ())
        bench.setup()
        phases: list[tuple[str, Callable[[], None]]] = [
            ("abcef", bench.rounds),
            ("d" if args.dirty_regions else "", bench.incremental),
            ("j", bench.small_reads),
            ("k", bench.full_copy),
            ("h", bench.confinement),
            ("g", bench.pause),
            ("i", bench.throttled),
            ("l" if args.scale_extents else "", bench.scale),
        ]
        for letters, phase in phases:
            if only & set(letters):
                phase()
    finally:
        for sig in STOP_SIGNALS:  # too late to stop: let the cleanup finish (its waits are bounded)
            if signal.getsignal(sig) is _stop:
                signal.signal(sig, signal.SIG_IGN)
        bench.close()
        release_page_reporting(held)
        for tmp in (image_dir, dest_dir):
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)  # memory: never kept
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return bench.results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        res = run(args)
    except (Stopped, KeyboardInterrupt) as err:
        what = err.args[0] if isinstance(err, Stopped) else "SIGINT"
        print(f"bench: stopped by {what}; what it started is gone", file=sys.stderr)
        return 128 + (err.signum if isinstance(err, Stopped) else signal.SIGINT)
    summary = summarize(res)
    table = markdown(res, summary)
    print()
    print(table)
    data = {
        "args": res.args,
        "summary": summary,
        "runs": [asdict(r) for r in res.runs],
        "mount_s": res.mount_s,
        "umount_s": res.umount_s,
        "peak_rss": res.rss,
        "unavailable": res.unavailable,
        "repeated": [asdict(r) for r in res.repeated],
        "dirty_regions": res.dirty_regions,
        "pause_ms": res.pause_ms,
        "page_reporting": res.page_reporting,
        "scale": {
            "extents": res.scale_extents,
            "mount_s": res.scale_mount_s,
            "cat_s": res.scale_cat_s,
            "peak_rss": res.scale_rss,
        },
        "markdown": table,
    }
    Path(args.json).write_text(json.dumps(data, indent=1, default=str) + "\n")
    print(f"\nraw figures: {args.json}")
    return 0


if __name__ == "__main__":
    for _sig in STOP_SIGNALS:
        signal.signal(_sig, _stop)
    sys.exit(main())
