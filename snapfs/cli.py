"""The ``snapfs`` command: parses arguments, sets up logging, reports errors.

Only this module prints and exits. ``snapfs mount`` forks the serving process before any event
loop starts and waits on a pipe until the tree is served (or set-up failed), so it returns only
once the view is ready, with the set-up's own error message and exit code if not.

``snapfs run`` is ``mount``, then COMMAND with the view, then ``umount`` (``--commit`` only if
COMMAND exited 0 and no signal came): the one line for a cron job or a systemd timer. SIGINT,
SIGTERM and SIGHUP are relayed to COMMAND; the view is always unmounted, without commit.

Logging goes to stderr in the foreground; a serving process in the background logs to the
systemd journal if there is one, else to syslog; ``SNAPFS_LOG_FILE`` overrides both (tests).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

from snapfs import __version__, lazy_module, paths
from snapfs.errors import SnapfsError, StateError, UsageError, VerifyError
from snapfs.records import DEFAULT_FLEECING_CLUSTER, Outcome

if TYPE_CHECKING:
    from snapfs import agent, control, options, points, provider, runner, session, state
else:
    agent, control, options, points, provider, runner, session, state = (
        lazy_module(f"snapfs.{name}")
        for name in ("agent", "control", "options", "points", "provider", "runner", "session",
                     "state")
    )  # fmt: skip

log = logging.getLogger("snapfs")

JOURNAL_SOCKET = "/run/systemd/journal/socket"
RELAYED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


# -- arguments ------------------------------------------------------------------------------------


def _verbosity(p: argparse.ArgumentParser, *, top: bool) -> None:
    # On subcommands too ("snapfs run 100 -v -- ..."); SUPPRESS keeps the top level's value.
    default: Any = False if top else argparse.SUPPRESS
    p.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="log debugging details"
    )
    p.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="log only errors; no progress bar",
    )


def _mount_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--qmp",
        metavar="SOCKET",
        help="the VM's QMP socket (default: /var/run/qemu-server/VMID.qmp)",
    )
    p.add_argument(
        "--fleecing-dir",
        metavar="DIR",
        help="where fleecing images go (default: /var/lib/snapfs/VMID)",
    )
    p.add_argument(
        "--exclude",
        metavar="DISK",
        action="append",
        default=[],
        help="leave out this disk (repeatable)",
    )
    p.add_argument(
        "--incremental",
        metavar="ID",
        help="incremental backup: only regions changed since the last committed "
        "backup with this ID are readable",
    )
    p.add_argument(
        "-o",
        dest="options",
        metavar="OPT",
        action="append",
        default=[],
        help="mount option; only allow_other is known",
    )
    p.add_argument(
        "--freeze",
        choices=["auto", "required", "off"],
        default="auto",
        help="the guest's file systems through its agent: auto (freeze if an agent is there, "
        "else warn and take a crash-consistent snapshot; the default), required (no snapshot "
        "unless frozen), off",
    )
    p.add_argument(
        "--no-freeze",
        action="store_true",
        help="the same as --freeze=off",
    )
    p.add_argument(
        "--agent",
        metavar="SOCKET",
        help="the guest agent's socket (default: /var/run/qemu-server/VMID.qga)",
    )
    p.add_argument(
        "--no-tune",
        action="store_true",
        help="leave QEMU's NBD server as it is (no wider send buffer, no warm-up read): reads "
        "are slower",
    )
    p.add_argument(
        "--fleecing-cluster",
        metavar="SIZE",
        default="64K",
        help="cluster size of the fleecing images, 64K (the default) to 2M: a guest write "
        "after the snapshot copies this much old data first; on QEMU before 8.0 a read over "
        "clusters the guest wrote is read again one cluster per request",
    )
    p.add_argument(
        "--freeze-timeout",
        metavar="SECONDS",
        type=float,
        default=10.0,
        help="how long the guest may take to freeze (default: 10)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="snapfs",
        description="Consistent point-in-time views of a running QEMU VM's disks, as files.",
    )
    p.add_argument("--version", action="version", version=f"snapfs {__version__}")
    _verbosity(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")
        _verbosity(c, top=False)
        return c

    m = command("mount", "mount a point-in-time view of a VM's disks")
    m.add_argument("vmid", help="the VM's ID (Proxmox) or name")
    m.add_argument(
        "mountpoint", nargs="?", help="an existing empty directory (default: /run/snapfs/VMID)"
    )
    _mount_options(m)
    m.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay attached and log to stderr (debugging)",
    )

    r = command("run", "mount, run COMMAND on the view, commit if it succeeds, unmount")
    r.usage = (
        "%(prog)s [-v] [-q] [--mountpoint DIR] [--incremental ID] [mount options] VMID "
        "-- COMMAND [ARGS...]"
    )
    r.epilog = (
        "COMMAND runs with the mountpoint in $SNAPFS_MOUNT and '{}' in its arguments "
        "replaced by it. Exit status: COMMAND's, 128+N after signal N, or snapfs's own "
        "error code if the view could not be mounted or committed."
    )
    r.add_argument("vmid", help="the VM's ID (Proxmox) or name")
    r.add_argument(
        "--mountpoint",
        metavar="DIR",
        help="an existing empty directory (default: /run/snapfs/VMID)",
    )
    _mount_options(r)
    r.add_argument(
        "argv", nargs="*", metavar="-- COMMAND [ARGS...]", help="the backup command, after '--'"
    )

    u = command("umount", "unmount and tear down a view")
    u.add_argument("target", help="VMID or mountpoint")
    u.add_argument(
        "--commit",
        action="store_true",
        help="the backup succeeded: the next incremental starts from this snapshot",
    )

    c = command("cleanup", "remove what a crashed session left behind")
    c.add_argument("vmid", help="the VM's ID or name")
    c.add_argument("--qmp", metavar="SOCKET", help="the VM's QMP socket")

    cp = command("copy", "back up a mounted view into a directory (the reference provider)")
    cp.epilog = (
        "Full views make sparse images; incremental views update them in place. "
        "A progress bar is shown on a terminal."
    )
    cp.add_argument("view", help="a mounted snapfs view")
    cp.add_argument("dest", help="the backup directory")
    cp.add_argument(
        "--discard",
        action="store_true",
        help="punch each copied range in the view, freeing fleecing space",
    )
    cp.add_argument(
        "--keep",
        type=int,
        metavar="N",
        help="keep restore points: each run becomes a point (a qcow2 image per disk, an "
        "overlay of the previous point for incremental views), the newest N are kept",
    )

    pt = command("points", "list the restore points in a backup directory")
    pt.add_argument("dest", help="a backup directory written with 'snapfs copy --keep'")
    pt.add_argument("--json", action="store_true", help="machine-readable output")

    rs = command("restore", "write a disk (or a whole VM) of a restore point")
    rs.usage = (
        "%(prog)s DEST [--at TIME|ID] (DISK TARGET | --list | --to-dir DIR) "
        "[--format raw|qcow2] [--force]"
    )
    rs.add_argument("dest", help="a backup directory with restore points")
    rs.add_argument("disk", nargs="?", help="the disk's name (as in the view: scsi0, virtio1...)")
    rs.add_argument("target", nargs="?", help="a new file, or a block device at least as large")
    rs.add_argument(
        "--at",
        metavar="TIME|ID",
        help="the point: its ID, or the newest one at or before a date or time (local "
        "unless a zone is given; a date alone means the end of that day); default: the newest",
    )
    rs.add_argument("--list", action="store_true", help="list the point's disks and files")
    rs.add_argument("--to-dir", metavar="DIR", help="every disk and the VM's config into DIR")
    rs.add_argument(
        "--format",
        choices=["raw", "qcow2"],
        help="the target's format (default: qcow2 for a .qcow2 name, else raw)",
    )
    rs.add_argument("--force", action="store_true", help="replace an existing target file")

    vf = command("verify", "re-read restore points and check them against their manifests")
    vf.add_argument("dest", help="a backup directory with restore points")
    vf.add_argument("--at", metavar="TIME|ID", help="only this point (see 'restore')")

    s = command("status", "show active sessions")
    s.add_argument("vmid", nargs="?", help="only this VM")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """argparse cannot take options before a '--' and a command line after it: split first."""
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if "--" in words:
        i = words.index("--")
        args = parser.parse_args(words[:i])
        if args.command == "run":
            args.argv = [*args.argv, *words[i + 1 :]]
            return args
    args, extra = parser.parse_known_args(words)
    if args.command == "restore":
        # argparse gives optional positionals their value at the first one (DEST) only, so
        # DISK TARGET after an option come back unparsed: take them in order.
        for word in list(extra):
            slot = next((n for n in ("disk", "target") if getattr(args, n) is None), None)
            if slot is None or word.startswith("-"):
                break
            setattr(args, slot, word)
            extra.remove(word)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "run" and args.argv and args.argv[0].startswith("-"):
        parser.error("put the command after '--'")
    return args


# -- logging --------------------------------------------------------------------------------------


def _priority(levelno: int) -> int:
    """syslog priority of a logging level."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


class JournalHandler(logging.Handler):
    """Sends records to the systemd journal's native socket, with structured fields."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = "snapfs") -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)

    @staticmethod
    def encode(fields: dict[str, str]) -> bytes:
        out = bytearray()
        for key, value in fields.items():
            data = value.encode(errors="replace")
            if b"\n" in data:
                out += key.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
            else:
                out += key.encode() + b"=" + data + b"\n"
        return bytes(out)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields = {
                "MESSAGE": self.format(record),
                "PRIORITY": str(_priority(record.levelno)),
                "SYSLOG_IDENTIFIER": self.identifier,
                "SYSLOG_PID": str(os.getpid()),
                "LOGGER": record.name,
                "CODE_FILE": record.pathname,
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName,
            }
            self.sock.sendto(self.encode(fields), self.path)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def _fallback_log(vmid: str) -> logging.Handler:
    """A log file for a serving process on a host without journald or syslog: root's own
    directory, opened without following links."""
    directory = state.run_dir() / "log"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{vmid}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1))
    handler.setFormatter(
        logging.Formatter("%(asctime)s snapfs[%(process)d] %(levelname)s: %(message)s")
    )
    handler.set_name(str(path))
    return handler


def setup_logging(
    args: argparse.Namespace, *, background: bool = False, vmid: str | None = None
) -> str:
    """Send the log where it can be read; return where that is ("journal", "syslog",
    "stderr", or a file's path: what ``snapfs status`` shows)."""
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
        old.close()
    root.setLevel(level)
    logfile = os.environ.get("SNAPFS_LOG_FILE")
    handler: logging.Handler
    where = "stderr"
    if logfile:
        handler = logging.FileHandler(logfile)
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
        )
        where = logfile
    elif background and os.path.exists(JOURNAL_SOCKET):
        handler = JournalHandler()
        where = "journal"
    elif background and os.path.exists("/dev/log"):
        # Only here: logging.handlers pulls in socket, pickle and queue.
        from logging.handlers import SysLogHandler

        handler = SysLogHandler(address="/dev/log", facility=SysLogHandler.LOG_DAEMON)
        handler.setFormatter(logging.Formatter("snapfs[%(process)d]: %(message)s"))
        where = "syslog"
    elif background and vmid is not None:
        handler = _fallback_log(vmid)
        where = handler.get_name() or "file"
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("snapfs: %(message)s"))
    root.addHandler(handler)
    if not args.verbose:
        # qemu.qmp logs every negotiation step at INFO; that is noise for users.
        logging.getLogger("qemu").setLevel(logging.WARNING)
    return where


def one_line(message: object) -> str:
    """A message as one line: what other libraries put on several (QEMU's raw bytes) is
    joined, so every error and warning is exactly one line of stderr."""
    return " ".join(str(message).split())


def fail(err: SnapfsError) -> NoReturn:
    log.debug("error", exc_info=err)
    print(f"snapfs: error: {one_line(err)}", file=sys.stderr)
    sys.exit(err.exit_code)


def _error(message: str) -> None:
    log.debug("error: %s", message)
    print(f"snapfs: error: {one_line(message)}", file=sys.stderr)


def _warn(message: str) -> None:
    """A warning the person at the terminal must see, whatever the log goes to."""
    log.debug("warning: %s", message)
    print(f"snapfs: warning: {one_line(message)}", file=sys.stderr)


# -- mount ----------------------------------------------------------------------------------------


class WarningCollector(logging.Handler):
    """Keeps the serving process's warnings of the set-up, for the terminal that asked for
    the mount: a failed guest freeze or a slower read path must reach the person, not only a
    log they may not read."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class _ReadyPipe:
    """Stands in for trio's task_status: tells the waiting parent, in one JSON line, that the
    tree is served (``{"ready": true, "warnings": [...]}``) or why not (``{"error": ...,
    "exit": N, "warnings": []}``). Said once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.collector = WarningCollector()
        logging.getLogger().addHandler(self.collector)

    def _say(self, message: dict[str, Any]) -> None:
        if self.fd < 0:
            return
        logging.getLogger().removeHandler(self.collector)
        # A failure is one line: what went wrong on the way to it is in the log.
        message["warnings"] = [] if "error" in message else self.collector.messages
        os.write(self.fd, json.dumps(message).encode() + b"\n")
        os.close(self.fd)
        self.fd = -1

    def started(self, value: Any = None) -> None:
        self._say({"ready": True})

    def failed(self, message: str, code: int) -> None:
        self._say({"error": message, "exit": code})


def freeze_config(args: argparse.Namespace) -> agent.FreezeConfig | None:
    """The guest freeze asked for: None with --freeze=off (--no-freeze)."""
    if args.no_freeze and args.freeze == "required":
        raise UsageError("--no-freeze and --freeze=required contradict each other")
    if args.no_freeze or args.freeze == "off":
        return None
    if args.freeze_timeout <= 0:
        raise UsageError("--freeze-timeout must be positive")
    sock = (
        paths.absolute(args.agent, "guest agent socket")
        if args.agent
        else agent.default_socket(args.vmid)
    )
    paths.exists(sock, "guest agent socket")  # a trusted path, if it exists (snapfs.paths)
    return agent.FreezeConfig(sock, timeout=args.freeze_timeout, required=args.freeze == "required")


def mount_options(args: argparse.Namespace, mountpoint: str | None) -> options.MountOptions:
    unknown = [o for opt in args.options for o in opt.split(",") if o != "allow_other"]
    if unknown:
        raise UsageError(f"unknown mount option {unknown[0]!r}")
    opts = options.validate(
        args.vmid,
        mountpoint,
        args.qmp,
        args.fleecing_dir,
        args.exclude,
        args.incremental,
        allow_other=any("allow_other" in o for o in args.options),
    )
    # Options the session takes once it knows them (MountOptions.freeze: the guest freeze).
    extras: dict[str, Any] = {
        "freeze": freeze_config(args),
        "tune": not args.no_tune,
        "fleecing_cluster": options.check_fleecing_cluster(args.fleecing_cluster),
    }
    known = {f.name for f in dataclasses.fields(opts)}
    wired = {k: v for k, v in extras.items() if k in known}
    return dataclasses.replace(opts, **wired) if wired else opts


def _serve_in_background(args: argparse.Namespace, opts: options.MountOptions) -> int:
    """Fork the serving process and wait until it serves the tree; the exit code of the mount."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the serving process
        os.close(r)
        os.setsid()
        # Not `snapfs run`'s relay: the session installs its own handlers while serving.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        opts = dataclasses.replace(
            opts, log_to=setup_logging(args, background=True, vmid=opts.vmid)
        )
        status = 0
        ready = _ReadyPipe(w)
        try:
            runner.run_trio(session.Session(opts).serve, task_status=ready)
        except SnapfsError as err:
            status = err.exit_code
            ready.failed(str(err), status)  # first: the error is not also a warning
            log.error("VM %s: %s", opts.vmid, err)
        except BaseException as err:
            status = 1
            ready.failed(f"internal error: {err!r}", 1)
            log.exception("VM %s: serving process failed", opts.vmid)
        os._exit(status)

    os.close(w)
    with os.fdopen(r, "rb") as f:
        line = f.readline()
    try:
        said: dict[str, Any] = json.loads(line)
    except ValueError:
        _, status = os.waitpid(pid, 0)
        _error(f"the serving process died during set-up (status {status})")
        return 1
    for warning in said.get("warnings", []):
        _warn(str(warning))
    if said.get("ready"):
        log.info("VM %s mounted at %s", opts.vmid, opts.mountpoint)
        return 0
    _error(str(said.get("error", "the set-up failed")))
    os.waitpid(pid, 0)
    code = said.get("exit")
    return code if isinstance(code, int) and code > 0 else 1


def _outcome(reply: Outcome) -> str:
    """What an unmount did, in the words that matter for the next backup."""
    if not reply.incremental:
        return "unmounted"
    if reply.committed:
        return "unmounted; committed: the next incremental starts from this snapshot"
    return "unmounted; not committed: the next incremental still contains these changes"


def _mount(args: argparse.Namespace) -> int:
    opts = mount_options(args, args.mountpoint)
    if args.foreground:
        setup_logging(args)
        sess = session.Session(opts)
        result = runner.run_trio(sess.serve)
        return 0 if result.get("ok") else int(result.get("exit", 1))
    return _serve_in_background(args, opts)


# -- run ------------------------------------------------------------------------------------------


class SignalRelay:
    """While installed: remembers the first SIGINT/SIGTERM/SIGHUP and passes each to the child.

    The handlers only record and forward, so a mount or an umount in progress is never
    interrupted half-way (the umount after COMMAND must complete: it restores the VM).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        child = self.child
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    def __enter__(self) -> SignalRelay:
        for s in RELAYED_SIGNALS:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def command_line(argv: Sequence[str], mountpoint: Path) -> list[str]:
    """COMMAND with every '{}' in it replaced by the mountpoint (also inside words: '{}/')."""
    return [a.replace("{}", str(mountpoint)) for a in argv]


# rsync options that write into the destination file itself: on an incremental view, rsync
# turns every block it cannot read (ENODATA) into zeros there, and the previous image is lost.
_RSYNC_IN_PLACE = ("--inplace", "--append", "--append-verify")


def in_place_rsync(argv: Sequence[str]) -> bool:
    """Whether COMMAND is rsync writing into existing files (see _RSYNC_IN_PLACE)."""
    return (
        bool(argv)
        and os.path.basename(argv[0]) == "rsync"
        and any(a in _RSYNC_IN_PLACE for a in argv[1:])
    )


def _run(args: argparse.Namespace) -> int:
    if not args.argv:
        raise UsageError("snapfs run needs a command: snapfs run VMID [options] -- COMMAND ...")
    opts = mount_options(args, args.mountpoint)
    argv = command_line(args.argv, opts.mountpoint)
    if opts.incremental is not None and in_place_rsync(argv):
        _warn(
            "rsync --inplace on an incremental view overwrites the previous image's "
            "unchanged regions with zeros (they cannot be read); use 'snapfs copy' or "
            "'snapfs-rsync-remote' for incremental views"
        )
    with SignalRelay() as relay:
        code = _serve_in_background(args, opts)
        if code != 0:
            return code
        status = 0
        if relay.signum is None:
            env = dict(os.environ, SNAPFS_MOUNT=str(opts.mountpoint), SNAPFS_VMID=opts.vmid)
            log.info("VM %s: running %s", opts.vmid, " ".join(argv))
            try:
                relay.child = subprocess.Popen(argv, env=env)
            except OSError as err:
                _error(f"cannot run {argv[0]}: {err.strerror or err}")
                status = 127 if isinstance(err, FileNotFoundError) else 126
            else:
                rc = relay.child.wait()
                status = 128 - rc if rc < 0 else rc
        if relay.signum is not None:
            log.warning(
                "VM %s: got %s: aborting the backup", opts.vmid, signal.Signals(relay.signum).name
            )
            if status == 0:
                status = 128 + relay.signum
        commit = status == 0
        if not commit and relay.signum is None:
            log.warning(
                "VM %s: %s exited with status %d: aborting the backup (the next "
                "incremental still contains everything)",
                opts.vmid,
                argv[0],
                status,
            )
        try:
            reply = control.umount(opts.vmid, commit=commit)
        except StateError as err:
            _error(f"{err}; nothing was committed")
            return status or err.exit_code
        except SnapfsError as err:
            _error(f"{err}")
            return status or err.exit_code
        log.info("VM %s: %s", opts.vmid, _outcome(reply))
        return status


# -- status ---------------------------------------------------------------------------------------


def _fleecing_usage(path: str) -> dict[str, Any]:
    try:
        st = os.stat(path)
    except OSError:
        return {"fleecing_path": path, "fleecing_bytes": None, "fleecing_apparent_bytes": None}
    return {
        "fleecing_path": path,
        "fleecing_bytes": st.st_blocks * 512,
        "fleecing_apparent_bytes": st.st_size,
    }


def session_status(vmid: str) -> dict[str, Any]:
    """One session's status: the serving process's facts (over its control socket, not QMP)
    and the fleecing images' allocated size (from the state file's paths)."""
    vmid, record = state.find_session(vmid)
    graph = record.graph
    graph_disks = {d["name"]: d for d in graph.get("disks", [])}
    out: dict[str, Any] = {"vmid": vmid, "pid": record.pid, "mountpoint": record.mountpoint}
    try:
        facts = control.status(vmid)
    except (StateError, OSError) as err:
        # The serving process is gone or hung: report what the state file knows.
        out.update(
            state="stale",
            error=str(err),
            snapshot_time=graph.get("snapshot_time"),
            incremental=graph.get("incremental"),
            broken=None,
            freeze=None,
        )
        out["disks"] = {
            name: {
                "size": d.get("size"),
                "bitmap_mode": d.get("bitmap", {}).get("mode"),
                "fleecing_cluster": d.get("cbw_cluster", DEFAULT_FLEECING_CLUSTER),
                **_fleecing_usage(d["fleecing_path"]),
            }
            for name, d in graph_disks.items()
        }
        return out
    out.update(
        state="active",
        error=None,
        mountpoint=facts.mountpoint,
        snapshot_time=facts.snapshot_time,
        incremental=facts.incremental,
        pause_ms=facts.pause_ms,
        broken=facts.broken,
        freeze=facts.freeze.to_dict() if facts.freeze else None,
        log=facts.log,
    )
    out["disks"] = {
        name: {
            "size": d.size,
            "bitmap_mode": d.bitmap.mode,
            "bitmap": d.bitmap.to_dict(),
            "dirty_bytes": d.dirty_bytes,
            "readable_bytes": d.readable_bytes,
            "bytes_read": d.bytes_read,
            "discarded_bytes": d.discarded_bytes,
            "fleecing_cluster": d.fleecing_cluster,
            **_fleecing_usage(graph_disks.get(name, {}).get("fleecing_path", "")),
        }
        for name, d in facts.disks.items()
    }
    return out


def _all_vmids() -> list[str]:
    root = state.run_dir() / ".state"
    return sorted(p.name for p in root.glob("*") if (p / "state.json").exists())


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _consistency(st: dict[str, Any]) -> str:
    """What a session's snapshot rests on: the guest freeze and the pause; and its log."""
    freeze = st.get("freeze")
    if isinstance(freeze, dict):
        fields = {f.name for f in dataclasses.fields(agent.FreezeResult)}
        text = agent.FreezeResult(**{k: v for k, v in freeze.items() if k in fields}).describe()
    else:
        text = "not attempted"
    pause = st.get("pause_ms")
    paused = f"paused {pause:.1f} ms" if isinstance(pause, int | float) else "was not running"
    return f"guest freeze: {text}; {paused}; log: {st.get('log') or '?'}"


def _status(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    vmids = [state.check_vmid(args.vmid)] if args.vmid else _all_vmids()
    sessions = [session_status(v) for v in vmids]
    if args.json:
        print(json.dumps(sessions, indent=2), file=out)
        return 0
    if not sessions:
        print("no active snapfs sessions", file=out)
    for st in sessions:
        head = (
            f"VM {st['vmid']}: {st['state']}, at {st['mountpoint']}, snapshot {st['snapshot_time']}"
        )
        if st["incremental"]:
            head += f", incremental {st['incremental']}"
        if st["broken"]:
            head += f", BROKEN: {st['broken']}"
        if st["error"]:
            head += f" ({st['error']})"
        print(head, file=out)
        if st["state"] == "active":
            print(f"  {_consistency(st)}", file=out)
        for name, d in st["disks"].items():
            line = f"  {name}: {_size(d['size'])}, bitmap {d['bitmap_mode']}"
            if st["state"] == "active":
                line += (
                    f", dirty {_size(d['dirty_bytes'])}, read {_size(d['bytes_read'])}, "
                    f"discarded {_size(d['discarded_bytes'])}"
                )
            line += f", fleecing {_size(d['fleecing_bytes'])}"
            if d["fleecing_cluster"] != DEFAULT_FLEECING_CLUSTER:
                line += f" ({_size(d['fleecing_cluster'])} clusters)"
            print(line, file=out)
    return 0


# -- main -----------------------------------------------------------------------------------------


def _points(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    info = points.describe(Path(args.dest).absolute())
    if args.json:
        print(json.dumps(info, indent=1), file=out)
        return 0
    rows = info["points"]
    if not rows:
        print(f"{info['dest']}: no restore points", file=out)
    else:
        print(f"{'POINT':<17} {'SNAPSHOT (UTC)':<20} {'KIND':<12} {'CHANGED':>10} {'ON DISK':>10}",
              file=out)  # fmt: skip
        for r in rows:
            kinds = {d["mode"] for d in r["disks"].values()}
            kind = kinds.pop() if len(kinds) == 1 else "mixed"
            when = r["snapshot_time"][:19].replace("T", " ")
            print(
                f"{r['id']:<17} {when:<20} {kind:<12} {_size(r['changed_bytes']):>10} "
                f"{_size(r['disk_usage']):>10}",
                file=out,
            )
    for pid in info["interrupted"]:
        print(
            f"interrupted: point {pid} was not completed (the next 'snapfs copy' removes it)",
            file=out,
        )
    return 0


def _restore(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    store = points.Store(Path(args.dest).absolute())
    progress = sys.stdout.isatty() and not args.quiet
    with store.locked(exclusive=False):
        point = store.find(args.at)
        if args.list:
            print(f"point {point.id}: snapshot {point.manifest.snapshot_time}", file=out)
            for name, d in point.manifest.disks.items():
                print(f"  {name}: {_size(d.size)} ({d.size} bytes), {d.mode}", file=out)
            for extra in sorted(point.path.iterdir()):
                if extra.suffix in (".conf", ".fw"):
                    print(f"  {extra.name}", file=out)
            return 0
        if args.to_dir:
            if args.disk or args.target:
                raise UsageError("--to-dir restores every disk: give no DISK TARGET")
            written = store.restore_vm(
                point, Path(args.to_dir).absolute(), args.format, progress=progress
            )
            log.info("restored point %s into %s (%d files)", point.id, args.to_dir, len(written))
            return 0
        if not (args.disk and args.target):
            raise UsageError("give DISK TARGET, --list or --to-dir DIR")
        fmt = store.restore_disk(
            point,
            args.disk,
            Path(args.target).absolute(),
            args.format,
            force=args.force,
            progress=progress,
        )
        log.info("restored %s of point %s to %s (%s)", args.disk, point.id, args.target, fmt)
    return 0


def _verify(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    store = points.Store(Path(args.dest).absolute())
    problems: list[str] = []
    with store.locked(exclusive=False):
        chosen = [store.find(args.at)] if args.at else store.points()
        if not chosen:
            raise UsageError(f"{args.dest} holds no restore points")
        for point in chosen:
            problems += store.verify(point, lambda line: print(line, file=out, flush=True))
    for line in problems:
        print(f"FAILED {line}", file=out)
    if problems:
        raise VerifyError(f"{len(problems)} problem(s) in {args.dest}: {problems[0]}")
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = parse_args(argv)
    setup_logging(args)
    if os.geteuid() != 0 and args.command in ("mount", "run", "umount", "cleanup"):
        fail(UsageError("snapfs must run as root (it mounts FUSE and talks to QEMU)"))
    try:
        if args.command == "mount":
            sys.exit(_mount(args))
        if args.command == "run":
            sys.exit(_run(args))
        if args.command == "umount":
            reply = control.umount(args.target, commit=args.commit)
            log.info("%s", _outcome(reply))
            sys.exit(0)
        if args.command == "cleanup":
            qmp = paths.absolute(args.qmp, "QMP socket") if args.qmp else None
            for line in runner.run_trio(state.cleanup, state.check_vmid(args.vmid), qmp):
                log.info("%s", line)
            sys.exit(0)
        if args.command == "copy":
            stream: TextIO = io.StringIO() if args.quiet else sys.stderr
            view = Path(args.view).absolute()
            dest = Path(args.dest).absolute()
            if args.keep is not None:
                stats = points.copy_points(
                    view,
                    dest,
                    provider.read_facts(view),
                    args.keep,
                    discard=args.discard,
                    progress_stream=stream,
                )
            else:
                stats = provider.copy_view(view, dest, discard=args.discard, progress_stream=stream)
            for name, st in stats.items():
                log.info(
                    "%s: read %d, wrote %d, zero %d, holes %d, discarded %d bytes",
                    name,
                    st["read"],
                    st["written"],
                    st["zero"],
                    st["holes"],
                    st["discarded"],
                )
            sys.exit(0)
        if args.command == "status":
            sys.exit(_status(args))
        if args.command == "points":
            sys.exit(_points(args))
        if args.command == "restore":
            sys.exit(_restore(args))
        if args.command == "verify":
            sys.exit(_verify(args))
    except SnapfsError as err:
        fail(err)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as err:  # a bug: still one line (the traceback is in the log with -v)
        log.debug("internal error", exc_info=err)
        print(f"snapfs: error: internal error: {one_line(repr(err))}", file=sys.stderr)
        sys.exit(1)
    sys.exit(2)
