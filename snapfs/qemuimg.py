"""qemu-img and qemu-nbd: the tools the restore points are written, merged and read with.

Images are qcow2 files whose backing file is named relative to their own directory, so a
point's directory can be read by QEMU's own tools (``qemu-img convert``, ``qemu-nbd``) without
snapfs. Bytes go in and out through a ``qemu-nbd`` on a unix socket in a fresh 0700 directory,
a pool of libnbd connections shared by the copy's threads (snapfs.nbd.pool). The directory's
name carries the process id, so the next Server removes those of a snapfs that was killed.

Every wait is bounded: each qemu-img command has a timeout that grows with what it does, and
qemu-nbd must listen within ``START_TIMEOUT`` seconds and exit within ``STOP_TIMEOUT``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from snapfs import libc
from snapfs.errors import CopyError
from snapfs.nbd.pool import Pool

log = logging.getLogger(__name__)

QEMU_IMG = "qemu-img"
QEMU_NBD = "qemu-nbd"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
#: qemu-img commands that only look at or create metadata.
META_TIMEOUT = 120.0
#: The start of a Server's directory's name, before its process id and a unique part.
SERVER_DIR_PREFIX = "snapfs-nbd-"


def _die_with_parent(parent: int) -> None:
    # SIGKILL, not SIGTERM: qemu-nbd catches SIGTERM from its first instruction but sets its
    # state to running just before its main loop, so a SIGTERM that comes while it opens the
    # image is forgotten and it serves on forever. What it would flush on the way out belongs
    # to a point that died with snapfs and is never kept.
    libc.die_with_parent(signal.SIGKILL, parent)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise CopyError(f"{name} not found: install it (Debian: qemu-utils)")
    return path


def run(args: list[str], what: str, timeout: float | None = META_TIMEOUT) -> str:
    """Run qemu-img with ``args``; its stdout, or CopyError with its last line of stderr."""
    argv = [_tool(QEMU_IMG), *args]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        raise CopyError(f"{what}: qemu-img did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise CopyError(f"{what}: {lines[-1] if lines else f'qemu-img exit {proc.returncode}'}")
    return proc.stdout


def create(path: Path, size: int, backing: str | None = None) -> None:
    """A new qcow2 image of ``size`` bytes; with ``backing`` (relative to ``path``'s directory)
    an overlay that reads as its backing file until written."""
    args = ["create", "-q", "-f", "qcow2"]
    if backing is not None:
        args += ["-b", backing, "-F", "qcow2"]
    run([*args, str(path), str(size)], f"creating {path}")


def info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of one image (not its chain)."""
    out = run(["info", "-U", "--output=json", str(path)], f"reading {path}")
    try:
        data = json.loads(out)
    except ValueError as err:
        raise CopyError(f"reading {path}: qemu-img info is not JSON: {err}") from err
    if not isinstance(data, dict):
        raise CopyError(f"reading {path}: qemu-img info is not an object")
    return data


def map_chain(path: Path, size: int) -> list[dict[str, Any]]:
    """``qemu-img map`` of an image through its backing chain: extents with ``start``,
    ``length``, ``data`` and ``zero``."""
    out = run(["map", "-U", "--output=json", str(path)], f"mapping {path}", _data_timeout(size))
    try:
        data = json.loads(out)
    except ValueError as err:
        raise CopyError(f"mapping {path}: qemu-img map is not JSON: {err}") from err
    if not isinstance(data, list):
        raise CopyError(f"mapping {path}: qemu-img map is not a list")
    return [e for e in data if isinstance(e, dict)]


def check(path: Path) -> str | None:
    """What ``qemu-img check`` finds wrong with one image's metadata, or None (leaked clusters,
    which waste space but lose nothing, are not wrong)."""
    argv = [_tool(QEMU_IMG), "check", "-U", "--output=json", str(path)]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=META_TIMEOUT, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired:
        return f"qemu-img check did not finish within {META_TIMEOUT:.0f} s"
    if proc.returncode in (0, 3):  # 3: leaked clusters only
        return None
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    try:
        data = json.loads(proc.stdout)
        found = data.get("corruptions", "?"), data.get("check-errors", "?")
        return f"{found[0]} corruption(s), {found[1]} check error(s)"
    except ValueError:
        return lines[-1] if lines else f"qemu-img check exit {proc.returncode}"


def commit(top: Path, size: int) -> None:
    """Write ``top``'s own data into its backing file; ``top`` keeps its data (``-d``), so it
    reads the same all the while and a crash leaves both readable."""
    run(["commit", "-q", "-d", str(top)], f"merging {top}", timeout=_data_timeout(size))


def _data_timeout(size: int) -> float:
    """A bound for commands that move up to ``size`` bytes: 10 minutes plus 10 MB/s."""
    return 600.0 + size / 10e6


class Server:
    """A ``qemu-nbd`` serving one image on a private unix socket, with a pool of libnbd
    connections. Use as a context manager; leaving it closes every connection and stops the
    server (SIGTERM, then SIGKILL after STOP_TIMEOUT). It never outlives snapfs.
    """

    def __init__(self, image: Path, *, writable: bool, clients: int = 8) -> None:
        self.image = image
        self.writable = writable
        self.clients = clients
        _remove_orphans(Path(tempfile.gettempdir()))
        self._dir = Path(tempfile.mkdtemp(prefix=f"{SERVER_DIR_PREFIX}{os.getpid()}-"))
        self.socket = self._dir / "sock"
        self._log = self._dir / "log"
        self._proc: subprocess.Popen[bytes] | None = None
        #: Whether a client got through: qemu-nbd is in its main loop and heeds SIGTERM.
        self._serving = False
        #: Reads and writes of the image, from any thread.
        self.pool = Pool(str(self.socket), clients=clients, what=f"{image}", error=CopyError)

    def __enter__(self) -> Server:
        argv = [
            _tool(QEMU_NBD),
            "--socket",
            str(self.socket),
            "--format",
            "qcow2",
            "--shared",
            str(self.clients + 1),
            "--persistent",
            "--cache",
            "writeback",
        ]
        if self.writable:
            argv += ["--discard", "unmap"]
        else:
            argv += ["--read-only"]
        with open(self._log, "wb") as log_file:  # a file: a pipe nobody reads can fill up
            self._proc = subprocess.Popen(
                [*argv, str(self.image)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                # A qemu-nbd left behind by a killed snapfs would keep its images locked,
                # and the next prune could not merge them.
                preexec_fn=functools.partial(_die_with_parent, os.getpid()),
            )
        try:
            self._wait_listening()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_listening(self) -> None:
        """Until the first connection succeeds (the socket exists a moment before qemu-nbd
        listens on it)."""
        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self._proc.poll() is not None:
                lines = [x for x in self._log.read_text(errors="replace").splitlines() if x.strip()]
                raise CopyError(
                    f"qemu-nbd could not serve {self.image}: "
                    f"{lines[-1] if lines else f'exit {self._proc.returncode}'}"
                )
            if self.socket.exists():
                try:
                    self.pool.connect()
                    self._serving = True
                    return
                except CopyError:
                    pass
            if time.monotonic() > deadline:
                raise CopyError(f"qemu-nbd did not listen within {START_TIMEOUT:.0f} s")
            time.sleep(0.01)

    def close(self) -> None:
        self.pool.close()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # Before it served, SIGTERM could be lost (see _die_with_parent), and nothing
            # was written that a clean exit would flush.
            proc.send_signal(signal.SIGTERM if self._serving else signal.SIGKILL)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                log.warning("qemu-nbd for %s did not stop: killing it", self.image)
                proc.kill()
                proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _remove_orphans(tmp: Path) -> None:
    """Remove the Server directories in ``tmp`` that a process which is gone left behind
    (killed: its close never ran; its qemu-nbd died with it). Only directories of this user,
    never a symlink: others may write ``tmp``."""
    for entry in tmp.glob(f"{SERVER_DIR_PREFIX}*-*"):
        pid = entry.name[len(SERVER_DIR_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            st = entry.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except (OSError, OverflowError):
            continue  # gone meanwhile, a live process of another user, or no process id


def convert(
    src: Path, dst: Path, out_format: str, *, existing: bool, progress: bool, size: int
) -> None:
    """``qemu-img convert`` of ``src`` (its whole chain) into ``dst``: sparse, into an existing
    target (``-n``) or a new file."""
    argv = [_tool(QEMU_IMG), "convert", "-f", "qcow2", "-O", out_format]
    if existing:
        argv.append("-n")
    if progress:
        argv.append("-p")
    argv += [str(src), str(dst)]
    timeout = _data_timeout(size)
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=None if progress else subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise CopyError(
            f"restoring {dst}: qemu-img did not finish within {timeout:.0f} s"
        ) from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        raise CopyError(f"restoring {dst}: {lines[-1] if lines else f'exit {proc.returncode}'}")
