"""The state of sessions on this host: ``<run_dir>/.state/<vmid>/`` with the serving process's
pid, its ``state.json`` (snapfs.records.StateRecord) and its control socket.

Finding a session (by VMID or mountpoint), telling whether its serving process lives, and
cleaning up after one that died (``cleanup``: the mount, the VM's graph, the state) are here;
``snapfs status`` and ``snapfs umount`` use them too. Everything is done through trusted paths
(snapfs.paths), relative to directory descriptors, without following symlinks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from snapfs import lazy_module, paths
from snapfs.errors import FuseError, StateError, UsageError, VMGoneError
from snapfs.fuse import kernel
from snapfs.records import StateRecord

if TYPE_CHECKING:
    import trio

    from snapfs import qmp
else:  # finding a session (snapfs copy) needs neither
    trio = lazy_module("trio")
    qmp = lazy_module("snapfs.qmp")

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path("/run/snapfs")
DEFAULT_QMP_DIR = Path("/var/run/qemu-server")
# Proxmox's VMID range; plain QEMU users pick any number in it.
VMID_RE = re.compile(r"[1-9][0-9]{0,8}")


def run_dir() -> Path:
    """The directory for default mountpoints and session state (SNAPFS_RUN_DIR for tests)."""
    return Path(os.environ.get("SNAPFS_RUN_DIR", str(DEFAULT_RUN_DIR))).absolute()


def state_dir(vmid: str) -> Path:
    return run_dir() / ".state" / vmid


def check_vmid(vmid: str) -> str:
    if not VMID_RE.fullmatch(vmid):
        shown = vmid if len(vmid) <= 40 else vmid[:40] + "..."
        raise UsageError(f"invalid VMID {shown!r}: expected a number from 1 to 999999999")
    return vmid


def read_state(sdir: Path) -> StateRecord | None:
    """A session's state file, or None if there is none."""
    try:
        text = paths.read_text(sdir / "state.json", "session state directory")
    except FileNotFoundError:
        return None
    try:
        return StateRecord.from_json(text, "state.json")
    except ValueError as err:
        raise StateError(f"state file in {sdir} is damaged: {err}") from err


def write_state(sdir: Path, record: StateRecord) -> None:
    write_private(sdir / "state.json", record.to_json(indent=1))


def write_private(path: Path, data: str) -> None:
    """Write a 0600 file atomically (rename), so a reader never sees half a state file."""
    paths.write_atomic(path, data, "session state directory")


@contextlib.asynccontextmanager
async def qmp_session(path: Path, vmid: str = "") -> AsyncIterator[qmp.QMP]:
    async with qmp.QMP.connect(path, vm=vmid) as q:
        yield q


def find_session(target: str) -> tuple[str, StateRecord]:
    """The (vmid, state) of the session named by a VMID or a mountpoint (relative to the
    working directory; one named like a VMID is written ./NAME)."""
    root = run_dir() / ".state"
    if VMID_RE.fullmatch(target):
        st = read_state(root / target)
        if st is not None:
            return target, st
        raise StateError(f"no snapfs session for {target!r}")
    given = paths.absolute(target, "mountpoint")
    with paths.walk(root, "session state directory") as w:
        names = [] if w.rest else paths.Dir(w).listdir()
    sessions = [(name, st) for name in names if (st := read_state(root / name)) is not None]
    # The mountpoint itself is not touched: a lookup of a mount whose serving process is
    # stopped would wait for it in the kernel.
    want = paths.resolve(given.parent, "mountpoint") / given.name
    for name, st in sessions:
        if Path(st.mountpoint) == want:
            return name, st
    if sessions:
        # A symlink to a mountpoint (resolving it looks into the mount).
        real = paths.resolve(given, "mountpoint")
        for name, st in sessions:
            if Path(st.mountpoint) == real:
                return name, st
    raise StateError(f"no snapfs session for {target!r}")


def read_pid(sdir: Path) -> int | None:
    try:
        return int(paths.read_text(sdir / "pid", "session state directory"))
    except (FileNotFoundError, ValueError):
        return None


def stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP, or a tracer): it answers nothing until resumed."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat_line[stat_line.rindex(b")") + 2 : stat_line.rindex(b")") + 3] in (b"T", b"t")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not yet reaped by its new parent) does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state follows the command name, which is in parentheses and may contain any byte.
    return stat_line[stat_line.rindex(b")") + 2 : stat_line.rindex(b")") + 3] not in (b"Z", b"X")


async def wait_exit(pid: int) -> None:
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


def remove_mountpoint(mp: Path) -> None:
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


def unmount_stale(vmid: str, mp: Path, mount_id: int | None) -> str | None:
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
    st = read_state(sdir)
    pid = read_pid(sdir)
    if pid is not None and pid != os.getpid():
        # A serving process that just answered a failed umount is still on its way out.
        with trio.move_on_after(5):
            await wait_exit(pid)
    if pid is not None and pid != os.getpid() and alive(pid):
        if stopped(pid):
            raise StateError(
                f"VM {vmid}'s serving process ({pid}) is stopped: resume it (kill -CONT {pid}) "
                f"and use 'snapfs umount {vmid}', or kill it and run 'snapfs cleanup {vmid}'"
            )
        raise StateError(
            f"VM {vmid}'s serving process ({pid}) is alive; use 'snapfs umount {vmid}'"
        )
    done: list[str] = []
    if st is not None:
        mp = Path(st.mountpoint)
        in_the_way = None
        try:
            line = unmount_stale(vmid, mp, st.mount_id)
        except FuseError as err:
            in_the_way = err
        else:
            done += [line] if line else []
        graph = qmp.GraphState.from_dict(st.graph)
        try:
            async with qmp_session(qmp_path or Path(st.qmp), vmid) as q:
                await qmp.teardown(q, graph, commit=False)
            done.append("restored the block graph")
        except VMGoneError:
            done += [f"VM {vmid} is gone; removed {f}" for f in forget_fleecing(graph)]
        if in_the_way is not None:
            for line in done:
                log.info("%s", line)
            raise StateError(f"{in_the_way}; run 'snapfs cleanup {vmid}' again once it does")
        if st.created_mountpoint:
            remove_mountpoint(mp)
    else:
        # Killed during set-up, before the state file: find our nodes by their prefix.
        qp = qmp_path or DEFAULT_QMP_DIR / f"{vmid}.qmp"
        if paths.exists(qp, "QMP socket"):
            async with qmp_session(qp, vmid) as q:
                done += await qmp.cleanup_orphans(q)
    if await trio.Path(sdir).exists():
        await trio.to_thread.run_sync(remove_dir, sdir)
        done.append("removed the session state")
    return done
