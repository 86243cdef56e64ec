"""One mounted VM: wires QMP, NBD and FUSE together and owns the session's lifecycle.

Lifecycle of the serving process (``serve``)::

    validate -> lock session dir -> QMP set-up (connect, plan -> state file, build graph,
      disconnect) -> state file -> NBD connections -> tree -> FUSE mount (INIT answered)
      -> control socket -> READY
      -> serve until: the mount goes away (plain umount), `snapfs umount` asks, or a signal
      -> close NBD -> QMP teardown (commit or abort) -> remove state -> exit

Invariants:
- QMP is connected only during set-up and teardown, never while serving (Proxmox's management
  stack takes the same socket one client at a time).
- Everything teardown needs is in ``<run_dir>/.state/<vmid>/state.json`` before the set-up
  changes the VM (the plan), and again once it is complete, so another process (``snapfs
  cleanup``) can tear down after a crash, or after QEMU stopped answering during the set-up.
- Every wait on QEMU is bounded (qmp.command_timeout); so is every wait of the CLI on the
  serving process (``request``).
- Without an explicit commit, teardown aborts: the next incremental still sees every change.

Paths (see snapfs.paths): the mountpoint, the fleecing directory, the state directory and the
QMP and agent sockets are resolved against the working directory in ``validate`` (before the
serving process forks) and must be trusted paths: no component that a user but root owns or
can write, symlinks only where root put them. Everything snapfs creates, replaces or removes
there is done relative to a descriptor of the checked directory. The mount is made on the
checked directory and identified by its mount id, which goes into the state file: unmounts
(``snapfs umount``, teardown, ``cleanup``) check that the path still leads to that mount and
leave anything else alone, saying so in one line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio
import trio_asyncio

from snapfs import agent, paths, pve, qmp
from snapfs.datapath import DiskReader, SharedDepth, SpliceReads
from snapfs.errors import (
    FuseError,
    NBDError,
    QMPTimeoutError,
    SetupError,
    SnapfsError,
    StateError,
    TeardownError,
    UsageError,
    VMGoneError,
)
from snapfs.fs import TreeOperations
from snapfs.fuse import kernel
from snapfs.fuse.server import FuseServer
from snapfs.nbd.client import NBDClient, extents
from snapfs.regions import Regions
from snapfs.tree import ROOT_INO, Disk, SourceError, Tree

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path("/run/snapfs")
DEFAULT_FLEECING_ROOT = Path("/var/lib/snapfs")
DEFAULT_QMP_DIR = Path("/var/run/qemu-server")
# Proxmox's VMID range; plain QEMU users pick any number in it.
VMID_RE = re.compile(r"[1-9][0-9]{0,8}")
BITMAP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# NBD base:allocation flags (NBD protocol): a block with ZERO set reads as zeros.
NBD_STATE_ZERO = 2
# qemu:dirty-bitmap contexts: bit 0 set means dirty.
NBD_STATE_DIRTY = 1
BASE_ALLOCATION = "base:allocation"
# Block status requests of the allocation walk: QEMU answers up to this many bytes at once.
_STATUS_CHUNK = 1 << 30
# How long the CLI waits for a serving process to answer a control request (a status, or the
# acknowledgement of an umount): its event loop answers at once unless it is stopped or hung.
CONTROL_TIMEOUT = 5.0
# Besides the QMP teardown (qmp.teardown_bound): the FUSE unmount, closing the NBD connections
# (a second each at most) and the QMP connection.
_UMOUNT_SLACK = 30.0


def run_dir() -> Path:
    """The directory for default mountpoints and session state (SNAPFS_RUN_DIR for tests)."""
    return Path(os.environ.get("SNAPFS_RUN_DIR", str(DEFAULT_RUN_DIR))).absolute()


@dataclass
class MountOptions:
    """What a mount was asked to do, after validation (see ``validate``): absolute, trusted
    paths; the mountpoint and the fleecing directory in canonical form (no symlinks)."""

    vmid: str
    mountpoint: Path
    qmp_path: Path
    fleecing_dir: Path
    exclude: list[str] = field(default_factory=list)
    incremental: str | None = None
    allow_other: bool = False
    default_mountpoint: bool = False
    # A dead serving process left this VM's session behind: clean it up first.
    stale: bool = False
    # The guest freeze through the guest agent; None: --no-freeze.
    freeze: agent.FreezeConfig | None = None
    # Where the serving process logs (journal, syslog, stderr or a file): for `snapfs status`.
    log_to: str = "stderr"
    # Tune QEMU's NBD server from the outside (snapfs.nbd.tuning); --no-tune turns it off.
    tune: bool = True

    @property
    def state_dir(self) -> Path:
        return state_dir(self.vmid)


def state_dir(vmid: str) -> Path:
    return run_dir() / ".state" / vmid


def check_vmid(vmid: str) -> str:
    if not VMID_RE.fullmatch(vmid):
        shown = vmid if len(vmid) <= 40 else vmid[:40] + "..."
        raise UsageError(f"invalid VMID {shown!r}: expected a number from 1 to 999999999")
    return vmid


def _check_path(text: str, what: str) -> Path:
    """A path given by a person: absolute (relative to the working directory), without '..'."""
    return paths.absolute(text, what)


def validate(
    vmid: str,
    mountpoint: str | None,
    qmp_path: str | None,
    fleecing_dir: str | None,
    exclude: list[str],
    incremental: str | None,
    allow_other: bool = False,
) -> MountOptions:
    """Check a mount request before anything is touched; raise UsageError or StateError.

    Relative paths are taken from the working directory; every path must be trusted (see
    snapfs.paths) as far as it exists: what is missing is made by the serving process, which
    checks it again."""
    check_vmid(vmid)
    if incremental is not None and not BITMAP_ID_RE.fullmatch(incremental):
        raise UsageError(f"invalid incremental ID {incremental!r}: use letters, digits, _ . -")
    default_mp = not mountpoint
    given_mp = _check_path(mountpoint, "mountpoint") if mountpoint else run_dir() / vmid
    qp = _check_path(qmp_path, "QMP socket") if qmp_path else DEFAULT_QMP_DIR / f"{vmid}.qmp"
    given_fd = (
        _check_path(fleecing_dir, "fleecing directory")
        if fleecing_dir
        else DEFAULT_FLEECING_ROOT / vmid
    )
    if not paths.exists(qp, "QMP socket"):
        raise UsageError(f"QMP socket {qp} does not exist (is VM {vmid} running?)")
    if not stat.S_ISSOCK(os.stat(qp).st_mode):
        raise UsageError(f"QMP socket {qp} is not a socket")
    mp = paths.resolve(given_mp, "mountpoint")
    with paths.walk(given_fd, "fleecing directory") as w:
        if w.rest and (w.st is not None or w.dead):
            raise UsageError(f"fleecing directory {given_fd} is not a directory")
        fd = w.path
    stale_mp = None
    sdir = state_dir(vmid)
    paths.resolve(sdir, "session state directory")
    pid = _read_pid(sdir)
    if pid is not None and _alive(pid):
        raise StateError(f"VM {vmid} is already mounted by snapfs (serving process {pid})")
    if sdir.exists():
        state = _read_state(sdir)
        stale_mp = Path(state["mountpoint"]) if state else None
    if stale_mp is not None and stale_mp == mp:
        pass  # the dead mount there goes away with the clean-up
    elif not default_mp:
        if kernel.is_mounted(mp):
            raise UsageError(f"mountpoint {given_mp} is already a mount point")
        with paths.open_dir(given_mp, "mountpoint") as d:
            if d.listdir():
                raise UsageError(f"mountpoint {given_mp} is not empty")
    elif kernel.is_mounted(mp):
        raise StateError(f"VM {vmid} is already mounted at {mp}")
    for name in exclude:
        if not name or "/" in name:
            raise UsageError(f"invalid --exclude name {name!r}")
    return MountOptions(
        vmid, mp, qp, fd, list(exclude), incremental, allow_other, default_mp, stale=sdir.exists()
    )


class FreezeRequired(SetupError):
    """--freeze=required, and the guest could not be frozen."""


class NBDSource:
    """A disk's bytes from its NBD export; NBD failures become the tree's SourceError (EIO).

    The tree never asks for bytes outside the access bitmap, so any error QEMU answers means
    the snapshot itself broke (copy-before-write could not save old data, e.g. the fleecing
    storage is full; QEMU then refuses every snapshot read, with EINVAL over NBD):
    ``on_broken`` is told.

    The splice data path (snapfs.datapath.SpliceReads) reads most of a disk's bytes through a
    connection of its own; what it cannot read comes here, and its errors are put in words by
    ``read_failed``.
    """

    def __init__(
        self, client: NBDClient, name: str, on_broken: Callable[[str], None], confine: int = 0
    ) -> None:
        self.client = client
        self.name = name
        self.on_broken = on_broken
        self.confine = confine  # see qmp.confine_reads

    def _failed(self, what: str, err: NBDError) -> SourceError:
        if not self.client.alive:
            self.on_broken("the VM went away (its NBD server is gone)")
        elif what == "reads":
            self.on_broken(
                f"{self.name}: the snapshot broke: QEMU refuses {what} "
                "(fleecing storage full, or copy-before-write failed)"
            )
        return SourceError(f"{self.name}: {err}", errno.EIO)

    def read_failed(self, err: NBDError) -> SourceError:
        """What an error of QEMU's to a read means (the snapshot broke, or the VM is gone)."""
        return self._failed("reads", err)

    async def read_into(self, buf: bytearray, offset: int, length: int) -> None:
        try:
            await self.client.pread_into(buf, offset, length, confine=self.confine)
        except NBDError as err:
            raise self._failed("reads", err) from err

    async def discard(self, offset: int, length: int) -> None:
        try:
            await self.client.trim(offset, length)
        except NBDError as err:
            raise self._failed("discards", err) from err


async def _regions(client: NBDClient, context: str, keep: Callable[[int], bool]) -> Regions:
    """The ranges whose block-status flags satisfy ``keep``, walking the whole export."""
    regions = Regions()
    async for off, length, flags in extents(client, context):
        if keep(flags):
            regions.append(off, length)
    return regions


async def _zeros(client: NBDClient, written: str | None) -> Regions:
    """The ranges of a full view that read as zeros in the snapshot.

    ``written`` (QEMU before 8.0, see qmp.confine_reads): the context of a bitmap of every
    guest write since the snapshot point. There, block status of a range that starts in a
    cluster copy-before-write has copied and runs on into one it has not reports the copied
    part from the live disk: a later guest zero write shows as zeros. The live disk only
    differs from the snapshot where the guest wrote, which QEMU records in the bitmap before
    the status can see the new data, and QEMU computes the bitmap's extents after the
    allocation's in the same request: zeros are kept only where the bitmap is clean.
    """
    contexts = [BASE_ALLOCATION, *([written] if written else [])]
    zeros = Regions()
    pos, size = 0, client.size
    while pos < size:
        got = await client.block_status_all(pos, min(_STATUS_CHUNK, size - pos), contexts)
        end = size
        for batch in got.values():
            end = min(end, batch[-1][0] + batch[-1][1])
        chunk = Regions()
        for off, length, flags in got[BASE_ALLOCATION]:
            if flags & NBD_STATE_ZERO and off < end:
                chunk.append(off, min(off + length, end) - off)
        if written:
            for off, length, flags in got[written]:
                if flags & NBD_STATE_DIRTY and off < end:
                    chunk.remove(off, min(off + length, end) - off)
        for off, length in chunk:
            zeros.append(off, length)
        pos = end
    return zeros


@contextlib.asynccontextmanager
async def _qmp_session(path: Path, vmid: str = "") -> AsyncIterator[qmp.QMP]:
    async with qmp.QMP.connect(path, vm=vmid) as q:
        yield q


def _allocated(path: str) -> int:
    """Bytes a file occupies on its file system (0 if it is gone)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


def _write_private(path: Path, data: str) -> None:
    """Write a 0600 file atomically (rename), so a reader never sees half a state file."""
    paths.write_atomic(path, data, "session state directory")


class Session:
    """The serving side of one mount. Runs inside ``trio_asyncio.open_loop()``."""

    def __init__(self, opts: MountOptions) -> None:
        self.opts = opts
        self.graph: qmp.GraphState | None = None
        self.tree: Tree | None = None
        self.commit = False
        self.created_mountpoint = False
        self.broken: str | None = None
        self.freeze: agent.FreezeResult | None = None
        self.guest_files: dict[str, bytes] = {}
        self._stop = trio.Event()
        self._server: FuseServer | None = None
        self._ops: TreeOperations | None = None
        self._readers: list[DiskReader] = []
        self._depth = SharedDepth()  # one per QEMU: every disk's reader shares it
        self._done = trio.Event()
        self.result: dict[str, Any] = {}

    # -- facts ------------------------------------------------------------------------------------

    def facts(self) -> dict[str, Any]:
        g, tree = self.graph, self.tree
        assert g is not None
        assert tree is not None
        disks = {}
        for d, ds in zip(tree.disks, g.disks, strict=True):
            disks[d.name] = {
                "size": d.size,
                "format": ds.format,
                "nodes": ds.nodes(),
                "bitmap": ds.bitmap_facts(),
                "dirty_bytes": d.dirty.total,
                "dirty_regions": len(d.dirty),
                "readable_bytes": d.readable.total,
                "discarded_bytes": d.discarded,
                "bytes_read": d.bytes_read,
                "fleecing_bytes": _allocated(ds.fleecing_path),
                "confined_reads": ds.confine,
            }
        return {
            "vmid": g.vmid,
            "snapshot_time": g.snapshot_time,
            "qemu_version": g.qemu_version,
            "pause_ms": g.pause_ms,
            "incremental": g.incremental,
            "mountpoint": str(self.opts.mountpoint),
            "broken": self.broken,
            "freeze": self.freeze.facts() if self.freeze else None,
            "log": self.opts.log_to,
            "tuned": self.opts.tune,
            "disks": disks,
        }

    # -- lifecycle --------------------------------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> dict[str, Any]:
        """Set up, serve until asked to stop, tear down. ``task_status.started()`` is called once
        the tree is served. Returns the teardown result."""
        opts = self.opts
        sdir = opts.state_dir
        if opts.stale:
            for line in await cleanup(opts.vmid, opts.qmp_path):
                log.warning("VM %s: cleaned up after a dead session: %s", opts.vmid, line)
        self._lock_state_dir(sdir)
        planned = False
        left = False  # QEMU stopped answering after the plan: its teardown is left for cleanup

        def save_plan(plan: qmp.GraphState) -> None:
            nonlocal planned
            self._save_state(plan)
            planned = True

        try:
            if opts.default_mountpoint and not opts.mountpoint.exists():
                opts.mountpoint.mkdir(mode=0o700, parents=True)
                self.created_mountpoint = True
            async with _qmp_session(opts.qmp_path, opts.vmid) as q:
                try:
                    self.graph = await qmp.setup(
                        q,
                        vmid=opts.vmid,
                        fleecing_dir=opts.fleecing_dir,
                        nbd_socket=sdir / "nbd.sock",
                        exclude=opts.exclude,
                        incremental=opts.incremental,
                        around_snapshot=self._around_snapshot,
                        on_plan=save_plan,
                    )
                except BaseException:
                    left = planned and q.broken is not None
                    raise
            self._save_state()
        except QMPTimeoutError as err:
            if left:
                log.error("VM %s: %s; the set-up is left for 'snapfs cleanup'", opts.vmid, err)
                raise QMPTimeoutError(
                    f"{err}; the VM's graph is left as it is: run 'snapfs cleanup {opts.vmid}' "
                    "once QEMU answers again"
                ) from err
            self._remove_state_dir(sdir)
            raise QMPTimeoutError(f"{err}; nothing was changed") from err
        except BaseException:
            if not left:
                self._remove_state_dir(sdir)
            raise
        # The control socket outlives the tree: `snapfs umount` waits on it for the teardown.
        async with trio.open_nursery() as control:
            await control.start(self._control_server)
            try:
                await self._serve_graph(task_status)
            except SnapfsError as err:
                # E.g. QEMU stopped before the NBD handshake: say what the teardown did.
                with trio.CancelScope(shield=True):
                    await self._teardown()
                done = "the VM was restored" if self.result.get("ok") else self.result["error"]
                err.args = (f"{err}; {done}", *err.args[1:])
                raise
            finally:
                if not self._done.is_set():
                    with trio.CancelScope(shield=True):
                        await self._teardown()
            control.cancel_scope.cancel()
        return self.result

    @contextlib.asynccontextmanager
    async def _around_snapshot(self, guest_running: bool) -> AsyncIterator[None]:
        """qmp.setup's snapshot point runs inside this: the Proxmox config is read and the
        guest frozen right before it, the guest thawed right after it."""
        self.guest_files = await pve.read_guest_files(self.opts.vmid)
        async with agent.frozen(
            self.opts.freeze,
            vmid=self.opts.vmid,
            skip=None if guest_running else "the VM is not running",
        ) as result:
            self.freeze = result
            if (
                self.opts.freeze is not None
                and self.opts.freeze.required
                and not (result.consistent)
            ):
                # Before the snapshot point: the set-up rolls back, the guest is thawed.
                raise FreezeRequired(
                    f"the guest's file systems are not frozen ({result.describe()}) and "
                    "--freeze=required: no snapshot was taken"
                )
            yield

    def _lock_state_dir(self, sdir: Path) -> None:
        """Take the session: make its state directory, checking the run directory on the way
        (snapfs.paths), so the default mountpoint is then made in a trusted directory."""
        with paths.open_dir(sdir.parent, "session state directory", create=0o700) as d:
            try:
                d.mkdir(sdir.name, 0o700)
            except FileExistsError:
                raise StateError(
                    f"VM {self.opts.vmid} already has a snapfs session "
                    f"(state in {sdir}; run 'snapfs cleanup {self.opts.vmid}' "
                    "if its process is gone)"
                ) from None
        _write_private(sdir / "pid", f"{os.getpid()}\n")

    def _save_state(self, graph: qmp.GraphState | None = None) -> None:
        graph = graph or self.graph
        assert graph is not None
        state = {
            "graph": graph.to_dict(),
            "pid": os.getpid(),
            "mountpoint": str(self.opts.mountpoint),
            "qmp": str(self.opts.qmp_path),
            "created_mountpoint": self.created_mountpoint,
            # Which mount is ours: cleanup unmounts the mountpoint only while it leads there.
            "mount_id": self._server.mount.id if self._server and self._server.mount else None,
        }
        _write_private(self.opts.state_dir / "state.json", json.dumps(state, indent=1))

    def _remove_state_dir(self, sdir: Path) -> None:
        remove_dir(sdir)
        if self.created_mountpoint:
            _remove_mountpoint(self.opts.mountpoint)

    async def _serve_graph(self, task_status: Any) -> None:
        g = self.graph
        assert g is not None
        async with contextlib.AsyncExitStack() as stack:
            disks = []
            clients: list[NBDClient] = []
            for ds in g.disks:
                # QEMU answers a block-status request for all negotiated contexts at once,
                # and base:allocation fails outside the copy-before-write access bitmap:
                # an incremental view asks for its dirty bitmap only.
                contexts = (
                    [f"qemu:dirty-bitmap:{ds.export_bitmap}"]
                    if ds.export_bitmap
                    else [BASE_ALLOCATION]
                    + ([f"qemu:dirty-bitmap:{ds.written}"] if ds.written else [])
                )
                client = await stack.enter_async_context(
                    NBDClient.open(str(g.nbd_socket), ds.export, meta_contexts=contexts)
                )
                clients.append(client)
                disks.append(await self._disk(client, ds))
            # allow_other shares reading only: the kernel enforces the shared modes
            # (default_permissions), and only root may punch (see tree.SHARED_DISK_MODE).
            shared = self.opts.allow_other
            self.tree = Tree(
                disks,
                self.facts,
                extra_files=self.guest_files,
                mtime_ns=int(g.snapshot_epoch * 1e9),
                shared=shared,
            )
            async with trio.open_nursery() as nursery:
                ops = self._ops = TreeOperations(self.tree)
                self._server = FuseServer(
                    ops,
                    self.opts.mountpoint,
                    name=g.vmid,
                    allow_other=shared,
                    default_permissions=shared,
                )
                for client in clients:
                    nursery.start_soon(self._watch, client)
                await nursery.start(self._run_fuse, nursery)
                self._save_state()  # now with the mount's id
                try:
                    for ds, disk in zip(g.disks, disks, strict=True):
                        await self._start_reader(nursery, ds, disk)
                    nursery.start_soon(self._signals)
                    log.info(
                        "VM %s: %d disk(s) served at %s", g.vmid, len(disks), self.opts.mountpoint
                    )
                    task_status.started()
                    await self._stop.wait()
                    nursery.cancel_scope.cancel()
                finally:
                    # The readers' threads end only when told to, so the nursery can close.
                    for reader in self._readers:
                        reader.close()

    async def _disk(self, client: NBDClient, ds: qmp.DiskState) -> Disk:
        zeros = Regions()
        if ds.export_bitmap:
            dirty = await _regions(
                client, f"qemu:dirty-bitmap:{ds.export_bitmap}", lambda f: bool(f & NBD_STATE_DIRTY)
            )
            # Incremental view: nothing is shown as a hole (see tree.Disk): what is outside
            # the backup must fail a tool that reads it, not look like zeros.
        else:
            dirty = Regions.whole(client.size)
            # Full view: SEEK_HOLE and st_blocks follow what reads as zeros, so thin disks
            # copy sparsely.
            if client.can_meta_context(BASE_ALLOCATION):
                zeros = await _zeros(
                    client, f"qemu:dirty-bitmap:{ds.written}" if ds.written else None
                )
        # Punches are aligned to what copy-before-write can drop: its cluster, which is never
        # below 64 KiB, nor below the bitmap's granularity.
        return Disk(
            name=ds.name,
            size=client.size,
            source=NBDSource(client, ds.name, self._mark_broken, ds.confine),
            dirty=dirty,
            zeros=zeros,
            granularity=max(ds.granularity, qmp.CBW_CLUSTER),
        )

    async def _start_reader(self, nursery: trio.Nursery, ds: qmp.DiskState, disk: Disk) -> None:
        """Start the splice data path of a disk; without it the disk is read through libnbd."""
        source = disk.source
        assert isinstance(source, NBDSource)
        assert self._server is not None
        assert self.graph is not None
        reader = DiskReader(
            str(self.graph.nbd_socket),
            ds.export,
            self._server.reply_pipe,
            depth=self._depth,
            confine=ds.confine,
            tune=self.opts.tune,
        )
        try:
            await nursery.start(reader.run)
        except (NBDError, FuseError) as err:
            log.warning("VM %s: %s is read without splice: %s", self.opts.vmid, source.name, err)
            return
        assert self._ops is not None
        assert self.tree is not None
        ino = self.tree.lookup(ROOT_INO, f"{disk.name}.raw").ino
        self._ops.direct[ino] = SpliceReads(
            reader, disk.size, disk.readable.contains, source.read_failed
        )
        self._readers.append(reader)
        log.debug("VM %s: %s: splice data path ready", self.opts.vmid, source.name)

    def _mark_broken(self, why: str) -> None:
        """Remember why the snapshot can no longer be read; a broken backup never commits."""
        if self.broken is None:
            log.error("VM %s: %s", self.opts.vmid, why)
            self.broken = why

    async def _watch(self, client: NBDClient) -> None:
        await client.wait_lost()
        if not self._stop.is_set():
            self._mark_broken("the VM went away (its NBD server is gone)")

    async def _run_fuse(
        self, nursery: trio.Nursery, *, task_status: Any = trio.TASK_STATUS_IGNORED
    ) -> None:
        assert self._server is not None
        try:
            await self._server.serve(task_status=task_status)
        finally:
            # The mount is gone (plain umount, or our own): the session ends with it.
            self._stop.set()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                log.warning("got %s: aborting the backup session", signal.Signals(signum).name)
                self.commit = False
                await self._unmount(lazy=True)
                return

    async def _unmount(self, *, lazy: bool) -> None:
        assert self._server is not None
        with contextlib.suppress(FuseError):
            await self._server.unmount(lazy=lazy)
        self._stop.set()

    async def _control_server(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        path = self.opts.state_dir / "control.sock"
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(4)
        task_status.started()
        await trio.serve_listeners(self._control, [trio.SocketListener(sock)])

    async def _control(self, stream: trio.SocketStream) -> None:
        """One request per connection, a JSON line each way. ``umount`` replies only after the
        teardown, with its outcome; if the request says ``"ack": true``, a line
        ``{"ack": true}`` comes first, at once (so the client can tell a stopped process from a
        long teardown)."""
        async with stream:
            data = b""
            with trio.move_on_after(CONTROL_TIMEOUT):
                while not data.endswith(b"\n"):
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    data += chunk
            if not data.endswith(b"\n"):
                return
            try:
                req = json.loads(data)
                op = req["op"]
            except (ValueError, KeyError, TypeError):
                await stream.send_all(b'{"ok": false, "error": "bad request"}\n')
                return
            if op == "status":
                reply: dict[str, Any] = {"ok": True, "status": self.facts()}
            elif op == "umount":
                assert self._server is not None
                if _hung_up(stream):
                    # The client gave up waiting (this process was stopped): not acted upon.
                    log.warning(
                        "VM %s: ignoring an umount request its client gave up", self.opts.vmid
                    )
                    return
                if req.get("ack"):
                    try:
                        await stream.send_all(b'{"ack": true}\n')
                    except trio.BrokenResourceError:
                        return
                # Decided before the unmount: teardown starts as soon as the mount is gone.
                self.commit = bool(req.get("commit"))
                try:
                    await self._server.unmount(lazy=False)
                except FuseError as err:
                    self.commit = False
                    reply = {"ok": False, "error": str(err), "exit": StateError.exit_code}
                else:
                    self._stop.set()
                    with trio.CancelScope(shield=True):
                        await self._done.wait()
                        reply = self.result
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
            with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(json.dumps(reply).encode() + b"\n")

    async def _teardown(self) -> None:
        """Tear down with commit or abort; record the outcome in ``self.result``."""
        g = self.graph
        assert g is not None
        ours = self._server.mount if self._server else None
        # Our mount, still there, that its path no longer leads to: the state stays, so that
        # `snapfs cleanup` can unmount it once the path leads there again.
        left_mounted = False
        if ours is not None and kernel.live(ours):
            try:
                await trio.to_thread.run_sync(
                    lambda: kernel.unmount(self.opts.mountpoint, lazy=True, expect=ours)
                )
            except FuseError as err:
                left_mounted = True
                log.warning("VM %s: %s; run 'snapfs cleanup %s' once it does", g.vmid, err, g.vmid)
        commit = self.commit and self.broken is None
        keep_state = left_mounted
        try:
            async with _qmp_session(self.opts.qmp_path, g.vmid) as q:
                await qmp.teardown(q, g, commit=commit)
        except VMGoneError as err:
            removed = forget_fleecing(g)
            log.error(
                "VM %s went away during the backup (%s); removed %d fleecing image(s)",
                g.vmid,
                err,
                len(removed),
            )
            self.result = {
                "ok": False,
                "committed": False,
                "exit": err.exit_code,
                "error": f"VM {g.vmid} went away during the backup; nothing was committed",
            }
        except SnapfsError as err:
            # Keep the state file: `snapfs cleanup` can retry what is left.
            keep_state = True
            log.error("VM %s: teardown: %s", g.vmid, err)
            self.result = {
                "ok": False,
                "exit": err.exit_code,
                "committed": False,
                "error": f"{err} (run 'snapfs cleanup {g.vmid}' to retry)",
            }
        else:
            self.result = {"ok": True, "committed": commit}
            if self.commit and not commit:
                self.result = {
                    "ok": False,
                    "committed": False,
                    "exit": StateError.exit_code,
                    "error": f"the snapshot broke ({self.broken}); nothing was committed",
                }
            log.info("VM %s: torn down (%s)", g.vmid, "committed" if commit else "aborted")
        self.result["incremental"] = g.incremental
        if keep_state:
            (self.opts.state_dir / "control.sock").unlink(missing_ok=True)
        else:
            self._remove_state_dir(self.opts.state_dir)
        self._done.set()


# -- the client side: used by the CLI ------------------------------------------------------------


def find_session(target: str) -> tuple[str, dict[str, Any]]:
    """The (vmid, state) of the session named by a VMID or a mountpoint (relative to the
    working directory; one named like a VMID is written ./NAME)."""
    root = run_dir() / ".state"
    if VMID_RE.fullmatch(target):
        st = _read_state(root / target)
        if st is not None:
            return target, st
        raise StateError(f"no snapfs session for {target!r}")
    given = _check_path(target, "mountpoint")
    with paths.walk(root, "session state directory") as w:
        names = [] if w.rest else paths.Dir(w).listdir()
    sessions = [(name, st) for name in names if (st := _read_state(root / name)) is not None]
    # The mountpoint itself is not touched: a lookup of a mount whose serving process is
    # stopped would wait for it in the kernel.
    want = paths.resolve(given.parent, "mountpoint") / given.name
    for name, st in sessions:
        if Path(st["mountpoint"]) == want:
            return name, st
    if sessions:
        # A symlink to a mountpoint (resolving it looks into the mount).
        real = paths.resolve(given, "mountpoint")
        for name, st in sessions:
            if Path(st["mountpoint"]) == real:
                return name, st
    raise StateError(f"no snapfs session for {target!r}")


def _read_state(sdir: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(
            paths.read_text(sdir / "state.json", "session state directory")
        )
    except FileNotFoundError:
        return None
    except ValueError as err:
        raise StateError(f"state file in {sdir} is damaged: {err}") from err
    return data


class _Control:
    """The CLI's end of one control connection: one request, then reply lines, every wait
    bounded. The errors say what to do about a serving process that is stopped or gone."""

    def __init__(self, vmid: str) -> None:
        self.vmid = vmid
        self.pid = _read_pid(state_dir(vmid))
        self.who = f"the serving process of VM {vmid}" + (f" (pid {self.pid})" if self.pid else "")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = b""

    def __enter__(self) -> _Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def not_answering(self) -> StateError:
        resume = f"resume it (kill -CONT {self.pid}) and retry, or " if self.pid else ""
        return StateError(
            f"{self.who} does not answer (stopped?); nothing was done: {resume}kill it and "
            f"run 'snapfs cleanup {self.vmid}'"
        )

    def send(self, req: dict[str, Any]) -> None:
        path = state_dir(self.vmid) / "control.sock"
        self.sock.settimeout(CONTROL_TIMEOUT)
        try:
            self.sock.connect(str(path))
            self.sock.sendall(json.dumps(req).encode() + b"\n")
        except (FileNotFoundError, ConnectionRefusedError) as err:
            if self.pid is not None and _alive(self.pid) and not path.exists():
                raise StateError(f"{self.who} is still setting up; try again") from err
            raise StateError(
                f"the serving process of VM {self.vmid} is gone (run 'snapfs cleanup {self.vmid}')"
            ) from err
        except TimeoutError as err:
            raise self.not_answering() from err
        except OSError as err:
            raise StateError(f"cannot reach {self.who}: {err.strerror or err}") from err

    def reply(self, timeout: float, on_wait: Callable[[], None] | None = None) -> dict[str, Any]:
        """The next reply line within ``timeout`` seconds (TimeoutError). ``on_wait`` runs
        every second while there is none; EOF: StateError."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(min(left, 1.0))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                if on_wait is not None:
                    on_wait()
                continue
            except OSError as err:  # e.g. ECONNRESET: it died
                raise StateError(f"{self.who} ended without an answer ({err})") from err
            if not chunk:
                raise StateError(f"{self.who} ended without an answer")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            reply = json.loads(line)
        except ValueError as err:
            raise StateError(f"{self.who} gave a reply that is not JSON: {line[:80]!r}") from err
        if not isinstance(reply, dict):
            raise StateError(f"{self.who} gave a reply that is not an object: {line[:80]!r}")
        return reply


def request(vmid: str, req: dict[str, Any], timeout: float = CONTROL_TIMEOUT) -> dict[str, Any]:
    """Send one control request to a serving process and return its reply (within
    ``timeout`` seconds, else StateError "does not answer")."""
    with _Control(vmid) as c:
        c.send(req)
        try:
            return c.reply(timeout)
        except TimeoutError as err:
            raise c.not_answering() from err


def umount(target: str, *, commit: bool) -> dict[str, Any]:
    """Ask the serving process to unmount and tear down; its outcome.

    It acknowledges at once and answers when the teardown is done: no acknowledgement within
    CONTROL_TIMEOUT (stopped), no outcome within a bound derived from the QMP timeouts, or a
    process that stops or dies before its outcome: a one-line error saying what to do.
    """
    vmid, state = find_session(target)
    disks = len(state.get("graph", {}).get("disks", [])) if isinstance(state, dict) else 0
    bound = qmp.teardown_bound(max(disks, 1)) + _UMOUNT_SLACK
    with _Control(vmid) as c:
        c.send({"op": "umount", "commit": commit, "ack": True})
        try:
            reply = c.reply(CONTROL_TIMEOUT)
        except TimeoutError as err:
            raise c.not_answering() from err
        if "ack" in reply:  # (a serving process of an older snapfs sends only the outcome)
            stopped_since: list[float] = []

            def watch() -> None:
                # A stopped process never answers: say so within CONTROL_TIMEOUT.
                if c.pid is None or not _stopped(c.pid):
                    stopped_since.clear()
                    return
                stopped_since[:] = stopped_since or [time.monotonic()]
                if time.monotonic() - stopped_since[0] >= CONTROL_TIMEOUT:
                    raise TimeoutError

            advice = (
                f"resume it (kill -CONT {c.pid}) to let it finish, or kill it and " if c.pid else ""
            ) + f"run 'snapfs cleanup {vmid}'"
            try:
                reply = c.reply(bound, on_wait=watch)
            except TimeoutError as err:
                how = "was stopped" if c.pid and _stopped(c.pid) else f"took over {bound:g}s"
                raise TeardownError(f"{c.who} {how} during the teardown: {advice}") from err
            except StateError as err:
                maybe = " (the commit may not have been made)" if commit else ""
                raise TeardownError(
                    f"{c.who} died during the teardown{maybe}: run 'snapfs cleanup {vmid}'"
                ) from err
    if not reply.get("ok"):
        exc = TeardownError if reply.get("exit") == TeardownError.exit_code else StateError
        raise exc(reply.get("error", "umount failed"))
    return reply


def _read_pid(sdir: Path) -> int | None:
    try:
        return int(paths.read_text(sdir / "pid", "session state directory"))
    except (FileNotFoundError, ValueError):
        return None


def _hung_up(stream: trio.SocketStream) -> bool:
    """Whether the peer of a control connection has closed it (EOF is waiting)."""
    with socket.socket(fileno=os.dup(stream.socket.fileno())) as s:
        try:
            return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True


def _stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP, or a tracer): it answers nothing until resumed."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat_line[stat_line.rindex(b")") + 2 : stat_line.rindex(b")") + 3] in (b"T", b"t")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not yet reaped by its new parent) does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the command name, which is in parentheses and may contain any byte.
    return stat_line[stat_line.rindex(b")") + 2 : stat_line.rindex(b")") + 3] not in (b"Z", b"X")


async def _wait_exit(pid: int) -> None:
    """Wait until ``pid`` has exited (its pidfd turns readable then)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


def remove_dir(path: Path) -> None:
    """Remove a session directory and the files in it, if it exists."""
    with paths.walk(path, "session state directory") as w:
        if w.rest:
            return  # gone (or not a directory, so not ours)
        d = paths.Dir(w)
        for name in d.listdir():
            with contextlib.suppress(FileNotFoundError):
                d.unlink(name)
        if d.parent_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(d.name, dir_fd=d.parent_fd)


def _remove_mountpoint(mp: Path) -> None:
    """Remove the (empty) mountpoint directory snapfs made; nothing if it is busy or gone."""
    with contextlib.suppress(OSError, UsageError), paths.open_dir(mp.parent, "mountpoint") as d:
        d.rmdir(mp.name)


def forget_fleecing(graph: qmp.GraphState) -> list[str]:
    """The VM is gone: its fleecing images protect nothing any more."""
    removed = []
    for d in graph.disks:
        try:
            if paths.unlink(Path(d.fleecing_path), "fleecing image"):
                removed.append(d.fleecing_path)
        except (OSError, UsageError) as err:
            log.warning("cannot remove %s: %s", d.fleecing_path, err)
    return removed


def _unmount_stale(vmid: str, mp: Path, mount_id: int | None) -> str | None:
    """Lazily unmount the dead session's mount, if it is still there and ``mp`` leads to it.
    What was done; raises FuseError if the mount is there but ``mp`` leads elsewhere."""
    ours = kernel.find_snapfs(vmid, mp, mount_id)
    if ours is None:
        return None
    kernel.unmount(mp, lazy=True, expect=ours)
    return f"unmounted {mp}"


async def cleanup(vmid: str, qmp_path: Path | None = None) -> list[str]:
    """Tear down what a dead serving process left: the mount, the graph (abort), the state.

    Idempotent: with nothing left, it does nothing and succeeds. Returns what it did. The mount
    is unmounted only while its mountpoint leads to it: otherwise the graph is still restored,
    the state kept (for the next cleanup) and a StateError says what is in the way.
    """
    check_vmid(vmid)
    if qmp_path is not None:
        paths.resolve(qmp_path, "QMP socket")
    sdir = state_dir(vmid)
    st = _read_state(sdir)
    pid = _read_pid(sdir)
    if pid is not None and pid != os.getpid():
        # A serving process that just answered a failed umount is still on its way out.
        with trio.move_on_after(5):
            await _wait_exit(pid)
    if pid is not None and pid != os.getpid() and _alive(pid):
        if _stopped(pid):
            raise StateError(
                f"VM {vmid}'s serving process ({pid}) is stopped: resume it (kill -CONT {pid}) "
                f"and use 'snapfs umount {vmid}', or kill it and run 'snapfs cleanup {vmid}'"
            )
        raise StateError(
            f"VM {vmid}'s serving process ({pid}) is alive; use 'snapfs umount {vmid}'"
        )
    done: list[str] = []
    if st is not None:
        mp = Path(st["mountpoint"])
        in_the_way = None
        try:
            line = _unmount_stale(vmid, mp, st.get("mount_id"))
        except FuseError as err:
            in_the_way = err
        else:
            done += [line] if line else []
        graph = qmp.GraphState.from_dict(st["graph"])
        try:
            async with _qmp_session(qmp_path or Path(st["qmp"]), vmid) as q:
                await qmp.teardown(q, graph, commit=False)
            done.append("restored the block graph")
        except VMGoneError:
            done += [f"VM {vmid} is gone; removed {f}" for f in forget_fleecing(graph)]
        if in_the_way is not None:
            for line in done:
                log.info("%s", line)
            raise StateError(f"{in_the_way}; run 'snapfs cleanup {vmid}' again once it does")
        if st.get("created_mountpoint"):
            _remove_mountpoint(mp)
    else:
        # Killed during set-up, before the state file: find our nodes by their prefix.
        qp = qmp_path or DEFAULT_QMP_DIR / f"{vmid}.qmp"
        if paths.exists(qp, "QMP socket"):
            async with _qmp_session(qp, vmid) as q:
                done += await qmp.cleanup_orphans(q)
    if await trio.Path(sdir).exists():
        await trio.to_thread.run_sync(remove_dir, sdir)
        done.append("removed the session state")
    return done


def unwrap(exc: BaseException) -> BaseException:
    """The error worth reporting from a (possibly nested) exception group: a lone leaf, or the
    first snapfs error among several."""
    while isinstance(exc, BaseExceptionGroup):
        if len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
            continue
        ours = [e for e in exc.exceptions if isinstance(unwrap(e), SnapfsError)]
        if not ours:
            return exc
        exc = unwrap(ours[0])
    return exc


def run_trio(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run an async function under trio with an asyncio loop for qemu.qmp; errors come out of
    nurseries' exception groups as the single error they stand for."""

    async def main() -> Any:
        async with trio_asyncio.open_loop():
            return await fn(*args, **kwargs)

    try:
        return trio.run(main)
    except BaseExceptionGroup as group:
        err = unwrap(group)
        if err is group:
            raise
        raise err from group


def utc_now() -> tuple[str, float]:
    now = time.time()
    return datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"), now
