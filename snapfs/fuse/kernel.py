"""The system calls behind a FUSE mount: open ``/dev/fuse``, ``mount(2)``, ``umount2(2)``.

No fusermount helper: snapfs runs as root and mounts directly. Every failure is a ``FuseError``
whose message names what is wrong (not root, no such mountpoint, busy, ...), raised from the
``OSError`` that caused it. These calls are synchronous; ``unmount`` must not run on the thread
that serves the mount (the kernel may wait for the server while unmounting), so async callers run
it through ``trio.to_thread``.

Mountpoints are trusted paths (``snapfs.paths``: no component a user but root can change).
``mount`` walks and checks the directory, then mounts on that very directory through its
descriptor (``/proc/self/fd/N``), and returns the new mount as /proc/self/mountinfo lists it
(``Mount``: its id, its source ``snapfs:<name>``). ``unmount(..., expect=that)`` first checks
that the path still leads to that mount (the mount id of the path, opened without following a
final symlink, and its source and type) and refuses with one line otherwise: it never unmounts
another file system that has taken the path's place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from snapfs import libc, paths
from snapfs.errors import FuseError, UsageError

FUSE_DEVICE = "/dev/fuse"
FS_TYPE = "fuse.snapfs"

MS_NOSUID = 2
MS_NODEV = 4
MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8


@dataclass(frozen=True)
class Mount:
    """One mount as /proc/self/mountinfo lists it."""

    id: int
    parent: int
    mountpoint: str
    fstype: str
    source: str
    dev: str = ""  # "major:minor" of the file system (its backing device info in sysfs)


_ESCAPE = re.compile(rb"\\([0-7]{3})")


def _unescape(field: bytes) -> str:
    """A mountinfo field: space, tab, newline and backslash are written as octal escapes."""
    return os.fsdecode(_ESCAPE.sub(lambda m: bytes([int(m[1], 8)]), field))


def mounts() -> list[Mount]:
    """Every mount of this process's mount namespace, in mountinfo's order."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            fields = line.rstrip(b"\n").split(b" ")
            sep = fields.index(b"-", 6)
            out.append(
                Mount(
                    id=int(fields[0]),
                    parent=int(fields[1]),
                    mountpoint=_unescape(fields[4]),
                    fstype=_unescape(fields[sep + 1]),
                    source=_unescape(fields[sep + 2]),
                    dev=fields[2].decode(),
                )
            )
    return out


def mount_id(fd: int) -> int:
    """The id of the mount that the file open as ``fd`` (also ``O_PATH``) lies on."""
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("mnt_id:"):
                return int(line.split()[1])
    raise FuseError(f"the kernel does not say which mount descriptor {fd} is on")


def find_mount(mid: int) -> Mount | None:
    return next((m for m in mounts() if m.id == mid), None)


def find_snapfs(name: str, mountpoint: str | os.PathLike[str], mid: int | None) -> Mount | None:
    """The snapfs mount of ``name``: the one with id ``mid`` if given, else the last one at
    ``mountpoint``; None if there is none (any more)."""
    source, where = f"snapfs:{name}", os.fspath(mountpoint)
    found = None
    for m in mounts():
        if (m.fstype, m.source) != (FS_TYPE, source):
            continue
        if (m.id == mid) if mid is not None else (m.mountpoint == where):
            found = m
    return found


def live(mount: Mount) -> bool:
    """Whether ``mount`` is still mounted (its id, source and type all the same)."""
    now = find_mount(mount.id)
    return now is not None and (now.fstype, now.source) == (mount.fstype, mount.source)


@contextlib.contextmanager
def open_mountpoint(mountpoint: str | os.PathLike[str]) -> Iterator[paths.Dir]:
    """The mountpoint, walked as a trusted path (``snapfs.paths``): an existing directory that is
    not a mount point already; a FuseError otherwise."""
    path = Path(mountpoint).absolute()
    try:
        w = paths.walk(path, "mountpoint")
    except UsageError as err:
        raise FuseError(str(err)) from err
    d = paths.Dir(w)
    try:
        if w.dead:
            raise FuseError(f"mountpoint {path} is already a mount point (a dead one)")
        if w.rest and w.st is None:
            raise FuseError(f"mountpoint {path} does not exist")
        if w.rest:
            raise FuseError(f"mountpoint {path} is not a directory")
        if d.parent_fd is None or mount_id(d.fd) != mount_id(d.parent_fd):
            raise FuseError(f"mountpoint {path} is already a mount point")
        yield d
    finally:
        d.close()


def check_mountpoint(mountpoint: str | os.PathLike[str]) -> Path:
    """The mountpoint's canonical path, after checking it (see ``open_mountpoint``)."""
    with open_mountpoint(mountpoint) as d:
        return d.path


def open_device() -> int:
    """Open ``/dev/fuse`` read-write and close-on-exec; the caller owns the fd."""
    try:
        return os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError as err:
        raise FuseError(f"{FUSE_DEVICE} is missing (is the fuse module loaded?)") from err
    except PermissionError as err:
        raise FuseError(f"no permission to open {FUSE_DEVICE} (snapfs must run as root)") from err
    except OSError as err:
        raise FuseError(f"cannot open {FUSE_DEVICE}: {err.strerror}") from err


def mount_options(fd: int, *, allow_other: bool = False, default_permissions: bool = False) -> str:
    """The data string of mount(2) for a FUSE mount served on ``fd``."""
    opts = [f"fd={fd}", "rootmode=40000", f"user_id={os.geteuid()}", f"group_id={os.getegid()}"]
    if allow_other:
        opts.append("allow_other")
    if default_permissions:
        opts.append("default_permissions")
    return ",".join(opts)


def mount(
    fd: int,
    mountpoint: str | os.PathLike[str],
    *,
    name: str,
    allow_other: bool = False,
    default_permissions: bool = False,
) -> Mount:
    """Mount a FUSE file system served on ``fd`` at ``mountpoint``; ``mount`` lists it as
    ``snapfs:<name> on <mountpoint> type fuse.snapfs``. The kernel queues INIT on ``fd`` before
    this returns; nothing is answered until the caller reads it.

    The mountpoint is walked and checked (``open_mountpoint``) and the mount made on the
    directory so found, through its descriptor. Returns the new mount."""
    data = mount_options(fd, allow_other=allow_other, default_permissions=default_permissions)
    source = f"snapfs:{name}"
    with open_mountpoint(mountpoint) as d:
        where = str(d.path)
        target = f"/proc/self/fd/{d.fd}".encode()
        flags = MS_NOSUID | MS_NODEV
        try:
            libc.mount(source.encode(), target, FS_TYPE.encode(), flags, data.encode())
        except OSError as failed:
            err = OSError(failed.errno, failed.strerror, where)
        else:
            return _new_mount(d, source)
    e = err.errno
    if e == errno.EPERM:
        raise FuseError(f"cannot mount {where}: not permitted (snapfs must run as root)") from err
    if e == errno.ENOENT:
        raise FuseError(f"cannot mount {where}: mountpoint does not exist") from err
    if e == errno.ENOTDIR:
        raise FuseError(f"cannot mount {where}: mountpoint is not a directory") from err
    if e == errno.ENODEV:
        raise FuseError(f"cannot mount {where}: the kernel has no FUSE support") from err
    if e == errno.EBUSY:
        raise FuseError(f"cannot mount {where}: mountpoint is busy") from err
    raise FuseError(f"cannot mount {where}: {err.strerror}") from err


def _new_mount(d: paths.Dir, source: str) -> Mount:
    """The mount just made on ``d``: what its name leads to now (opened ``O_PATH``, so nothing is
    asked of the file system, whose INIT is not answered yet), on top of ``d``'s mount."""
    assert d.parent_fd is not None
    fd = os.open(d.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.parent_fd)
    try:
        mid = mount_id(fd)
    finally:
        os.close(fd)
    m = find_mount(mid)
    if m is None or m.parent != mount_id(d.fd) or (m.fstype, m.source) != (FS_TYPE, source):
        raise FuseError(f"mounted {source} at {d.path}, but cannot find it there")
    return m


def _verify(path: Path, expect: Mount) -> None:
    """Raise FuseError unless ``path`` (its last component not followed) leads to ``expect``."""
    name = expect.source.removeprefix("snapfs:")
    try:
        with paths.open_dir(path.parent, "mountpoint") as d:
            fd = os.open(path.name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=d.fd)
            try:
                mid = mount_id(fd)
            finally:
                os.close(fd)
    except (UsageError, OSError) as err:
        what = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise FuseError(
            f"{path} no longer leads to the snapfs mount of VM {name} ({what}): left alone"
        ) from err
    now = find_mount(mid)
    if mid != expect.id or now is None or (now.fstype, now.source) != (FS_TYPE, expect.source):
        leads = f"{now.source}, {now.fstype}" if now is not None else "no mount"
        raise FuseError(
            f"{path} no longer leads to the snapfs mount of VM {name} (it leads to {leads}): "
            "left alone"
        )


def unmount(
    mountpoint: str | os.PathLike[str], *, lazy: bool = False, expect: Mount | None = None
) -> None:
    """Unmount ``mountpoint``; ``lazy`` detaches it even while files are open (MNT_DETACH).

    The FUSE connection is then aborted, so the server reading its fd sees ENODEV. A busy
    mountpoint raises a FuseError whose message says "busy". With ``expect`` (what ``mount``
    returned), only if the path still leads to that mount (see the module); the path is then
    unmounted without following a final symlink, and its directories are root's alone, so it
    cannot lead elsewhere in between."""
    where = os.fsdecode(Path(mountpoint).absolute())
    flags = MNT_DETACH if lazy else 0
    if expect is not None:
        _verify(Path(where), expect)
        flags |= UMOUNT_NOFOLLOW
    try:
        libc.umount2(os.fsencode(where), flags)
    except OSError as err:
        _unmount_failed(where, err)


def _unmount_failed(where: str, err: OSError) -> NoReturn:
    e = err.errno
    if e == errno.EBUSY:
        raise FuseError(
            f"cannot unmount {where}: busy (a process has a file open or its cwd there)"
        ) from err
    if e == errno.EINVAL:
        raise FuseError(f"cannot unmount {where}: not mounted") from err
    if e == errno.EPERM:
        raise FuseError(f"cannot unmount {where}: not permitted (needs root)") from err
    if e == errno.ENOENT:
        raise FuseError(f"cannot unmount {where}: no such directory") from err
    raise FuseError(f"cannot unmount {where}: {err.strerror}") from err


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """True if something is mounted at ``mountpoint``, even a dead FUSE mount (whose stat fails
    with ENOTCONN, so ``os.path.ismount`` says False)."""
    want = os.fsdecode(Path(mountpoint).absolute())
    return any(m.mountpoint == want for m in mounts())


def set_readahead(mount: Mount, nbytes: int) -> bool:
    """Let the kernel read ahead up to ``nbytes`` on this FUSE mount (its backing device info:
    the kernel starts a FUSE mount at 128 KiB, and INIT can only lower it). False if it could
    not be set (no sysfs): reads are then slower, never wrong."""
    try:
        with open(f"/sys/class/bdi/{mount.dev}/read_ahead_kb", "w") as f:
            f.write(str(nbytes // 1024))
    except OSError:
        return False
    return True
