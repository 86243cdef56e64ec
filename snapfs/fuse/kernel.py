"""The system calls behind a FUSE mount: open ``/dev/fuse``, ``mount(2)``, ``umount2(2)``.

No fusermount helper: snapfs runs as root and mounts directly. Every failure is a ``FuseError``
whose message names what is wrong (not root, no such mountpoint, busy, ...), raised from the
``OSError`` that caused it. These calls are synchronous; ``unmount`` must not run on the thread
that serves the mount (the kernel may wait for the server while unmounting), so async callers run
it through ``trio.to_thread``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from pathlib import Path

from snapfs.errors import FuseError

FUSE_DEVICE = "/dev/fuse"
FS_TYPE = "fuse.snapfs"

MS_NOSUID = 2
MS_NODEV = 4
MNT_FORCE = 1
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p,
]  # fmt: skip
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int


def check_mountpoint(mountpoint: str | os.PathLike[str]) -> Path:
    """The mountpoint as an absolute path, after checking it is an existing directory that is
    not already a mount point (checked before anything is opened or mounted)."""
    path = Path(mountpoint).absolute()
    try:
        st = path.stat()
    except FileNotFoundError as err:
        raise FuseError(f"mountpoint {path} does not exist") from err
    except OSError as err:
        raise FuseError(f"cannot use mountpoint {path}: {err.strerror}") from err
    if not stat.S_ISDIR(st.st_mode):
        raise FuseError(f"mountpoint {path} is not a directory")
    if os.path.ismount(path):
        raise FuseError(f"mountpoint {path} is already a mount point")
    return path


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
) -> None:
    """Mount a FUSE file system served on ``fd`` at ``mountpoint``; ``mount`` lists it as
    ``snapfs:<name> on <mountpoint> type fuse.snapfs``. The kernel queues INIT on ``fd`` before
    this returns; nothing is answered until the caller reads it."""
    path = os.fsencode(Path(mountpoint).absolute())
    data = mount_options(fd, allow_other=allow_other, default_permissions=default_permissions)
    source = f"snapfs:{name}".encode()
    if _libc.mount(source, path, FS_TYPE.encode(), MS_NOSUID | MS_NODEV, data.encode()) == 0:
        return
    e = ctypes.get_errno()
    err = OSError(e, os.strerror(e), os.fsdecode(path))
    where = os.fsdecode(path)
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
    raise FuseError(f"cannot mount {where}: {os.strerror(e)}") from err


def unmount(mountpoint: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmount ``mountpoint``; ``lazy`` detaches it even while files are open (MNT_DETACH).

    The FUSE connection is then aborted, so the server reading its fd sees ENODEV. A busy
    mountpoint raises a FuseError whose message says "busy"."""
    where = os.fsdecode(Path(mountpoint).absolute())
    if _libc.umount2(os.fsencode(where), MNT_DETACH if lazy else 0) == 0:
        return
    e = ctypes.get_errno()
    err = OSError(e, os.strerror(e), where)
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
    raise FuseError(f"cannot unmount {where}: {os.strerror(e)}") from err


def is_mounted(mountpoint: str | os.PathLike[str]) -> bool:
    """True if something is mounted at ``mountpoint``, even a dead FUSE mount (whose stat fails
    with ENOTCONN, so ``os.path.ismount`` says False)."""
    want = os.fsdecode(Path(mountpoint).absolute())
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            # Field 5 is the mount point, with spaces, tabs, newlines and backslashes escaped.
            field = line.split(b" ")[4].decode("unicode_escape", errors="replace")
            if field == want:
                return True
    return False
