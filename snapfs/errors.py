"""The one exception tree of snapfs.

Only the CLI turns these into messages and exit codes; every other module raises them and keeps
the cause (``raise ... from err``)::

    SnapfsError                  exit 1   anything snapfs reports as a one-line message
     +-- UsageError              exit 2   bad input: a VMID, a path, an option; nothing was changed
     +-- StateError              exit 3   the session is not in a state for this: already mounted,
     |                                    not mounted, mountpoint busy
     +-- QMPError                exit 4   talking to QEMU failed or QEMU said no
     |    +-- VMGoneError                 the VM went away (socket missing, connection lost)
     |    +-- QMPTimeoutError             QEMU did not answer in time (stopped or hung)
     |    +-- QMPReplyError               QEMU's answer is not of the shape the command returns
     +-- SetupError              exit 5   a step of the set-up failed; what was added is rolled back
     +-- TeardownError           exit 6   teardown could not restore everything; says what is left
     +-- NBDError                exit 7   the NBD connection to the export failed
     +-- FuseError               exit 8   mounting or serving the FUSE file system failed
 +-- CopyError               exit 9   the reference provider (snapfs copy, points, restore) failed
      +-- VerifyError        exit 10  a restore point does not match its manifest (snapfs verify)
"""

from __future__ import annotations


class SnapfsError(Exception):
    """Base of every error snapfs reports; ``str()`` is the one-line message."""

    exit_code = 1


class UsageError(SnapfsError):
    exit_code = 2


class StateError(SnapfsError):
    exit_code = 3


class QMPError(SnapfsError):
    exit_code = 4


class VMGoneError(QMPError):
    pass


class QMPTimeoutError(QMPError):
    pass


class QMPReplyError(QMPError):
    pass


class SetupError(SnapfsError):
    exit_code = 5


class TeardownError(SnapfsError):
    exit_code = 6


class NBDError(SnapfsError):
    exit_code = 7

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class FuseError(SnapfsError):
    exit_code = 8


class CopyError(SnapfsError):
    exit_code = 9


class VerifyError(CopyError):
    exit_code = 10


def by_exit_code(code: int) -> type[SnapfsError]:
    """The error class an exit code stands for (a reply from another process carries only the
    code); SnapfsError for an unknown one."""
    for cls in (UsageError, StateError, QMPError, SetupError, TeardownError, NBDError,
                FuseError, CopyError, VerifyError):  # fmt: skip
        if cls.exit_code == code:
            return cls
    return SnapfsError
