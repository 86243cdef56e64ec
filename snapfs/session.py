"""One mounted VM: orchestration only. It wires the QMP graph (snapfs.qmp), the view's disks
(snapfs.source), the data path (snapfs.datapath), the FUSE server (snapfs.fuse) and the control
socket (snapfs.control) together and owns the session's lifecycle; the options come checked
(snapfs.options), the state directory is snapfs.state's, the records snapfs.records'.

Lifecycle of the serving process (``serve``)::

    validate -> lock session dir -> QMP set-up (connect, plan -> state file, build graph,
      disconnect) -> state file -> NBD connections -> tree -> FUSE mount (INIT answered)
      -> control socket -> READY
      -> serve until: the mount goes away (plain umount), `snapfs umount` asks, or a signal
      -> QMP teardown (commit or abort; deleting the exports closes the NBD connections)
      -> remove state -> close NBD -> exit

Invariants:
- QMP is connected only during set-up and teardown, never while serving (Proxmox's management
  stack takes the same socket one client at a time); where a client's disconnect would make
  QEMU abort, also once right after the NBD connections open, to hand them to QEMU.
- No NBD connection closes before the teardown has deleted the exports (QEMU closes them).
- Everything teardown needs is in ``<run_dir>/.state/<vmid>/state.json`` before the set-up
  changes the VM (the plan), and again once it is complete, so another process (``snapfs
  cleanup``) can tear down after a crash, or after QEMU stopped answering during the set-up.
- Every wait on QEMU is bounded (qmp.command_timeout); so is every wait of the CLI on the
  serving process (snapfs.control).
- Without an explicit commit, teardown aborts: the next incremental still sees every change.
- While it serves, the state directory is kept in place: removed by hand or by a cleaner of
  /run, it is put back within STATE_CHECK seconds (with a new control socket), so `snapfs
  umount` and `snapfs status` still find the session. QEMU's NBD socket there cannot be
  put back; `snapfs copy` then reads through the view.

Paths (see snapfs.paths): the mountpoint, the fleecing directory, the state directory and the
QMP and agent sockets are resolved against the working directory in ``options.validate`` (before the
serving process forks) and must be trusted paths: no component that a user but root owns or
can write, symlinks only where root put them. Everything snapfs creates, replaces or removes
there is done relative to a descriptor of the checked directory. The mount is made on the
checked directory and identified by its mount id, which goes into the state file: unmounts
(``snapfs umount``, teardown, ``cleanup``) check that the path still leads to that mount and
leave anything else alone, saying so in one line.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from snapfs import agent, fastpath, paths, pve, qmp, source, state
from snapfs.control import serve as serve_control
from snapfs.datapath import READ_AHEAD_MIN, DiskReader, SharedDepth, SpliceReads
from snapfs.errors import (
    FuseError,
    NBDError,
    QMPTimeoutError,
    SetupError,
    SnapfsError,
    StateError,
    VMGoneError,
)
from snapfs.fs import TreeOperations
from snapfs.fuse import kernel
from snapfs.fuse.server import FuseServer, Intake
from snapfs.nbd.client import NBDClient
from snapfs.options import MountOptions
from snapfs.records import BitmapFacts, DiskFacts, Facts, FreezeFacts, Outcome, StateRecord
from snapfs.tree import ROOT_INO, Disk, Tree

log = logging.getLogger(__name__)

#: How often the serving process checks that its state directory is still there (seconds).
STATE_CHECK = 1.0


class FreezeRequired(SetupError):
    """--freeze=required, and the guest could not be frozen."""


def _allocated(path: str) -> int:
    """Bytes a file occupies on its file system (0 if it is gone)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


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
        self._intake: Intake | None = None  # the FUSE requests, as a reader reads them
        self._compiled: fastpath.CompiledIntake | None = None  # what reads them first
        self._fast: list[fastpath.FastDisk] = []
        self._clients: list[NBDClient] = []  # the disks' libnbd connections
        self._done = trio.Event()
        self._tearing_down = False  # from the first step of the teardown on
        self.result = Outcome(ok=False, error="not torn down yet")

    # -- facts ------------------------------------------------------------------------------------

    def facts(self) -> Facts:
        g, tree = self.graph, self.tree
        assert g is not None
        assert tree is not None
        disks = {}
        for d, ds in zip(tree.disks, g.disks, strict=True):
            disks[d.name] = DiskFacts(
                size=d.size,
                format=ds.format,
                nodes=ds.nodes(),
                bitmap=BitmapFacts.from_dict(ds.bitmap_facts()),
                dirty_bytes=d.dirty.total,
                dirty_regions=len(d.dirty),
                readable_bytes=d.readable.total,
                discarded_bytes=d.discarded,
                bytes_read=d.total_read,
                fleecing_bytes=_allocated(ds.fleecing_path),
                confined_reads=ds.confine,
                fleecing_cluster=ds.cbw_cluster,
            )
        return Facts(
            vmid=g.vmid,
            snapshot_time=g.snapshot_time,
            qemu_version=g.qemu_version,
            pause_ms=g.pause_ms,
            incremental=g.incremental,
            mountpoint=str(self.opts.mountpoint),
            broken=self.broken,
            freeze=FreezeFacts.from_dict(self.freeze.facts()) if self.freeze else None,
            disks=disks,
            log=self.opts.log_to,
            tuned=self.opts.tune,
        )

    def status(self) -> Facts:
        """control.Handler: the view's facts."""
        return self.facts()

    # -- lifecycle --------------------------------------------------------------------------------

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> Outcome:
        """Set up, serve until asked to stop, tear down. ``task_status.started()`` is called once
        the tree is served. Returns the teardown result."""
        opts = self.opts
        sdir = opts.state_dir
        if opts.stale:
            for line in await state.cleanup(opts.vmid, opts.qmp_path):
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
            async with state.qmp_session(opts.qmp_path, opts.vmid) as q:
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
                        fleecing_cluster=opts.fleecing_cluster,
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
            await control.start(
                functools.partial(serve_control, self.opts.state_dir / "control.sock", self)
            )
            control.start_soon(self._keep_state_dir, control)
            try:
                await self._serve_graph(task_status)
            except SnapfsError as err:
                # E.g. QEMU stopped before the NBD handshake: say what the teardown did.
                with trio.CancelScope(shield=True):
                    await self._teardown_once()
                done = "the VM was restored" if self.result.ok else self.result.error
                err.args = (f"{err}; {done}", *err.args[1:])
                raise
            finally:
                with trio.CancelScope(shield=True):
                    await self._teardown_once()
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
        state.write_private(sdir / "pid", f"{os.getpid()}\n")

    def _save_state(self, graph: qmp.GraphState | None = None) -> None:
        graph = graph or self.graph
        assert graph is not None
        server = self._server
        state.write_state(
            self.opts.state_dir,
            StateRecord(
                graph=graph.to_dict(),
                pid=os.getpid(),
                mountpoint=str(self.opts.mountpoint),
                qmp=str(self.opts.qmp_path),
                created_mountpoint=self.created_mountpoint,
                mount_id=server.mount.id if server and server.mount else None,
            ),
        )

    async def _keep_state_dir(self, control: trio.Nursery) -> None:
        """Put the state directory back while the session serves (see the module). A new
        control socket is served beside the old one, whose path is gone: a request the old
        one is answering (an umount) is never cut off."""
        sdir = self.opts.state_dir
        sock = sdir / "control.sock"
        served = _identity(sock)
        failing = False  # said once, not every STATE_CHECK
        while True:
            await trio.sleep(STATE_CHECK)
            if self._tearing_down:
                return
            pid_there = _identity(sdir / "pid") is not None
            state_there = _identity(sdir / "state.json") is not None
            if served == _identity(sock) and pid_there and state_there:
                continue
            if not failing:
                log.warning(
                    "VM %s: the session's state in %s was removed; putting it back",
                    self.opts.vmid,
                    sdir,
                )
            try:
                with (
                    paths.open_dir(sdir.parent, "session state directory", create=0o700) as d,
                    contextlib.suppress(FileExistsError),
                ):
                    d.mkdir(sdir.name, 0o700)
                with paths.open_dir(sdir, "session state directory") as d:
                    if served != _identity(sock):
                        d.unlink(sock.name)
                state.write_private(sdir / "pid", f"{os.getpid()}\n")
                self._save_state()
                if served != _identity(sock):
                    await control.start(functools.partial(serve_control, sock, self))
                    served = _identity(sock)
                failing = False
            except (OSError, SnapfsError) as err:
                if not failing:
                    log.error(
                        "VM %s: cannot put the session's state back (trying again): %s",
                        self.opts.vmid,
                        err,
                    )
                failing = True

    def _remove_state_dir(self, sdir: Path) -> None:
        state.remove_dir(sdir)
        if self.created_mountpoint:
            state.remove_mountpoint(self.opts.mountpoint)

    async def _serve_graph(self, task_status: Any) -> None:
        g = self.graph
        assert g is not None
        async with contextlib.AsyncExitStack() as stack:
            try:
                await self._serve_connected(stack, task_status)
            finally:
                # Before the stack closes the NBD connections opened so far.
                with trio.CancelScope(shield=True):
                    await self._teardown_once()

    async def _serve_connected(self, stack: contextlib.AsyncExitStack, task_status: Any) -> None:
        """Connect, mount and serve; the NBD connections go into ``stack``. Every way out
        tears down before a connection closes: QEMU closes them itself when the exports are
        deleted, and some QEMU versions abort when a client disconnects first
        (``qmp.client_close_aborts``)."""
        g = self.graph
        assert g is not None
        disks = []
        clients = self._clients
        for ds in g.disks:
            # QEMU answers a block-status request for all negotiated contexts at once,
            # and base:allocation fails outside the copy-before-write access bitmap:
            # an incremental view asks for its dirty bitmap only.
            contexts = source.contexts(ds)
            client = await stack.enter_async_context(
                NBDClient.open(str(g.nbd_socket), ds.export, meta_contexts=contexts)
            )
            clients.append(client)
            disks.append(await source.disk(client, ds, self._mark_broken))
        # allow_other shares reading only: the kernel enforces the shared modes
        # (default_permissions), and only root may punch (see tree.SHARED_DISK_MODE).
        shared = self.opts.allow_other
        self.tree = Tree(
            disks,
            lambda: self.facts().to_dict(),
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
                if g.client_close_aborts:
                    await self._hold_connections()
                nursery.start_soon(self._signals)
                log.info("VM %s: %d disk(s) served at %s", g.vmid, len(disks), self.opts.mountpoint)
                task_status.started()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    await self._teardown_once()
                # The readers' threads end only when told to, so the nursery can close.
                # The compiled path first: the intake's thread may wait for its replies.
                for fast in self._fast:
                    fast.close()
                    c = fast.compiled.counters
                    log.info(
                        "VM %s: %s: compiled code answered %d READs (%d bytes), handed back "
                        "%d, copied %d, QEMU refused %d",
                        g.vmid,
                        fast.name,
                        c["reads"],
                        c["bytes"],
                        c["declined"],
                        c["copied"],
                        c["errors"],
                    )
                for reader in self._readers:
                    reader.close()
                    if reader.verified:
                        log.info(
                            "VM %s: %s: %d reads across copy-before-write clusters were "
                            "checked against the copied bitmap, %d of them read again",
                            g.vmid,
                            reader.name,
                            reader.verified,
                            reader.reread,
                        )
                if self._intake is not None:
                    log.info(
                        "VM %s: the data path read %d FUSE requests and answered %d READs",
                        g.vmid,
                        self._intake.requests,
                        self._intake.reads,
                    )

    async def _start_reader(self, nursery: trio.Nursery, ds: qmp.DiskState, disk: Disk) -> None:
        """Start the splice data path of a disk; without it the disk is read through libnbd."""
        nbd_source = disk.source
        assert isinstance(nbd_source, source.NBDSource)
        assert self._server is not None
        assert self.graph is not None
        assert self._ops is not None
        # The first reader also reads the FUSE requests (see DiskReader): its disk's READs
        # then never cross a thread, and no disk's READs pass through the trio thread.
        intake = None if self._intake else self._server.intake(self._ops.read_now, self._taker)
        reader = DiskReader(
            str(self.graph.nbd_socket),
            ds.export,
            self._server.reply_pipe,
            depth=self._depth,
            confine=ds.confine,
            copied=ds.copied,
            tune=self.opts.tune,
            intake=intake,
        )
        try:
            await nursery.start(reader.run)
        except (NBDError, FuseError) as err:
            log.warning(
                "VM %s: %s is read without splice: %s", self.opts.vmid, nbd_source.name, err
            )
            return
        if reader.reads_requests:
            self._intake = intake
        assert self.tree is not None
        ino = self.tree.lookup(ROOT_INO, f"{disk.name}.raw").ino
        splice = SpliceReads(
            reader, disk.size, disk.can_read, nbd_source.read_failed, disk.reads_as_zeros
        )
        self._ops.direct[ino] = splice
        self._readers.append(reader)
        log.debug("VM %s: %s: splice data path ready", self.opts.vmid, nbd_source.name)
        await self._start_compiled(ds, disk, ino, splice)

    async def _hold_connections(self) -> None:
        """Where a client that disconnects first makes QEMU abort (``client_close_aborts``),
        QEMU keeps a descriptor of each of the session's NBD connections: should this process
        die, they stay open until a teardown has deleted the exports. Without that the backup
        goes on: every way out of serving tears down first (``_serve_graph``)."""
        g = self.graph
        assert g is not None
        fds = [c.fileno for c in self._clients]
        fds += [fd for fd in (r.nbd_fileno for r in self._readers) if fd is not None]
        fds += [f.nbd_fileno for f in self._fast]
        # Recorded first: whatever QEMU got, a teardown releases it.
        g.held_fds = [f"{qmp.PREFIX}nbd-{i}" for i in range(len(fds))]
        self._save_state()
        try:
            async with state.qmp_session(self.opts.qmp_path, g.vmid) as q:
                for fd, name in zip(fds, g.held_fds, strict=True):
                    await q.hold_fd(fd, name)
        except SnapfsError as err:
            log.warning(
                "VM %s: QEMU does not keep the NBD connections (%s): if this process is "
                "killed, QEMU aborts",
                g.vmid,
                err,
            )
        else:
            log.info("VM %s: QEMU keeps the session's %d NBD connections", g.vmid, len(fds))

    def _taker(self, fuse_fd: int) -> fastpath.CompiledIntake | None:
        """The compiled READ path's intake for the intake on ``fuse_fd``, if it is built."""
        self._compiled = fastpath.intake(fuse_fd)
        return self._compiled

    async def _start_compiled(
        self, ds: qmp.DiskState, disk: Disk, ino: int, splice: SpliceReads
    ) -> None:
        """Answer the disk's READs in compiled code too, where it is built (snapfs.fastpath)."""
        compiled = self._compiled
        if compiled is None or self._intake is None:
            return
        assert self.graph is not None
        try:
            fast = await fastpath.FastDisk.open(
                str(self.graph.nbd_socket),
                ds.export,
                disk,
                ino,
                confine=ds.confine,
                tune=self.opts.tune,
                ahead=READ_AHEAD_MIN,
            )
        except (NBDError, OSError) as err:  # OSError: no descriptor left for its own dup
            log.warning(
                "VM %s: %s is read without compiled code: %s", self.opts.vmid, disk.name, err
            )
            return
        self._fast.append(fast)
        if compiled.add(fast.compiled):
            splice.cursor = fast.compiled
            log.debug("VM %s: %s: compiled READ path ready", self.opts.vmid, disk.name)

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

    async def umount(self, commit: bool, acknowledge: Callable[[], Awaitable[bool]]) -> Outcome:
        """control.Handler: unmount, tear down (commit or abort), and say how it went."""
        assert self._server is not None
        if not await acknowledge():
            return Outcome(ok=False, error="the client went away")
        # Decided before the unmount: teardown starts as soon as the mount is gone.
        self.commit = commit
        try:
            await self._server.unmount(lazy=False)
        except FuseError as err:
            self.commit = False
            return Outcome(ok=False, error=str(err), exit=StateError.exit_code)
        self._stop.set()
        with trio.CancelScope(shield=True):
            await self._done.wait()
        return self.result

    async def _teardown_once(self) -> None:
        if not self._done.is_set():
            await self._teardown()

    async def _teardown(self) -> None:
        """Tear down with commit or abort; record the outcome in ``self.result``."""
        self._tearing_down = True
        self._stop.set()  # the NBD connections are about to go: not a VM that went away
        for client in self._clients:
            client.expect_loss()
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
            async with state.qmp_session(self.opts.qmp_path, g.vmid) as q:
                await qmp.teardown(q, g, commit=commit)
        except VMGoneError as err:
            removed = state.forget_fleecing(g)
            log.error(
                "VM %s went away during the backup (%s); removed %d fleecing image(s)",
                g.vmid,
                err,
                len(removed),
            )
            self.result = Outcome(
                ok=False,
                exit=err.exit_code,
                error=f"VM {g.vmid} went away during the backup; nothing was committed",
            )
        except SnapfsError as err:
            # Keep the state file: `snapfs cleanup` can retry what is left.
            keep_state = True
            log.error("VM %s: teardown: %s", g.vmid, err)
            self.result = Outcome(
                ok=False,
                exit=err.exit_code,
                error=f"{err} (run 'snapfs cleanup {g.vmid}' to retry)",
            )
        else:
            self.result = Outcome(ok=True, committed=commit)
            if self.commit and not commit:
                self.result = Outcome(
                    ok=False,
                    exit=StateError.exit_code,
                    error=f"the snapshot broke ({self.broken}); nothing was committed",
                )
            log.info("VM %s: torn down (%s)", g.vmid, "committed" if commit else "aborted")
        self.result.incremental = g.incremental
        if keep_state:
            (self.opts.state_dir / "control.sock").unlink(missing_ok=True)
        else:
            self._remove_state_dir(self.opts.state_dir)
        self._done.set()


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` is now (device, inode), or None if there is none."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
