"""Set-up and teardown of the snapshot graph in a running QEMU, over QMP.

The only importer of ``qemu.qmp`` (an asyncio library); it runs inside trio through trio-asyncio,
so every caller must be inside ``trio_asyncio.open_loop()``.

For each guest disk, ``setup`` builds::

    guest device --> snapfs-cbw-<disk> (copy-before-write) --file--> original node
                           \\--target--> snapfs-fl-<disk> (qcow2 fleecing image)
    NBD export <-- snapfs-acc-<disk> (snapshot-access) --file--> snapfs-cbw-<disk>

Invariants:
- Every node-name, export id and session bitmap snapfs adds starts with ``snapfs-``; nothing else
  in the VM is changed, except the persistent bitmap ``snapfs-<ID>`` on commit.
- ``setup`` either returns a complete ``GraphState`` or leaves the VM's graph as it found it.
- ``teardown`` tries every step whatever fails, and is idempotent.
- Incremental bitmaps never lose a write: ``snapfs-<ID>`` (B) records all the time and is only
  replaced, atomically, by the bitmap that started recording at the snapshot point (N).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio
import trio_asyncio
from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient
from qemu.qmp import StateError as QMPStateError
from qemu.qmp.error import QMPError as LibQMPError

from snapfs import paths
from snapfs.errors import (
    QMPError,
    QMPReplyError,
    QMPTimeoutError,
    SetupError,
    StateError,
    TeardownError,
    UsageError,
    VMGoneError,
)
from snapfs.records import DEFAULT_FLEECING_CLUSTER

log = logging.getLogger(__name__)

PREFIX = "snapfs-"
QEMU_IMG = shutil.which("qemu-img") or "/usr/bin/qemu-img"
# QEMU keeps node names in a char[32].
_MAX_NODE_NAME = 31
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_INCREMENTAL_RE = re.compile(r"[A-Za-z0-9_]+(?:[.-][A-Za-z0-9_]+)*")
# copy-before-write's cluster: block-copy's default, and the fleecing images' cluster size
# unless --fleecing-cluster says otherwise (copy-before-write copies whole clusters of its
# target: larger ones make every first guest write after the snapshot copy more old data).
CBW_CLUSTER = DEFAULT_FLEECING_CLUSTER
# qcow2's largest cluster.
MAX_CBW_CLUSTER = 2 << 20
# Records the guest's writes since the snapshot point where QEMU needs it (see confine_reads):
# "--" cannot occur in a bitmap of an incremental ID.
WRITTEN_BITMAP = f"{PREFIX}-written"
# Records, on the fleecing node, every range copy-before-write has saved there, where QEMU
# needs it (see confine_reads).
COPIED_BITMAP = f"{PREFIX}-copied"
_PFLASH = "/machine/system.flash"
# How long teardown waits for QEMU to finish deleting an export (it is asynchronous).
_EXPORT_GONE_TIMEOUT = 10.0
# How long QEMU may take to answer one command, in seconds. QEMU answers most commands in
# milliseconds: these bounds only tell a stopped or hung QEMU from one on a host under load.
QMP_TIMEOUT = 10.0
# Commands that open, flush or close images or drain the guest's in-flight I/O: they wait for
# the storage, which under load (or on network storage) can take seconds.
QMP_SLOW_TIMEOUT = 30.0
_SLOW_COMMANDS = frozenset(
    {
        "blockdev-add",
        "blockdev-del",
        "blockdev-reopen",
        "block-export-del",
        "qom-set",  # moving a device to another node drains it
        "transaction",  # drains every disk it names
        "nbd-server-stop",
    }
)
# ``stop`` drains and flushes every disk of the VM: the slowest command snapfs sends.
QMP_STOP_TIMEOUT = 60.0
# The QMP handshake (greeting, qmp_capabilities) and a polite disconnect.
QMP_CONNECT_TIMEOUT = 5.0
# Sets every command's timeout (seconds): for tests, or a host known to be very slow.
TIMEOUT_ENV = "SNAPFS_QMP_TIMEOUT"
_MIGRATION_STATES = {"inmigrate", "postmigrate", "finish-migrate", "save-vm", "restore-vm"}

BitmapMode = Literal["none", "new", "reuse"]
OnStep = Callable[[str, str | None], Awaitable[None] | None]
OnPlan = Callable[["GraphState"], None]
# Wraps the snapshot point (stop .. cont); gets whether the guest runs (the guest freeze).
AroundSnapshot = Callable[[bool], contextlib.AbstractAsyncContextManager[Any]]


# -- the connection -----------------------------------------------------------------------------


class QMPCommandError(QMPError):
    """QEMU answered a command with an error; ``str()`` is ``"<cmd>: <QEMU's message>"``."""

    def __init__(self, cmd: str, error_class: str, desc: str) -> None:
        super().__init__(f"{cmd}: {desc}")
        self.cmd = cmd
        self.error_class = error_class
        self.desc = desc


def command_timeout(cmd: str) -> float:
    """How long ``cmd`` may take to answer (``$SNAPFS_QMP_TIMEOUT`` overrides every command)."""
    override = os.environ.get(TIMEOUT_ENV, "")
    if override:
        try:
            value = float(override)
        except ValueError:
            value = 0.0
        if value > 0:
            return value
        log.warning("ignoring %s=%r: not a positive number of seconds", TIMEOUT_ENV, override)
    if cmd == "stop":
        return QMP_STOP_TIMEOUT
    return QMP_SLOW_TIMEOUT if cmd in _SLOW_COMMANDS else QMP_TIMEOUT


def teardown_bound(disks: int) -> float:
    """An upper bound of a teardown of ``disks`` disks, QEMU answering each command just in
    time: what a client waiting for a serving process's teardown may wait."""
    fast, slow = command_timeout("query-block"), command_timeout("blockdev-del")
    per_disk = (
        2 * command_timeout("block-export-del")  # plain, then mode hard
        + _EXPORT_GONE_TIMEOUT
        + fast
        + 5 * slow  # three nodes, the drive, the bitmap transaction
        + fast  # the guest-writes bitmap
    )
    return 2 * QMP_CONNECT_TIMEOUT + 5 * fast + slow + disks * per_disk


# What snapfs reads in the replies it inspects: ``{key: shape}`` (``"key?"``: optional), ``[shape]``
# (a list of them) or a type. Replies are checked against it before anyone indexes into them.
_BITMAP_SHAPE = {
    "name?": str,
    "granularity": int,
    "recording?": bool,
    "busy?": bool,
    "persistent?": bool,
    "inconsistent?": bool,
}
_NODE_SHAPE = {
    "node-name": str,
    "drv": str,
    "file?": str,
    "ro?": bool,
    "detect_zeroes?": str,
    "cache?": {"direct?": bool, "no-flush?": bool},
    "image?": {"virtual-size": int, "format?": str},
    "dirty-bitmaps?": [_BITMAP_SHAPE],
}
_REPLY_SHAPES: dict[str, Any] = {
    "query-version": {
        "qemu": {"major": int, "minor": int, "micro": int},
        "package?": str,
    },
    "query-status": {"status": str, "running": bool},
    "query-block": [
        {
            "device": str,
            "qdev?": str,
            "removable?": bool,
            "inserted?": {**_NODE_SHAPE, "image": {"virtual-size": int, "format?": str}},
        }
    ],
    "query-named-block-nodes": [_NODE_SHAPE],
    "query-block-exports": [{"id": str}],
    "x-debug-query-block-graph": {
        "nodes": [{"id": int, "name": str}],
        "edges": [{"parent": int, "child": int, "name": str}],
    },
}


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "null" if value is None else type(value).__name__


def _shape_problem(value: Any, shape: Any, where: str = "") -> str | None:
    """What in ``value`` does not have ``shape`` (see _REPLY_SHAPES), or None."""
    if isinstance(shape, dict):
        expected = "an object"
        if isinstance(value, dict):
            for key, sub in shape.items():
                name = key.removesuffix("?")
                if name not in value:
                    if key.endswith("?"):
                        continue
                    return f"{where or 'the reply'} has no {name!r}"
                problem = _shape_problem(value[name], sub, f"{where}.{name}")
                if problem:
                    return problem
            return None
    elif isinstance(shape, list):
        expected = "a list"
        if isinstance(value, list):
            for i, item in enumerate(value):
                problem = _shape_problem(item, shape[0], f"{where}[{i}]")
                if problem:
                    return problem
            return None
    else:
        expected = {str: "a string", int: "an integer", bool: "a boolean"}[shape]
        if isinstance(value, shape) and not (shape is int and isinstance(value, bool)):
            return None
    return f"{where.lstrip('.') or 'the reply'} is {_kind(value)}, not {expected}"


class _LibraryLog(logging.LoggerAdapter[logging.Logger]):
    """qemu.qmp's own log, all at DEBUG: it reports at ERROR what snapfs raises anyway."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


class QMP:
    """One QMP session with one QEMU; only valid inside ``async with QMP.connect(...)``.

    Every command has a timeout (``command_timeout``). Once a command went unanswered (timed out,
    or its caller was cancelled), the connection is ``broken``: QEMU may still run that command
    later, so nothing more is sent on it (every later command raises the same QMPTimeoutError)
    and what it was doing is left for a new connection (``snapfs cleanup``).
    """

    def __init__(self, path: Path, client: QMPClient, vm: str = "") -> None:
        self.path = path
        self._client = client
        self._who = f"VM {vm}" if vm else "QEMU"
        self.broken: str | None = None  # why no command may be sent any more

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        path: Path | str,
        timeout: float = QMP_CONNECT_TIMEOUT,  # noqa: ASYNC109
        *,
        vm: str = "",
    ) -> AsyncIterator[QMP]:
        # (the timeout bounds the asyncio handshake; cancel scopes cannot reach inside it)
        """Connect and negotiate within ``timeout`` seconds; always disconnect on exit.

        Missing socket or refused connection: VMGoneError. Anything that does not greet like
        QEMU within the timeout: QMPError "not a QEMU monitor"; a greeting without an answer to
        ``qmp_capabilities``: QMPTimeoutError. ``vm`` names the VM in messages ("VM 100").
        """
        path = Path(path)
        client = QMPClient(f"snapfs:{path.name}")
        # The library only calls the Logger methods that an adapter has too.
        client.logger = _LibraryLog(  # type: ignore[assignment]
            logging.getLogger(f"{__name__}.lib"), {}
        )

        async def _connect() -> None:
            try:
                await asyncio.wait_for(client.connect(str(path)), timeout)
            except BaseException:
                # A failed or timed-out connect leaves the library's disconnect task
                # scheduled; run it now, or it is lost when the loop closes.
                with contextlib.suppress(Exception):
                    await client.disconnect()
                raise

        log.debug("connecting to QMP socket %s", path)
        try:
            await trio_asyncio.aio_as_trio(_connect)()
        except TimeoutError as err:
            if client.greeting is not None:
                raise QMPTimeoutError(
                    f"{path}: QEMU did not answer qmp_capabilities within {timeout:g}s "
                    f"({f'VM {vm}' if vm else 'QEMU'} stopped?)"
                ) from err
            raise QMPError(
                f"{path}: no QMP greeting within {timeout:g}s: not a QEMU monitor "
                "(or another client holds it, or QEMU is stopped)"
            ) from err
        except ConnectError as err:
            cause = err.exc
            if isinstance(cause, FileNotFoundError | ConnectionRefusedError):
                raise VMGoneError(
                    f"{path}: QEMU is not running (socket missing or refused: {cause.strerror})"
                ) from err
            if isinstance(cause, OSError):
                raise VMGoneError(f"{path}: cannot connect to QEMU: {cause}") from err
            raise QMPError(f"{path}: not a QEMU monitor: {err}") from err
        except OSError as err:
            raise VMGoneError(f"{path}: cannot connect to QEMU: {err}") from err
        q = cls(path, client, vm)
        try:
            yield q
        finally:
            await q._disconnect()

    async def _disconnect(self) -> None:
        # Shielded: a cancelled caller must not leave the socket open (QEMU serves one client).
        client = self._client

        async def disconnect() -> None:
            # A QEMU that does not read would keep a polite disconnect (it flushes) waiting:
            # cut the connection instead, then let the library finish.
            writer = getattr(client, "_writer", None)
            if self.broken is not None and writer is not None:
                writer.transport.abort()
            task = asyncio.ensure_future(client.disconnect())
            try:
                await asyncio.wait_for(asyncio.shield(task), QMP_CONNECT_TIMEOUT)
            except TimeoutError:
                log.debug("QMP disconnect from %s: no progress; cutting the connection", self.path)
                writer = getattr(client, "_writer", None)
                if writer is not None:
                    writer.transport.abort()
                await asyncio.wait_for(task, QMP_CONNECT_TIMEOUT)

        with trio.CancelScope(shield=True):
            try:
                await trio_asyncio.aio_as_trio(disconnect)()
            except Exception as err:  # the session is over either way
                log.debug("QMP disconnect from %s: %r", self.path, err)

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        """Run one command and return its result.

        QEMU's error reply: QMPCommandError (a QMPError). Connection lost: VMGoneError. No answer
        within ``command_timeout(cmd)``: QMPTimeoutError, and the connection is broken. A reply
        of the wrong shape (see _REPLY_SHAPES): QMPReplyError.
        """
        if self.broken is not None:
            raise QMPTimeoutError(self.broken)
        # A caller cancelled already is told before anything is sent: the connection stays good.
        await trio.lowlevel.checkpoint_if_cancelled()
        timeout = command_timeout(cmd)
        client = self._client

        async def run() -> Any:
            return await asyncio.wait_for(client.execute(cmd, args), timeout)

        log.debug("QMP -> %s %s", cmd, json.dumps(args) if args else "")
        answered = False
        try:
            result = await trio_asyncio.aio_as_trio(run)()
            answered = True
        except TimeoutError as err:
            answered = True
            self.broken = f"QEMU did not answer {cmd} within {timeout:g}s ({self._who} stopped?)"
            log.debug("%s: %s", self.path, self.broken)
            raise QMPTimeoutError(self.broken) from err
        except ExecuteError as err:
            answered = True
            log.debug("QMP <- %s error %s: %s", cmd, err.error_class, err)
            raise QMPCommandError(cmd, err.error_class, str(err)) from err
        except (ExecInterruptedError, QMPStateError, EOFError, OSError) as err:
            answered = True
            raise VMGoneError(f"{self.path}: lost the connection to QEMU during {cmd}") from err
        except LibQMPError as err:
            answered = True
            raise QMPError(f"{cmd}: {err}") from err
        finally:
            if not answered:  # cancelled: QEMU may still run the command
                self.broken = f"{cmd} was interrupted before QEMU answered it"
        log.debug("QMP <- %s %s", cmd, json.dumps(result))
        shape = _REPLY_SHAPES.get(cmd)
        problem = _shape_problem(result, shape) if shape is not None else None
        if problem:
            raise QMPReplyError(f"malformed reply to {cmd}: {problem}")
        return result

    async def hold_fd(self, fd: int, name: str) -> None:
        """Give QEMU a duplicate of ``fd`` to keep under ``name`` (``getfd``: the monitor keeps
        it until ``closefd``, whoever is connected). Raises like ``execute``."""
        if self.broken is not None:
            raise QMPTimeoutError(self.broken)
        try:
            self._client.send_fd_scm(fd)
        except (OSError, LibQMPError) as err:
            raise VMGoneError(f"{self.path}: cannot pass a descriptor to QEMU: {err}") from err
        await self.execute("getfd", {"fdname": name})


# -- what was built -----------------------------------------------------------------------------


@dataclass
class BlockDevice:
    """A guest disk with a medium, as found in ``query-block``."""

    name: str  # guest device id; "drive-" stripped from a legacy drive id when that is all
    qom_path: str  # of the guest device, the one ``qom-set ... drive`` works on
    node: str  # node-name the device's BlockBackend uses now
    fmt: str
    size: int
    drive_id: str  # legacy drive id ("" for -blockdev)
    read_only: bool
    removable: bool
    # The node the copy-before-write filter goes above and the bitmaps live on: ``node``, or
    # the child of a throttle node that ``node`` is (the filter then goes below the throttle).
    data_node: str = ""
    throttle: dict[str, Any] | None = None  # blockdev-reopen options of that throttle node

    def __post_init__(self) -> None:
        self.data_node = self.data_node or self.node


@dataclass
class BitmapState:
    """Incremental bitmaps of one disk, all on the disk's original node.

    mode "none": no incremental; "new": whole disk, N records from the snapshot point;
    "reuse": F (frozen copy of B at the snapshot point) says what changed since the last commit.
    """

    mode: BitmapMode = "none"
    reason: str = ""  # why "new"
    node: str = ""
    persistent: str = ""  # B: snapfs-<ID>
    next: str = ""  # N: snapfs-<ID>-next
    frozen: str = ""  # F: snapfs-<ID>-frozen, only in mode reuse
    persist: bool = False  # whether B is kept in the image (qcow2)


@dataclass
class DiskState:
    name: str
    qom_path: str
    node: str
    fmt: str
    size: int
    fleecing_path: str
    fleecing_node: str
    cbw_node: str
    access_node: str
    export_id: str
    export_name: str
    bitmap: BitmapState = field(default_factory=BitmapState)
    # Granularity in bytes of the exported bitmap (of N when there is none to export; 64 KiB,
    # QEMU's default, without incremental): dirty regions are multiples of it.
    granularity: int = 65536
    # Where the filter sits when it is not the device's node: below this throttle node, whose
    # blockdev-reopen options (with the original ``file``) put it back at teardown.
    data_node: str = ""
    throttle: dict[str, Any] | None = None
    # > 0: copy-before-write misreports reads and block status that span a copied and an
    # uncopied cluster of this size (QEMU before 8.0), so every request stays inside one, or
    # is checked against ``copied``.
    confine: int = 0
    # Copy-before-write's cluster: the fleecing image's cluster size (never below 64 KiB).
    cbw_cluster: int = CBW_CLUSTER
    # A bitmap of every guest write since the snapshot point, exported beside the snapshot
    # (QEMU before 8.0): block status may have reported those ranges from the live disk.
    written: str = ""
    # A bitmap of the fleecing node (QEMU before 8.0), exported beside the snapshot: every
    # range copy-before-write has saved. QEMU sets it when the copy is written, before it
    # marks the range saved and so before the guest's new data can reach the disk: a read or
    # block status across clusters was right if, asked after it ended, none of its clusters
    # is set.
    copied: str = ""

    def __post_init__(self) -> None:
        self.data_node = self.data_node or self.node

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # Read-only views used by snapfs.session.

    @property
    def format(self) -> str:
        return self.fmt

    @property
    def export(self) -> str:
        """NBD export name."""
        return self.export_name

    @property
    def export_bitmap(self) -> str | None:
        """Bitmap in the export (``qemu:dirty-bitmap:<it>``); None: the whole disk is readable."""
        return self.bitmap.frozen if self.bitmap.mode == "reuse" else None

    def nodes(self) -> dict[str, str]:
        nodes = {
            "disk": self.data_node or self.node,
            "fleecing": self.fleecing_node,
            "cbw": self.cbw_node,
            "access": self.access_node,
            "export": self.export_id,
        }
        if self.throttle is not None:
            nodes["throttle"] = self.node
        return nodes

    @property
    def export_bitmaps(self) -> list[tuple[str, str]]:
        """(node, name) of the export's bitmaps: the readable regions (incremental), the
        guest's writes, what copy-before-write saved."""
        named = [(self.data_node, b) for b in (self.export_bitmap, self.written) if b]
        return named + ([(self.fleecing_node, self.copied)] if self.copied else [])

    def bitmap_facts(self) -> dict[str, Any]:
        """What snapfs.json shows: the mode, and for new/reuse the reason and bitmap names."""
        if self.bitmap.mode == "none":
            return {"mode": "none"}
        return {k: v for k, v in asdict(self.bitmap).items() if v not in ("", None)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiskState:
        fields = dict(data)
        fields["bitmap"] = BitmapState(**fields.get("bitmap", {}))
        return cls(**fields)


@dataclass
class GraphState:
    """Everything needed to tear the session down from another process."""

    vmid: str
    qmp_socket: str
    nbd_socket: str
    qemu_version: str
    snapshot_time: str  # UTC, ISO 8601
    pause_ms: float | None  # None: the VM was not running, so it was not paused
    disks: list[DiskState]
    incremental: str | None = None
    fleecing_dir: str = ""
    bitmap_record: str = ""  # JSON file: disk sizes at the last commit
    skipped: dict[str, str] = field(default_factory=dict)  # device -> why not snapshotted
    # False: the plan of a set-up that has not finished (see ``setup``'s ``on_plan``); its
    # teardown also stops the NBD server, and resumes the VM if it ran and is paused now.
    complete: bool = True
    was_running: bool = False
    # True: this QEMU may abort when a client of one of the exports ends its connection
    # first (see ``client_close_aborts``); only QEMU may close them, by deleting the exports.
    client_close_aborts: bool = False
    # Names under which QEMU keeps a descriptor of each of the serving process's NBD
    # connections (``getfd``) where ``client_close_aborts``: should that process die, its
    # connections stay open until the teardown has deleted the exports, then ``closefd``.
    held_fds: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def snapshot_epoch(self) -> float:
        """``snapshot_time`` as seconds since the epoch."""
        return dt.datetime.fromisoformat(self.snapshot_time).timestamp()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphState:
        fields = dict(data)
        fields["disks"] = [DiskState.from_dict(d) for d in fields.get("disks", [])]
        return cls(**fields)


# -- queries ------------------------------------------------------------------------------------


async def vm_facts(q: QMP) -> tuple[str, tuple[int, int]]:
    """QEMU's version string, e.g. "7.2.15 (Debian 1:7.2+dfsg-7+deb12u12)", and (major, minor)."""
    v = await q.execute("query-version")
    qemu = v["qemu"]
    text = f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}"
    if v.get("package", "").strip():
        text = f"{text} ({v['package'].strip()})"
    return text, (int(qemu["major"]), int(qemu["minor"]))


def check_incremental(incremental: str) -> str:
    """The one rule for an incremental ID (it names bitmaps ``snapfs-<ID>``, ``-next`` and
    ``-frozen``): letters, digits and '_', joined by single '.' or '-', at most 64, not
    ending like a session bitmap. Raises UsageError naming what is wrong."""
    if (
        not _INCREMENTAL_RE.fullmatch(incremental)
        or len(incremental) > 64
        or incremental.endswith(("-next", "-frozen"))
    ):
        shown = incremental if len(incremental) <= 70 else incremental[:70] + "..."
        raise UsageError(
            f"invalid incremental ID {shown!r}: use letters, digits and '_', joined by single "
            "'.' or '-' (at most 64; not ending in -next or -frozen)"
        )
    return incremental


def cbw_cluster_ok(size: int) -> bool:
    """Whether ``size`` can be the fleecing images' cluster: a power of two, 64 KiB to 2 MiB."""
    return CBW_CLUSTER <= size <= MAX_CBW_CLUSTER and not size & (size - 1)


def confine_reads(version: tuple[int, int], cluster: int = CBW_CLUSTER) -> int:
    """The cluster that every snapshot read and block status must stay inside, or 0;
    ``cluster``: copy-before-write's (the fleecing images').

    QEMU before 8.0 (fixed by commit a4d5224c2cb6, "hbitmap: fix hbitmap_status() return value
    for first dirty bit case") answers a read or block status of the snapshot that starts in a
    cluster copy-before-write has copied and runs on into one it has not from the live disk for
    the copied part: guest zero writes show up as holes, and a guest write racing the read as
    data. Inside one cluster the answer is always right; across clusters it is wrong only for
    a copied one, which the copied bitmap (DiskState.copied) records first, so a read across
    clusters may be checked against it afterwards instead (snapfs.datapath.DiskReader).
    ``SNAPFS_CONFINE_READS=1`` forces this on any QEMU (to measure what it costs).
    """
    if version < (8, 0) or os.environ.get("SNAPFS_CONFINE_READS") == "1":
        return cluster
    return 0


async def client_close_aborts(q: QMP, version: tuple[int, int], qom_paths: Sequence[str]) -> bool:
    """Whether QEMU may abort when an NBD client of the exports of these devices' disks ends
    its connection.

    The fix for CVE-2024-7409 (commit 3e7ef738c8, in QEMU 9.1 and in the stable releases
    from 7.2.14 on) asserts that the NBD server learns of a closed client in the main loop.
    QEMU 9.0 and later make sure of that (commit f816310d0c32, "nbd/server: only traverse
    NBDExport->clients from main loop thread"; 8.2's stable releases may have it too, which
    this does not count on); before, a client that disconnects from an export whose disk is on
    an I/O thread is noticed in that thread, and QEMU aborts: the VM is gone.
    A close that QEMU makes itself (``block-export-del``) runs in the main loop. 7.2.22
    aborts (Debian 12); 8.x is not verified here and is taken to do the same. A device of
    which QEMU does not say whether it is on an I/O thread is taken as on one.
    """
    if version >= (9, 0):
        return False
    return any([await on_io_thread(q, path) is not False for path in qom_paths])


async def on_io_thread(q: QMP, qom_path: str) -> bool | None:
    """Whether the guest device at ``qom_path`` is served by an I/O thread: its own
    ``iothread`` (virtio-blk) or its controller's (virtio-scsi). A device and controller
    without the property have none; None where QEMU does not answer as expected."""

    async def iothread(path: str) -> str | None:  # None: no such property
        try:
            value = await q.execute("qom-get", {"path": path, "property": "iothread"})
        except QMPCommandError as err:
            if "not found" in err.desc:
                return None
            raise
        return value if isinstance(value, str) else None

    try:
        own = await iothread(qom_path)
        if own is not None:
            return bool(own)
        bus = await q.execute("qom-get", {"path": qom_path, "property": "parent_bus"})
        controller = bus.rstrip("/").rpartition("/")[0] if isinstance(bus, str) else ""
        if not controller:
            return None
        return bool(await iothread(controller))
    except QMPCommandError as err:
        log.info("%s: cannot tell whether it is on an I/O thread: %s", qom_path, err)
        return None


def _device_of(info: dict[str, Any]) -> tuple[str, str] | None:
    """(name, qom path) of the guest device behind a query-block entry, or None."""
    qdev: str = info.get("qdev", "")
    drive: str = info.get("device", "")
    if not qdev:
        return None
    if qdev.startswith("/"):
        # virtio-blk reports its backend; qom-set works on the device itself.
        path = qdev.removesuffix("/virtio-backend")
    else:
        path = f"/machine/peripheral/{qdev}"
    if path.startswith("/machine/peripheral/"):
        name = path.rsplit("/", 1)[1]
    elif drive:
        name = drive.removeprefix("drive-")
    else:
        name = path.rsplit("/", 1)[1]
    return name, path


async def _block_graph(q: QMP) -> dict[str, dict[str, str]]:
    """Each named node's children by role (``{"file": "node", ...}``), from QEMU's graph."""
    graph = await q.execute("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    children: dict[str, dict[str, str]] = {}
    for e in graph["edges"]:
        parent, child = names.get(e["parent"], ""), names.get(e["child"], "")
        if parent and child:
            children.setdefault(parent, {})[e["name"]] = child
    return children


def _throttle_options(info: dict[str, Any], child: str) -> dict[str, Any] | None:
    """blockdev-reopen options that keep a throttle node as it is (with ``file`` = child), or
    None if its throttle group cannot be told from what QEMU reports."""
    filename = str(info.get("file", ""))
    try:
        group = json.loads(filename.removeprefix("json:"))["throttle-group"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(group, str) or not child:
        return None
    # Options a reopen does not name go back to their defaults (discard is kept as it is).
    cache = info.get("cache", {})
    return {
        "driver": "throttle",
        "node-name": info["node-name"],
        "throttle-group": group,
        "file": child,
        "read-only": bool(info.get("ro", False)),
        "detect-zeroes": info.get("detect_zeroes", "off"),
        "cache": {
            "direct": bool(cache.get("direct", False)),
            "no-flush": bool(cache.get("no-flush", False)),
        },
    }


async def scan_devices(q: QMP) -> tuple[list[BlockDevice], dict[str, str]]:
    """All guest disks with a medium, and the devices skipped with the reason."""
    disks: list[BlockDevice] = []
    skipped: dict[str, str] = {}
    nodes = {n["node-name"]: n for n in await q.execute("query-named-block-nodes", {"flat": True})}
    children = await _block_graph(q)
    for info in await q.execute("query-block"):
        label = info.get("qdev") or info.get("device") or "?"
        dev = _device_of(info)
        if dev is None:
            skipped[info.get("device") or label] = "not attached to a guest device"
            continue
        name, path = dev
        inserted = info.get("inserted")
        if inserted is None:
            skipped[name] = "no medium (empty drive)"
            continue
        removable = bool(info.get("removable", False))
        read_only = bool(inserted.get("ro", False))
        if removable and read_only:
            skipped[name] = "read-only removable medium"
            continue
        if read_only and path.startswith(_PFLASH):
            skipped[name] = "firmware code (read-only pflash)"
            continue
        node = inserted["node-name"]
        fmt = inserted.get("image", {}).get("format", inserted.get("drv", ""))
        data_node, throttle = node, None
        if inserted.get("drv") == "throttle" and node in nodes:
            child = children.get(node, {}).get("file", "")
            throttle = _throttle_options(nodes[node], child)
            if throttle is None:
                log.warning(
                    "%s: cannot tell the throttle group of node %s; the snapshot "
                    "filter goes above it (backup reads count against the limit)",
                    name,
                    node,
                )
            else:
                data_node = child
                fmt = nodes.get(child, {}).get("drv", fmt)
        disks.append(
            BlockDevice(
                name=name,
                qom_path=path,
                node=node,
                fmt=fmt,
                size=int(inserted["image"]["virtual-size"]),
                drive_id=info.get("device", ""),
                read_only=read_only,
                removable=removable,
                data_node=data_node,
                throttle=throttle,
            )
        )
    for name, why in skipped.items():
        log.info("skipping %s: %s", name, why)
    return disks, skipped


async def list_disks(q: QMP) -> list[BlockDevice]:
    """Guest disks with a medium; skipped devices are logged (see ``scan_devices``)."""
    disks, _ = await scan_devices(q)
    return disks


def _session_leftovers(nodes: list[dict[str, Any]], exports: list[dict[str, Any]]) -> list[str]:
    """Names of snapfs session objects present in QEMU (B, the persistent bitmap, is not one)."""
    found = [n["node-name"] for n in nodes if n["node-name"].startswith(PREFIX)]
    found += [e["id"] for e in exports if e["id"].startswith(PREFIX)]
    found += [
        b["name"]
        for n in nodes
        for b in n.get("dirty-bitmaps", [])
        if _is_session_bitmap(b.get("name", ""))
    ]
    return sorted(set(found))


def _is_session_bitmap(name: str) -> bool:
    return name == WRITTEN_BITMAP or (
        name.startswith(PREFIX) and name.endswith(("-next", "-frozen"))
    )


def _bitmaps_of(nodes: list[dict[str, Any]], node: str) -> dict[str, dict[str, Any]]:
    for n in nodes:
        if n["node-name"] == node:
            return {b["name"]: b for b in n.get("dirty-bitmaps", []) if "name" in b}
    return {}


# -- bitmap record (disk sizes at the last commit) ------------------------------------------------


# The record is kept in a trusted directory (snapfs.paths) and read and replaced relative to it,
# never through a symlink.


def _read_record(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(paths.read_text(path, "bitmap record"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UsageError) as err:
        log.warning("ignoring unreadable bitmap record %s: %s", path, err)
        return {}
    return data if isinstance(data, dict) else {}


def _write_record(path: Path, data: dict[str, Any]) -> None:
    # Atomic replace: a crash leaves the old record or the new one, never half of one.
    paths.write_atomic(path, json.dumps(data, indent=1, sort_keys=True), "bitmap record")


def _recorded_size(record: dict[str, Any], vmid: str, incremental: str, disk: str) -> int | None:
    size = record.get(vmid, {}).get(incremental, {}).get(disk)
    return size if isinstance(size, int) else None


# -- set-up -------------------------------------------------------------------------------------


def _node_names(disk: str, index: int) -> tuple[str, str, str]:
    """fleecing, cbw and access node names; fall back to the index for odd or long names."""
    tag = disk
    if not _ID_RE.fullmatch(disk) or len(f"{PREFIX}acc-{disk}") > _MAX_NODE_NAME:
        tag = f"d{index}"
    return f"{PREFIX}fl-{tag}", f"{PREFIX}cbw-{tag}", f"{PREFIX}acc-{tag}"


class _Undo:
    """A stack of undo steps, run in reverse order; each one may fail without stopping the rest."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, Callable[[], Awaitable[Any]]]] = []

    def push(self, what: str, fn: Callable[[], Awaitable[Any]]) -> None:
        self.steps.append((what, fn))

    async def run(self) -> None:
        # Shielded: a cancelled set-up must still restore the VM.
        with trio.CancelScope(shield=True):
            while self.steps:
                what, fn = self.steps.pop()
                log.info("rollback: %s", what)
                try:
                    await fn()
                except Exception as err:  # every undo step gets its chance
                    log.warning("rollback: %s failed: %s", what, err)


class _StepFailed(Exception):
    def __init__(self, step: str, disk: str | None, cause: BaseException) -> None:
        super().__init__(step)
        self.step = step
        self.disk = disk
        self.cause = cause


def _message(err: BaseException) -> str:
    if isinstance(err, QMPCommandError):
        # The command's name helps most when QEMU's words are unfamiliar (another version).
        return f"{err.desc} ({err.cmd})"
    if isinstance(err, OSError) and err.strerror:
        return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
    return str(err)


async def setup(
    q: QMP,
    *,
    vmid: str,
    fleecing_dir: Path,
    nbd_socket: Path,
    exclude: Sequence[str] = (),
    incremental: str | None = None,
    on_step: OnStep | None = None,
    cbw_timeout: int = 60,
    state_dir: Path | None = None,
    around_snapshot: AroundSnapshot | None = None,
    on_plan: OnPlan | None = None,
    fleecing_cluster: int = CBW_CLUSTER,
) -> GraphState:
    """Build the snapshot graph for every disk not excluded and export it over NBD.

    ``fleecing_cluster``: the fleecing images' cluster size, which is copy-before-write's
    (a power of two from 64 KiB to 2 MiB; where reads are confined, it is their cluster).

    Validates everything before touching the VM; on any failure, undoes what was added and
    raises SetupError("<step> for <disk>: <message>"). ``on_step(step, disk)`` is called before
    each step and awaited if it returns an awaitable (progress reports; tests inject faults).
    The bitmap record lives in ``(state_dir or fleecing_dir)/bitmaps.json``.

    ``on_plan(graph)`` is called before the first change with an incomplete GraphState that
    ``teardown`` can remove whatever part of the set-up was done with. If QEMU stops answering
    (QMPTimeoutError: the connection is ``broken``), nothing is undone: QEMU may still run the
    unanswered command, so the caller keeps the plan for a teardown over a new connection.
    """
    if incremental is not None:
        check_incremental(incremental)

    # (1) Look, validate, touch nothing.
    version, version_number = await vm_facts(q)
    if not cbw_cluster_ok(fleecing_cluster):
        raise UsageError(
            f"fleecing cluster size {fleecing_cluster}: not a power of two from 64K to 2M"
        )
    confine = confine_reads(version_number, fleecing_cluster)
    disks, skipped = await scan_devices(q)
    nodes: list[dict[str, Any]] = await q.execute("query-named-block-nodes", {"flat": True})
    exports: list[dict[str, Any]] = await q.execute("query-block-exports")
    status = await q.execute("query-status")
    log.info("VM %s: QEMU %s, status %s, %d disk(s)", vmid, version, status["status"], len(disks))

    leftovers = _session_leftovers(nodes, exports)
    if leftovers:
        raise StateError(
            f"a snapfs session is already active on VM {vmid} ({', '.join(leftovers)})"
        )
    if status["status"] in _MIGRATION_STATES:
        raise StateError(f"VM {vmid} is {status['status']}; try again later")
    known = {d.name for d in disks} | set(skipped)
    unknown = [e for e in exclude if e not in known]
    if unknown:
        raise UsageError(
            f"--exclude: VM {vmid} has no disk {', '.join(sorted(unknown))} "
            f"(disks: {', '.join(sorted(d.name for d in disks)) or 'none'})"
        )
    disks = [d for d in disks if d.name not in exclude]
    seen: set[str] = set()
    for d in disks:
        if d.name in seen:
            raise SetupError(f"VM {vmid}: two disks are named {d.name}")
        seen.add(d.name)
        if d.read_only:
            raise SetupError(
                f"disk {d.name} is read-only: the copy-before-write filter cannot "
                "be inserted (exclude it)"
            )
    if not disks:
        raise SetupError(f"VM {vmid}: no disk to snapshot")
    aborts = await client_close_aborts(q, version_number, [d.qom_path for d in disks])
    if aborts:
        log.info(
            "VM %s: QEMU %s aborts if an NBD client of a disk on an I/O thread disconnects "
            "first: only QEMU closes this session's NBD connections",
            vmid,
            version,
        )

    record_path = (state_dir or fleecing_dir) / "bitmaps.json"
    record = _read_record(record_path) if incremental else {}
    states: list[DiskState] = []
    for i, d in enumerate(disks):
        fl, cbw, acc = _node_names(d.name, i)
        bitmap = _plan_bitmap(d, nodes, record, vmid, incremental)
        # Where block status may have to be corrected (see confine_reads): N records the
        # same writes when there is one.
        written = (bitmap.next or WRITTEN_BITMAP) if confine else ""
        states.append(
            DiskState(
                name=d.name,
                qom_path=d.qom_path,
                node=d.node,
                fmt=d.fmt,
                size=d.size,
                fleecing_path=str(fleecing_dir / f"snapfs-{vmid}-{d.name}.qcow2"),
                fleecing_node=fl,
                cbw_node=cbw,
                access_node=acc,
                export_id=f"{PREFIX}exp-{d.name}",
                export_name=d.name,
                bitmap=bitmap,
                data_node=d.data_node,
                throttle=d.throttle,
                confine=confine,
                cbw_cluster=fleecing_cluster,
                written=written,
                copied=COPIED_BITMAP if confine else "",
            )
        )

    was_running = bool(status["running"])
    if on_plan is not None:
        on_plan(
            GraphState(
                vmid=vmid,
                qmp_socket=str(q.path),
                nbd_socket=str(nbd_socket),
                qemu_version=version,
                snapshot_time="",
                pause_ms=None,
                disks=states,
                incremental=incremental,
                fleecing_dir=str(fleecing_dir),
                skipped=skipped,
                complete=False,
                was_running=was_running,
                client_close_aborts=aborts,
            )
        )
    undo = _Undo()
    current: tuple[str, str | None] = ("validate", None)

    async def step(what: str, disk: str | None = None) -> None:
        nonlocal current
        current = (what, disk)
        log.info("setup: %s%s", what, f" for {disk}" if disk else "")
        if on_step is not None:
            pending = on_step(what, disk)
            if pending is not None:
                await pending

    try:
        # (2) NBD server first: a running one means we must not touch the graph.
        await step("start NBD server")
        # A stale socket file of ours; QEMU cannot bind over it.
        paths.unlink(nbd_socket, "NBD socket")
        try:
            await q.execute(
                "nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(nbd_socket)}}}
            )
        except QMPCommandError as err:
            if "already running" in err.desc:
                raise StateError(
                    f"an NBD server is already running in VM {vmid} (another backup "
                    "or export is active); nothing was changed"
                ) from err
            raise
        undo.push("stop NBD server", lambda: q.execute("nbd-server-stop"))

        # (3) Fleecing images and nodes; the guest does not see any of this yet.
        await step("create fleecing directory")
        try:
            with paths.open_dir(fleecing_dir, "fleecing directory", create=0o700):
                pass
        except UsageError as err:
            raise _StepFailed("create fleecing directory", None, err) from err
        await _create_fleecing_files(states, undo, step)
        for s in states:
            await step("add fleecing node", s.name)
            await q.execute(
                "blockdev-add",
                {
                    "driver": "qcow2",
                    "node-name": s.fleecing_node,
                    "discard": "unmap",
                    "file": {"driver": "file", "filename": s.fleecing_path, "discard": "unmap"},
                },
            )
            undo.push(f"delete {s.fleecing_node}", _deleter(q, s.fleecing_node))
            if s.copied:
                # Before the filter exists, so it sees every copy; it goes with the node.
                await step("add copied bitmap", s.name)
                await q.execute(
                    "block-dirty-bitmap-add",
                    {
                        "node": s.fleecing_node,
                        "name": s.copied,
                        "persistent": False,
                        "granularity": s.cbw_cluster,
                    },
                )
            if s.bitmap.mode == "new" and s.bitmap.persistent in _bitmaps_of(nodes, s.data_node):
                # Unusable (inconsistent, disabled, resized): start over.
                await step("remove unusable bitmap", s.name)
                await q.execute(
                    "block-dirty-bitmap-remove", {"node": s.data_node, "name": s.bitmap.persistent}
                )

        # (4) The snapshot point. Freezing F, adding N and inserting the filters happen while
        # the guest is stopped, so F + the fleecing copy describe exactly the same instant:
        # a write between freezing F and the filter going live would otherwise be in the
        # snapshot but in neither F (this backup) nor... only N (the next one).
        # The guest freeze (snapfs.agent) wraps the stop .. cont window: it needs a running
        # guest, so it freezes before the stop and thaws after the cont, whatever happens.
        around = contextlib.AsyncExitStack()
        try:
            if around_snapshot is not None:
                await step("freeze guest")
                await around.enter_async_context(around_snapshot(was_running))
            pause_ms: float | None = None
            stopped_at = 0.0
            if was_running:
                await step("stop VM")
                stopped_at = trio.current_time()
                await q.execute("stop")
            try:
                actions = [a for s in states for a in _bitmap_prepare_actions(s, nodes)]
                if actions:
                    await step("prepare bitmaps", None)
                    await q.execute("transaction", {"actions": actions})
                    for s in states:
                        for name in {s.bitmap.next, s.bitmap.frozen, s.written} - {""}:
                            undo.push(
                                f"remove bitmap {name}", _bitmap_remover(q, s.data_node, name)
                            )
                for s in states:
                    await step("add copy-before-write filter", s.name)
                    # discard=unmap: the guest's discards pass on to the disk (old data first
                    # saved), where the disk's own setting decides; without it the filter
                    # would drop them.
                    cbw_args: dict[str, Any] = {
                        "driver": "copy-before-write",
                        "node-name": s.cbw_node,
                        "file": s.data_node,
                        "target": s.fleecing_node,
                        "discard": "unmap",
                        "on-cbw-error": "break-snapshot",
                        "cbw-timeout": cbw_timeout,
                    }
                    if s.bitmap.mode == "reuse":
                        cbw_args["bitmap"] = {"node": s.bitmap.node, "name": s.bitmap.frozen}
                    await q.execute("blockdev-add", cbw_args)
                    undo.push(f"delete {s.cbw_node}", _deleter(q, s.cbw_node))
                for s in states:
                    await step("insert filter", s.name)
                    if s.throttle is not None:
                        # Below the throttle: backup reads and old-data copies do not spend
                        # the guest's I/O budget.
                        await q.execute(
                            "blockdev-reopen", {"options": [{**s.throttle, "file": s.cbw_node}]}
                        )
                    else:
                        await q.execute(
                            "qom-set",
                            {"path": s.qom_path, "property": "drive", "value": s.cbw_node},
                        )
                    undo.push(f"restore drive of {s.name}", _drive_restorer(q, s))
                snapshot_time = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
            finally:
                resume_error: QMPCommandError | None = None
                if was_running and q.broken is None:
                    # Resume even when a step failed: rollback does not need the guest stopped,
                    # and the guest must not wait for it.
                    log.info("setup: resume VM")
                    with trio.CancelScope(shield=True):
                        try:
                            await q.execute("cont")
                        except QMPCommandError as err:
                            resume_error = err
                    pause_ms = round((trio.current_time() - stopped_at) * 1000, 3)
                    log.info("VM %s was paused for %.1f ms", vmid, pause_ms)
        finally:
            await around.aclose()
        if resume_error is not None:
            current = ("resume VM (the VM is still paused)", None)
            raise resume_error

        # (5) Export the snapshot.
        for s in states:
            await step("add snapshot-access node", s.name)
            await q.execute(
                "blockdev-add",
                {
                    "driver": "snapshot-access",
                    "node-name": s.access_node,
                    "file": s.cbw_node,
                    "discard": "unmap",
                },
            )
            undo.push(f"delete {s.access_node}", _deleter(q, s.access_node))
        for s in states:
            await step("add NBD export", s.name)
            export: dict[str, Any] = {
                "type": "nbd",
                "id": s.export_id,
                "node-name": s.access_node,
                "name": s.export_name,
                "writable": True,
            }
            if s.export_bitmaps:
                # By name QEMU 7.2 only looks down filter/COW children, and snapshot-access is
                # neither: name the node explicitly.
                export["bitmaps"] = [{"node": n, "name": b} for n, b in s.export_bitmaps]
            await q.execute("block-export-add", export)
            undo.push(f"delete export {s.export_id}", _export_deleter(q, s.export_id))
        if incremental:
            await step("read bitmap granularity")
            nodes = await q.execute("query-named-block-nodes", {"flat": True})
            for s in states:
                info = _bitmaps_of(nodes, s.bitmap.node).get(s.bitmap.frozen or s.bitmap.next)
                if info is not None:
                    s.granularity = int(info["granularity"])
    except BaseException as err:
        if q.broken is not None:
            # QEMU may still run what it did not answer: the plan's teardown removes it all.
            log.warning("setup: %s; nothing is rolled back on this connection", q.broken)
            raise
        await undo.run()
        if isinstance(err, StateError | UsageError):
            raise
        if isinstance(err, VMGoneError):
            raise
        what, disk = current
        cause = err.cause if isinstance(err, _StepFailed) else err
        if isinstance(err, _StepFailed):
            what, disk = err.step, err.disk
        if not isinstance(cause, Exception):
            raise
        raise SetupError(f"{what}{f' for {disk}' if disk else ''}: {_message(cause)}") from cause

    for s in states:
        if s.bitmap.mode == "new":
            log.info("%s: full (bitmap %s: %s)", s.name, s.bitmap.persistent, s.bitmap.reason)
        elif s.bitmap.mode == "reuse":
            log.info("%s: incremental since the last commit of %s", s.name, s.bitmap.persistent)
    return GraphState(
        vmid=vmid,
        qmp_socket=str(q.path),
        nbd_socket=str(nbd_socket),
        qemu_version=version,
        snapshot_time=snapshot_time,
        pause_ms=pause_ms,
        disks=states,
        incremental=incremental,
        fleecing_dir=str(fleecing_dir),
        bitmap_record=str(record_path) if incremental else "",
        skipped=skipped,
        was_running=was_running,
        client_close_aborts=aborts,
    )


def _plan_bitmap(
    d: BlockDevice,
    nodes: list[dict[str, Any]],
    record: dict[str, Any],
    vmid: str,
    incremental: str | None,
) -> BitmapState:
    """Decide new or reuse for one disk from what QEMU and the record say (no side effects)."""
    if incremental is None:
        return BitmapState()
    b_name = f"{PREFIX}{incremental}"
    state = BitmapState(
        mode="new",
        node=d.data_node,
        persistent=b_name,
        next=f"{b_name}-next",
        persist=d.fmt == "qcow2",
    )
    b = _bitmaps_of(nodes, d.data_node).get(b_name)
    recorded = _recorded_size(record, vmid, incremental, d.name)
    if b is None:
        state.reason = f"no bitmap {b_name} on the disk"
    elif b.get("inconsistent", False):
        state.reason = f"bitmap {b_name} is inconsistent (QEMU did not exit cleanly)"
    elif not b.get("recording", True):
        state.reason = f"bitmap {b_name} is disabled"
    elif b.get("busy", False):
        state.reason = f"bitmap {b_name} is in use by another job"
    elif recorded is None:
        state.reason = f"no record of the last commit of {b_name}"
    elif recorded != d.size:
        state.reason = f"disk size changed from {recorded} to {d.size} since the last commit"
    else:
        state.mode = "reuse"
        state.frozen = f"{b_name}-frozen"
    return state


def _bitmap_prepare_actions(s: DiskState, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    b = s.bitmap
    actions: list[dict[str, Any]] = []
    if s.written == WRITTEN_BITMAP:
        actions.append(
            {
                "type": "block-dirty-bitmap-add",
                "data": {
                    "node": s.data_node,
                    "name": s.written,
                    "persistent": False,
                    # No finer than copy-before-write's cluster: coarser only keeps fewer
                    # holes (snapfs.source), never one that is not in the snapshot.
                    "granularity": s.cbw_cluster,
                },
            }
        )
    if b.mode == "none":
        return actions
    next_args: dict[str, Any] = {"node": b.node, "name": b.next, "persistent": False}
    if b.mode == "new":
        return [*actions, {"type": "block-dirty-bitmap-add", "data": next_args}]
    # Same granularity as B, so the merges at commit are exact.
    granularity = _bitmaps_of(nodes, b.node)[b.persistent]["granularity"]
    next_args["granularity"] = granularity
    return [
        *actions,
        {"type": "block-dirty-bitmap-add", "data": next_args},
        {
            "type": "block-dirty-bitmap-add",
            "data": {
                "node": b.node,
                "name": b.frozen,
                "persistent": False,
                "disabled": True,
                "granularity": granularity,
            },
        },
        {
            "type": "block-dirty-bitmap-merge",
            "data": {"node": b.node, "target": b.frozen, "bitmaps": [b.persistent]},
        },
    ]


async def _create_fleecing_files(
    states: list[DiskState], undo: _Undo, step: Callable[[str, str | None], Awaitable[None]]
) -> None:
    """Create every fleecing image (mode 0600) in parallel; raise _StepFailed for the first.

    Each image is created new (O_EXCL, O_NOFOLLOW) in the checked fleecing directory, relative
    to its descriptor, and qemu-img formats that very file through the descriptor it inherits
    (``/proc/self/fd/N``), never by its name. QEMU then opens it by name: in a trusted
    directory (snapfs.paths) nobody but root can put anything else there.
    """
    failures: list[_StepFailed] = []

    async def create(s: DiskState) -> None:
        path = Path(s.fleecing_path)
        try:
            with paths.open_dir(path.parent, "fleecing directory") as d:
                # Stale file of an earlier session of this VM: the VM holds no snapfs node, so
                # it is unused. Created empty with 0600 first: qemu-img keeps the mode of a file.
                d.unlink(path.name)
                fd = d.create(path.name, 0o600)
        except (OSError, UsageError) as err:
            failures.append(_StepFailed("create fleecing image", s.name, err))
            return
        undo.push(f"remove {path}", _file_remover(path))
        try:
            await trio.run_process(
                [
                    *(QEMU_IMG, "create", "-q", "-f", "qcow2"),
                    *("-o", f"cluster_size={s.cbw_cluster}"),
                    *(f"/proc/self/fd/{fd}", str(s.size)),
                ],
                capture_stdout=True,
                capture_stderr=True,
                pass_fds=(fd,),
            )
        except OSError as err:
            failures.append(_StepFailed("create fleecing image", s.name, err))
        except Exception as err:  # CalledProcessError, reported below
            stderr = getattr(err, "stderr", b"") or b""
            msg = stderr.decode(errors="replace").strip() or str(err)
            failures.append(_StepFailed("create fleecing image", s.name, RuntimeError(msg)))
        finally:
            os.close(fd)

    for s in states:
        await step("create fleecing image", s.name)
    async with trio.open_nursery() as nursery:
        for s in states:
            nursery.start_soon(create, s)
    if failures:
        raise failures[0]


def _deleter(q: QMP, node: str) -> Callable[[], Awaitable[Any]]:
    return lambda: q.execute("blockdev-del", {"node-name": node})


def _bitmap_remover(q: QMP, node: str, name: str) -> Callable[[], Awaitable[Any]]:
    return lambda: q.execute("block-dirty-bitmap-remove", {"node": node, "name": name})


def _drive_restorer(q: QMP, s: DiskState) -> Callable[[], Awaitable[Any]]:
    if s.throttle is not None:
        return _throttle_restorer(q, s.throttle)
    return _qom_drive_setter(q, s.qom_path, s.node)


def _throttle_restorer(q: QMP, options: dict[str, Any]) -> Callable[[], Awaitable[Any]]:
    """Put a throttle node back onto its own child (``options`` as _throttle_options made)."""
    return lambda: q.execute("blockdev-reopen", {"options": [options]})


def _qom_drive_setter(q: QMP, path: str, node: str) -> Callable[[], Awaitable[Any]]:
    return lambda: q.execute("qom-set", {"path": path, "property": "drive", "value": node})


def _export_deleter(q: QMP, export_id: str) -> Callable[[], Awaitable[None]]:
    async def delete() -> None:
        await _delete_export(q, export_id)

    return delete


def _file_remover(path: Path) -> Callable[[], Awaitable[None]]:
    async def remove() -> None:
        paths.unlink(path, "fleecing image")

    return remove


async def _delete_export(q: QMP, export_id: str) -> None:
    """Delete an export and wait until QEMU has let go of its node (deletion is asynchronous)."""
    try:
        await q.execute("block-export-del", {"id": export_id})
    except QMPCommandError as err:
        if "not found" in err.desc.lower():
            return
        # A client is still connected: cut it off, the session is over.
        log.info("export %s in use (%s): deleting it with mode hard", export_id, err.desc)
        await q.execute("block-export-del", {"id": export_id, "mode": "hard"})
    with trio.move_on_after(_EXPORT_GONE_TIMEOUT):
        delay = 0.001
        while any(e["id"] == export_id for e in await q.execute("query-block-exports")):
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)


# -- teardown -----------------------------------------------------------------------------------


async def teardown(q: QMP, state: GraphState, *, commit: bool) -> None:
    """Remove what ``setup`` built and commit or abort the incremental bitmaps.

    Tolerant and idempotent: pieces already gone are skipped. Every step is tried; whatever
    could not be restored is listed in one TeardownError at the end.
    """
    problems: list[str] = []

    async def attempt(what: str, fn: Callable[[], Awaitable[Any]]) -> bool:
        log.info("teardown: %s", what)
        try:
            await fn()
        except (VMGoneError, QMPTimeoutError):
            raise  # every later step would fail the same way
        except Exception as err:  # try every step, report them all
            log.warning("teardown: %s failed: %s", what, _message(err))
            problems.append(f"{what}: {_message(err)}")
            return False
        return True

    # Shielded: a half-done teardown is what we must avoid most.
    with trio.CancelScope(shield=True):
        if not state.complete and state.was_running:
            # The set-up stopped the VM and could not resume it.
            status = await q.execute("query-status")
            if status["status"] == "paused":
                await attempt(f"resume VM {state.vmid}", lambda: q.execute("cont"))
        nodes = {
            n["node-name"]: n for n in await q.execute("query-named-block-nodes", {"flat": True})
        }
        exports = {e["id"] for e in await q.execute("query-block-exports")}
        drives = {}
        for info in await q.execute("query-block"):
            dev = _device_of(info)
            if dev is not None and "inserted" in info:
                drives[dev[1]] = info["inserted"]["node-name"]
        children = await _block_graph(q)

        keep_files: set[str] = set()
        live = any(
            s.export_id in exports
            or s.access_node in nodes
            or s.cbw_node in nodes
            or s.fleecing_node in nodes
            for s in state.disks
        )
        for s in state.disks:
            if s.export_id in exports:
                await attempt(f"delete export {s.export_id}", _export_deleter(q, s.export_id))
        if live or not state.complete:
            # Only while our session is live: after a restart the server would not be ours.
            await attempt("stop NBD server", _nbd_stopper(q))
        if state.held_fds:
            # Our NBD connections that QEMU keeps: they may end once no export of ours is left
            # (QEMU has closed their server side); else they are kept for a later teardown.
            left = {e["id"] for e in await q.execute("query-block-exports")} & {
                s.export_id for s in state.disks
            }
            if left:
                problems.append(f"kept the NBD connections while {', '.join(sorted(left))} remain")
            else:
                for name in state.held_fds:
                    await attempt(f"release {name}", _fd_releaser(q, name))
        with contextlib.suppress(OSError, UsageError):
            paths.unlink(Path(state.nbd_socket), "NBD socket")
        for s in state.disks:
            # Order matters: while snapshot-access is a parent of the filter, the filter unshares
            # writes on the disk node and moving the device back fails with a permission conflict.
            if s.access_node in nodes:
                await attempt(f"delete {s.access_node}", _deleter(q, s.access_node))
            if s.throttle is not None:
                if children.get(s.node, {}).get("file") == s.cbw_node:
                    await attempt(f"put {s.node} back onto {s.data_node}", _drive_restorer(q, s))
            elif drives.get(s.qom_path) == s.cbw_node:
                await attempt(f"restore drive of {s.name} to {s.node}", _drive_restorer(q, s))
            if s.cbw_node in nodes:
                await attempt(f"delete {s.cbw_node}", _deleter(q, s.cbw_node))
            if s.fleecing_node in nodes and not await attempt(
                f"delete {s.fleecing_node}", _deleter(q, s.fleecing_node)
            ):
                # QEMU still has the image open; a later teardown removes it.
                keep_files.add(s.fleecing_path)
        for s in state.disks:
            if s.bitmap.mode != "none":
                bitmaps = _bitmaps_of(list(nodes.values()), s.bitmap.node)
                if commit:
                    await attempt(
                        f"commit bitmap {s.bitmap.persistent} of {s.name}",
                        _committer(q, state, s, bitmaps),
                    )
                else:
                    await attempt(f"abort bitmaps of {s.name}", _aborter(q, s, bitmaps))
            if s.written == WRITTEN_BITMAP and s.written in _bitmaps_of(
                list(nodes.values()), s.data_node
            ):
                await attempt(
                    f"remove bitmap {s.written} of {s.name}",
                    _bitmap_remover(q, s.data_node, s.written),
                )
        for s in state.disks:
            if s.fleecing_path not in keep_files:
                await attempt(f"remove {s.fleecing_path}", _file_remover(Path(s.fleecing_path)))

    if problems:
        raise TeardownError(f"teardown of VM {state.vmid} left: " + "; ".join(problems))
    log.info("teardown of VM %s complete", state.vmid)


def _nbd_stopper(q: QMP) -> Callable[[], Awaitable[None]]:
    async def stop() -> None:
        try:
            await q.execute("nbd-server-stop")
        except QMPCommandError as err:
            if "not running" not in err.desc:
                raise

    return stop


def _fd_releaser(q: QMP, name: str) -> Callable[[], Awaitable[None]]:
    async def release() -> None:
        try:
            await q.execute("closefd", {"fdname": name})
        except QMPCommandError as err:
            if "not found" not in err.desc.lower():
                raise  # else: released already, or QEMU restarted since

    return release


def _aborter(
    q: QMP, s: DiskState, bitmaps: dict[str, dict[str, Any]]
) -> Callable[[], Awaitable[None]]:
    """Drop N and F, keep B: the next incremental then covers this one and everything since."""

    async def abort() -> None:
        actions = [
            {"type": "block-dirty-bitmap-remove", "data": {"node": s.bitmap.node, "name": name}}
            for name in (s.bitmap.next, s.bitmap.frozen)
            if name and name in bitmaps
        ]
        if actions:
            await q.execute("transaction", {"actions": actions})

    return abort


def _committer(
    q: QMP, state: GraphState, s: DiskState, bitmaps: dict[str, dict[str, Any]]
) -> Callable[[], Awaitable[None]]:
    """Atomically make B = N (what changed since the snapshot point) and drop N and F."""
    b = s.bitmap

    async def commit() -> None:
        if b.next not in bitmaps:
            # Already committed, or QEMU restarted: B (if any) still covers everything since
            # the last commit, so leaving it alone loses nothing.
            log.warning(
                "%s: bitmap %s is gone; not committing (the next incremental will be "
                "larger, nothing is lost)",
                s.name,
                b.next,
            )
            if b.frozen in bitmaps:
                await q.execute("block-dirty-bitmap-remove", {"node": b.node, "name": b.frozen})
            return
        tail = [
            {
                "type": "block-dirty-bitmap-merge",
                "data": {"node": b.node, "target": b.persistent, "bitmaps": [b.next]},
            },
            {"type": "block-dirty-bitmap-remove", "data": {"node": b.node, "name": b.next}},
        ]
        if b.frozen in bitmaps:
            tail.append(
                {"type": "block-dirty-bitmap-remove", "data": {"node": b.node, "name": b.frozen}}
            )
        if b.persistent in bitmaps:
            head = [
                {"type": "block-dirty-bitmap-clear", "data": {"node": b.node, "name": b.persistent}}
            ]
            await q.execute("transaction", {"actions": head + tail})
        else:
            add: dict[str, Any] = {
                "node": b.node,
                "name": b.persistent,
                "granularity": bitmaps[b.next]["granularity"],
            }
            try:
                await q.execute(
                    "transaction",
                    {
                        "actions": [
                            {
                                "type": "block-dirty-bitmap-add",
                                "data": {**add, "persistent": b.persist},
                            },
                            *tail,
                        ]
                    },
                )
            except QMPCommandError as err:
                if not b.persist:
                    raise
                # E.g. a qcow2 v2 image: keep a bitmap that lives as long as QEMU does.
                log.warning(
                    "%s: cannot store bitmap %s in the image (%s); keeping it in memory only",
                    s.name,
                    b.persistent,
                    err.desc,
                )
                await q.execute(
                    "transaction",
                    {
                        "actions": [
                            {
                                "type": "block-dirty-bitmap-add",
                                "data": {**add, "persistent": False},
                            },
                            *tail,
                        ]
                    },
                )
        if state.incremental and state.bitmap_record:
            path = Path(state.bitmap_record)
            record = _read_record(path)
            record.setdefault(state.vmid, {}).setdefault(state.incremental, {})[s.name] = s.size
            _write_record(path, record)

    return commit


# -- orphans ------------------------------------------------------------------------------------


async def cleanup_orphans(q: QMP) -> list[str]:
    """Remove every snapfs session object from a VM (abort semantics); return what was removed.

    For a process killed without a state file: the graph is rediscovered from QEMU
    (``x-debug-query-block-graph`` gives the filter's original child). B is never touched.
    """
    removed: list[str] = []
    problems: list[str] = []

    async def attempt(what: str, fn: Callable[[], Awaitable[Any]]) -> None:
        log.info("cleanup: %s", what)
        try:
            await fn()
            removed.append(what)
        except (VMGoneError, QMPTimeoutError):
            raise
        except Exception as err:  # try every step, report them all
            problems.append(f"{what}: {_message(err)}")

    with trio.CancelScope(shield=True):
        nodes: list[dict[str, Any]] = await q.execute("query-named-block-nodes", {"flat": True})
        exports = [
            e["id"] for e in await q.execute("query-block-exports") if e["id"].startswith(PREFIX)
        ]
        graph = await q.execute("x-debug-query-block-graph")
        names = {n["id"]: n["name"] for n in graph["nodes"]}
        edges = [
            (names.get(e["parent"], ""), e["name"], names.get(e["child"], ""))
            for e in graph["edges"]
        ]
        for export_id in exports:
            await attempt(f"delete export {export_id}", _export_deleter(q, export_id))
        if exports:
            await attempt("stop NBD server", _nbd_stopper(q))
        ours = [n for n in nodes if n["node-name"].startswith(PREFIX)]
        for n in ours:
            if n["drv"] == "snapshot-access":
                await attempt(f"delete {n['node-name']}", _deleter(q, n["node-name"]))
        drives = {}
        for info in await q.execute("query-block"):
            dev = _device_of(info)
            if dev is not None and "inserted" in info:
                drives[info["inserted"]["node-name"]] = dev[1]
        by_name = {n["node-name"]: n for n in nodes}
        for n in ours:
            if n["drv"] != "copy-before-write":
                continue
            cbw = n["node-name"]
            below = [c for p, role, c in edges if p == cbw and role == "file"]
            if cbw in drives and below:
                await attempt(
                    f"restore drive of {drives[cbw]} to {below[0]}",
                    _qom_drive_setter(q, drives[cbw], below[0]),
                )
            for parent in [p for p, role, c in edges if c == cbw and role == "file"]:
                options = _throttle_options(
                    by_name.get(parent, {"node-name": parent}), below[0] if below else ""
                )
                if by_name.get(parent, {}).get("drv") == "throttle" and options is not None:
                    await attempt(
                        f"put {parent} back onto {options['file']}", _throttle_restorer(q, options)
                    )
            await attempt(f"delete {cbw}", _deleter(q, cbw))
        for n in ours:
            if n["drv"] not in ("copy-before-write", "snapshot-access"):
                await attempt(f"delete {n['node-name']}", _deleter(q, n["node-name"]))
                filename = Path(n.get("file", ""))
                if filename.name.startswith(PREFIX) and filename.suffix == ".qcow2":
                    await attempt(f"remove {filename}", _file_remover(filename))
        for n in nodes:
            for b in n.get("dirty-bitmaps", []):
                if _is_session_bitmap(b.get("name", "")):
                    await attempt(
                        f"remove bitmap {b['name']}", _bitmap_remover(q, n["node-name"], b["name"])
                    )
    if problems:
        raise TeardownError("cleanup left: " + "; ".join(problems))
    return removed
