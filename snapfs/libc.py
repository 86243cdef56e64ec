"""The system calls Python's os module lacks, in one place: mount(2), umount2(2),
fallocate(2) with a mode, pidfd_getfd(2) and prctl(PR_SET_PDEATHSIG). Each raises ``OSError``
with the errno (callers put it in words)."""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Final

# The interpreter's own symbols, libc among them: ctypes.util.find_library would run ldconfig
# (and import a dozen modules) on every start of the CLI.
_libc: Final = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]  # fmt: skip
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int

FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
_PR_SET_PDEATHSIG: Final = 1
_SYS_PIDFD_GETFD: Final = 438  # the same number on every architecture (Linux 5.6)


def _check(result: int, filename: str | None = None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), filename)
    return result


def mount(source: bytes, target: bytes, fstype: bytes, flags: int, data: bytes) -> None:
    _check(_libc.mount(source, target, fstype, flags, data), os.fsdecode(target))


def umount2(target: bytes, flags: int) -> None:
    _check(_libc.umount2(target, flags), os.fsdecode(target))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) as it is (os.posix_fallocate cannot pass a mode)."""
    _check(_libc.fallocate(fd, mode, offset, length))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """fallocate(PUNCH_HOLE|KEEP_SIZE) of ``length`` bytes at ``offset`` (nothing if <= 0)."""
    if length > 0:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A close-on-exec duplicate of another process's ``fd``."""
    return _check(int(_libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)))


def die_with_parent(signum: int, parent: int) -> None:
    """In a child between fork and exec: get ``signum`` when the parent (thread) dies, so a
    helper process never outlives a killed snapfs. ``parent`` is the pid that forked: if it
    died before the prctl, the signal will never come, and the child takes it now."""
    # The child inherits the parent's Python handler for signum (snapfs relays or catches
    # SIGTERM). Until exec, that handler would take the death signal, or the one sent below,
    # and the child would go on to exec and outlive its parent. The default action ends it.
    if signum != signal.SIGKILL:  # which cannot be caught, nor have its action set
        signal.signal(signum, signal.SIG_DFL)
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0))
    if os.getppid() != parent:
        os.kill(os.getpid(), signum)
