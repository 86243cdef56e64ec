"""The compiled READ path (``snapfs._fastpath``, built from ``_fastpath.c`` at install where a C
compiler and Python's headers are found), and what the Python side needs of it.

The FUSE intake (snapfs.fuse.server.Intake) hands the requests to the compiled part first. It
answers the READs of every disk added to it that it can answer exactly (the tree's checks, the
copy-before-write confinement, not a sequential read that Python reads ahead, not wholly a
known zero of the snapshot, which Python answers without QEMU: snapfs.fs), over an NBD
connection of its own per disk, and hands every other request back to Python unanswered.
A READ that QEMU answers with an error is handed back too, so Python's path, which reports
errors, reads it again and tells what is wrong.

The compiled part keeps its own copy of a disk's readable set (a ``Disk.mirrors`` entry,
snapfs.tree). The copy is taken on the trio thread with no await between the copy and its
registration, and every punch removes its range from both under the disk's lock before it
discards anything, so both sets are the same set at every READ's check.

``SNAPFS_COMPILED=0`` in the environment serves every READ from Python (the tests of the
Python path, and anyone who wants to rule the compiled part out).
"""

from __future__ import annotations

import logging
import os
from types import ModuleType
from typing import TYPE_CHECKING, TypeAlias

import trio

from snapfs.nbd.wire import NBDStream
from snapfs.tree import Disk

if TYPE_CHECKING:
    from snapfs import _fastpath

CompiledDisk: TypeAlias = "_fastpath.Disk"
CompiledIntake: TypeAlias = "_fastpath.Intake"

log = logging.getLogger(__name__)

_compiled: ModuleType | None
try:
    from snapfs import _fastpath as _compiled
except ImportError:  # not built here: Python serves every READ
    _compiled = None


def available() -> bool:
    """Whether READs may be answered by the compiled part."""
    return _compiled is not None and os.environ.get("SNAPFS_COMPILED", "1") != "0"


def intake(fuse_fd: int) -> CompiledIntake | None:
    """A compiled intake on ``fuse_fd`` (its own descriptor of it), or None."""
    if not available():
        return None
    assert _compiled is not None
    try:
        made: CompiledIntake = _compiled.Intake(fuse_fd)
    except OSError as err:  # no pipe or epoll left: Python reads the requests
        log.warning("READs are served without compiled code: %s", err.strerror or err)
        return None
    return made


class FastDisk:
    """A disk's READs through the compiled part: its NBD connection and its readable set.

    Made on the trio thread (``open``); ``close`` ends it from any thread. Once closed or
    failed (``alive`` false), its READs go to Python again.
    """

    def __init__(self, stream: NBDStream, disk: Disk, ino: int, confine: int, ahead: int) -> None:
        assert _compiled is not None
        self.name = disk.name
        self._stream = stream
        # Copy and registration without an await between them: no punch can fall in between.
        zero_starts, zero_ends = disk.zeros.arrays()  # fixed when the tree was built
        with disk.lock:
            starts, ends = disk.readable.arrays()
            self.compiled: CompiledDisk = _compiled.Disk(
                ino, disk.size, confine, stream.fileno, starts, ends, ahead, zero_starts, zero_ends
            )
            disk.mirrors.append(self.compiled)

    @classmethod
    async def open(
        cls,
        socket_path: str,
        export: str,
        disk: Disk,
        ino: int,
        *,
        confine: int,
        tune: bool,
        ahead: int,
    ) -> FastDisk:
        """Connect (simple replies: see snapfs.nbd.wire.NBDStream.connect) and register."""
        stream = await trio.to_thread.run_sync(
            lambda: NBDStream.connect(socket_path, export, structured=False, tune=tune)
        )
        try:
            return cls(stream, disk, ino, confine, ahead)
        except BaseException:
            stream.close()
            raise

    @property
    def nbd_fileno(self) -> int:
        """The descriptor of its NBD connection."""
        return self._stream.fileno

    def close(self) -> None:
        self.compiled.close()
        self._stream.shutdown()
        self._stream.close()
