"""Everything snapfs writes to disk or sends between processes, as typed, versioned records.

- ``Facts``: ``snapfs.json`` in a view (and in a backup made from it), and the status the
  serving process reports over its control socket;
- ``BackupRecord``: ``snapfs-backup.json`` in a destination of ``snapfs copy``;
- ``PointManifest``: ``manifest.json`` of one restore point (``snapfs copy --keep``);
- ``StateRecord``: ``<run_dir>/.state/<vmid>/state.json``, what teardown and ``snapfs cleanup``
  need;
- ``Request``, ``Ack`` and ``Outcome``: the control socket's messages, one JSON object per line.

Each carries ``schema``; a reader accepts records of its own schema and older ones (missing
fields take their defaults) and refuses newer ones in words. ``from_json`` raises ValueError
naming what is wrong; callers turn that into their own error.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

#: The fleecing images' cluster size (copy-before-write's) unless --fleecing-cluster says
#: otherwise: qcow2's default.
DEFAULT_FLEECING_CLUSTER = 65536

SCHEMA = 1

R = TypeVar("R", bound="Record")


class Record:
    """JSON in and out for the dataclasses below, checking field types on the way in."""

    @classmethod
    def from_dict(cls: type[R], data: object, what: str = "") -> R:
        what = what or cls.__name__
        if not isinstance(data, dict):
            raise ValueError(f"{what} is not a JSON object")
        schema = data.get("schema", 0)
        if not isinstance(schema, int) or schema > SCHEMA:
            raise ValueError(f"{what} has schema {schema!r}, newer than this snapfs ({SCHEMA})")
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ValueError(f"{what} has no {f.name!r}")
                continue
            values[f.name] = _convert(data[f.name], hints[f.name], f"{what}.{f.name}")
        try:
            return cls(**values)
        except ValueError as err:  # a field's value refused by the record's own check
            raise ValueError(f"{what}: {err}") from None

    @classmethod
    def from_json(cls: type[R], text: str | bytes, what: str = "") -> R:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise ValueError(f"{what or cls.__name__} is not JSON: {err}") from err
        return cls.from_dict(data, what)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload, no-any-return]

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=indent is not None)


def check_file_name(name: str, what: str) -> None:
    """Raise ValueError unless ``name`` is a plain file name: a disk's name becomes
    ``<name>.raw`` in a view and in a backup directory, and records are read from paths
    someone gave (a view may be any directory), so none may lead out of its directory."""
    if (
        not name
        or name.startswith(".")
        or any(c in name for c in "/\0\n")
        or len(name.encode(errors="surrogateescape")) > 200
    ):
        raise ValueError(f"{what}: {name!r} is not a plain file name")


def _convert(value: Any, hint: Any, what: str) -> Any:
    """``value`` checked against (and built into) the type ``hint``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        for arg in args:
            try:
                return _convert(value, arg, what)
            except ValueError:
                continue
        raise ValueError(f"{what}: {value!r} is not {hint}")
    if hint is type(None):
        if value is None:
            return None
        raise ValueError(f"{what}: expected null")
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"{what}: {value!r} is not one of {args}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{what}: expected an object")
        _, vhint = args
        return {str(k): _convert(v, vhint, f"{what}[{k!r}]") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{what}: expected a list")
        return [_convert(v, args[0], f"{what}[{i}]") for i, v in enumerate(value)]
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value, what)
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (
        isinstance(hint, type)
        and isinstance(value, hint)
        and not (hint is int and isinstance(value, bool))
    ):
        return value
    raise ValueError(f"{what}: {value!r} is not {getattr(hint, '__name__', hint)}")


# -- snapfs.json ---------------------------------------------------------------------------------


@dataclass
class FreezeFacts(Record):
    """The guest freeze around the snapshot point (snapfs.agent.FreezeResult)."""

    state: Literal["frozen", "skipped", "failed"]
    reason: str | None = None
    filesystems: int | None = None
    thaw: str | None = None
    frozen_ms: float | None = None
    already_frozen: bool = False


@dataclass
class BitmapFacts(Record):
    """A disk's incremental bitmaps (snapfs.qmp.BitmapState): mode ``none``, ``new`` (with
    the reason) or ``reuse``, and for new and reuse the bitmaps' names."""

    mode: Literal["none", "new", "reuse"]
    reason: str = ""
    node: str = ""
    persistent: str = ""
    next: str = ""
    frozen: str = ""
    persist: bool = False


@dataclass
class DiskFacts(Record):
    """One disk of a view."""

    size: int
    format: str
    nodes: dict[str, str]
    bitmap: BitmapFacts
    dirty_bytes: int
    dirty_regions: int
    readable_bytes: int
    discarded_bytes: int
    bytes_read: int
    fleecing_bytes: int
    confined_reads: int = 0
    fleecing_cluster: int = DEFAULT_FLEECING_CLUSTER  # copy-before-write's (--fleecing-cluster)


@dataclass
class Facts(Record):
    """``snapfs.json``: what a view is, and how it is going (the byte counters change)."""

    vmid: str
    snapshot_time: str  # UTC, ISO 8601
    qemu_version: str
    pause_ms: float | None  # None: the VM was not running
    incremental: str | None
    mountpoint: str
    broken: str | None  # why the snapshot cannot be read any more
    freeze: FreezeFacts | None
    disks: dict[str, DiskFacts]
    log: str = "stderr"  # where the serving process logs
    tuned: bool = True  # QEMU's NBD server tuned from the outside (--no-tune: False)
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        for name in self.disks:
            check_file_name(name, "a disk's name")


# -- snapfs-backup.json ---------------------------------------------------------------------------


@dataclass
class BackupRecord(Record):
    """``snapfs-backup.json`` in a destination of ``snapfs copy``: which chain its images are,
    and of when."""

    vmid: str
    incremental: str | None
    snapshot_time: str
    disks: list[str]
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        for name in self.disks:
            check_file_name(name, "a disk's name")


# -- restore points -------------------------------------------------------------------------------


@dataclass
class PointDisk(Record):
    """One disk of a restore point: its image and what it holds."""

    size: int
    image: str  # file name in the point's directory
    backing: str | None  # the point whose image this one's backing file is; None: a base
    mode: Literal["full", "incremental"]
    dirty_bytes: int  # bytes of the regions this run copied (the whole disk for a full one)
    dirty_regions: int
    written: int  # bytes of data written into the image
    zero: int  # bytes the view read as zeros
    checksum: str  # "sha256/1M:<hex>": SHA-256 of the SHA-256 of every 1 MiB of the disk

    def __post_init__(self) -> None:
        check_file_name(self.image, "an image's name")


@dataclass
class PointManifest(Record):
    """``manifest.json`` of a restore point; a point without one is not a point."""

    id: str
    vmid: str
    snapshot_time: str  # UTC, ISO 8601, as in snapfs.json
    completed: str  # UTC, ISO 8601: when the point became visible
    incremental: str | None
    disks: dict[str, PointDisk]
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        check_file_name(self.id, "a point's name")
        for name in self.disks:
            check_file_name(name, "a disk's name")


# -- state.json ----------------------------------------------------------------------------------


@dataclass
class StateRecord(Record):
    """A session's state file: everything teardown and ``snapfs cleanup`` need. ``graph`` is
    snapfs.qmp.GraphState's own record (``GraphState.to_dict``)."""

    graph: dict[str, Any]
    pid: int
    mountpoint: str
    qmp: str
    created_mountpoint: bool = False
    # Which mount is ours: cleanup unmounts the mountpoint only while it leads there.
    mount_id: int | None = None
    schema: int = SCHEMA


# -- the control socket --------------------------------------------------------------------------


@dataclass
class Request(Record):
    """A request to a serving process. ``ack``: answer an umount with an ``Ack`` at once."""

    op: str
    commit: bool = False
    ack: bool = False
    schema: int = SCHEMA


@dataclass
class Ack(Record):
    """An umount was taken: its ``Outcome`` follows when the teardown is done."""

    ack: bool = True
    schema: int = SCHEMA


@dataclass
class Outcome(Record):
    """How a request ended: for an umount, the teardown's result; for a status, ``status``.
    ``exit`` is the exit code an error stands for (snapfs.errors)."""

    ok: bool
    committed: bool = False
    error: str = ""
    exit: int = 0
    incremental: str | None = None
    status: Facts | None = None
    schema: int = SCHEMA
