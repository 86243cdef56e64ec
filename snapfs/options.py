"""A mount request, checked before anything starts: one rule per option.

``validate`` runs in the CLI before the serving process forks, so a bad VMID, incremental ID,
path or mountpoint is a one-line error (UsageError or StateError) with nothing changed.
Relative paths are taken from the working directory; every path must be trusted (see
snapfs.paths) as far as it exists: what is missing is made by the serving process, which checks
it again.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from snapfs import agent, paths, qmp, state
from snapfs.errors import StateError, UsageError
from snapfs.fuse import kernel

DEFAULT_FLEECING_ROOT = Path("/var/lib/snapfs")
DEFAULT_QMP_DIR = state.DEFAULT_QMP_DIR
# Proxmox's VMID range; plain QEMU users pick any number in it.
VMID_RE = state.VMID_RE


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
    # The fleecing images' cluster size, copy-before-write's (--fleecing-cluster).
    fleecing_cluster: int = qmp.CBW_CLUSTER

    @property
    def state_dir(self) -> Path:
        return state.state_dir(self.vmid)


def check_vmid(vmid: str) -> str:
    if not VMID_RE.fullmatch(vmid):
        shown = vmid if len(vmid) <= 40 else vmid[:40] + "..."
        raise UsageError(f"invalid VMID {shown!r}: expected a number from 1 to 999999999")
    return vmid


_SIZE_RE = re.compile(r"(\d{1,7})([KM]?)(?:i?B)?", re.IGNORECASE)


def check_fleecing_cluster(text: str) -> int:
    """``--fleecing-cluster``: a power of two from 64K to 2M (64K, 128K, ... 2M; or bytes)."""
    match = _SIZE_RE.fullmatch(text.strip())
    size = 0
    if match:
        size = int(match[1]) << {"": 0, "K": 10, "M": 20}[match[2].upper()]
    if not qmp.cbw_cluster_ok(size):
        shown = text if len(text) <= 20 else text[:20] + "..."
        raise UsageError(
            f"invalid --fleecing-cluster {shown!r}: expected 64K, 128K, 256K, 512K, 1M or 2M"
        )
    return size


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
    if incremental is not None:
        qmp.check_incremental(incremental)
    default_mp = not mountpoint
    given_mp = _check_path(mountpoint, "mountpoint") if mountpoint else state.run_dir() / vmid
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
    sdir = state.state_dir(vmid)
    paths.resolve(sdir, "session state directory")
    pid = state.read_pid(sdir)
    if pid is not None and state.alive(pid):
        raise StateError(f"VM {vmid} is already mounted by snapfs (serving process {pid})")
    if sdir.exists():
        record = state.read_state(sdir)
        stale_mp = Path(record.mountpoint) if record else None
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
