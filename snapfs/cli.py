"""The ``snapfs`` command: parses arguments, sets up logging, reports errors.

Only this module prints and exits. ``snapfs mount`` forks the serving process before any event
loop starts and waits on a pipe until the tree is served (or set-up failed), so it returns only
once the view is ready, with the set-up's own error message and exit code if not.
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.handlers
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from snapfs import __version__, provider, session
from snapfs.errors import SnapfsError, UsageError

log = logging.getLogger("snapfs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="snapfs",
        description="Consistent point-in-time views of a running QEMU VM's disks, as files.")
    p.add_argument("--version", action="version", version=f"snapfs {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debugging details")
    p.add_argument("-q", "--quiet", action="store_true", help="log only errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="mount a point-in-time view of a VM's disks")
    m.add_argument("vmid", help="the VM's ID (Proxmox) or name")
    m.add_argument("mountpoint", nargs="?",
                   help="an existing empty directory (default: /run/snapfs/VMID)")
    m.add_argument("--qmp", metavar="SOCKET",
                   help="the VM's QMP socket (default: /var/run/qemu-server/VMID.qmp)")
    m.add_argument("--fleecing-dir", metavar="DIR",
                   help="where fleecing images go (default: /var/lib/snapfs/VMID)")
    m.add_argument("--exclude", metavar="DISK", action="append", default=[],
                   help="leave out this disk (repeatable)")
    m.add_argument("--incremental", metavar="ID",
                   help="incremental backup: only regions changed since the last committed "
                        "backup with this ID are readable")
    m.add_argument("-o", dest="options", metavar="OPT", action="append", default=[],
                   help="mount option; only allow_other is known")
    m.add_argument("-f", "--foreground", action="store_true",
                   help="stay attached and log to stderr (debugging, systemd)")

    u = sub.add_parser("umount", help="unmount and tear down a view")
    u.add_argument("target", help="VMID or mountpoint")
    u.add_argument("--commit", action="store_true",
                   help="the backup succeeded: the next incremental starts from this snapshot")

    c = sub.add_parser("cleanup", help="remove what a crashed session left behind")
    c.add_argument("vmid")
    c.add_argument("--qmp", metavar="SOCKET", help="the VM's QMP socket")

    cp = sub.add_parser("copy", help="back up a mounted view into a directory (the reference "
                        "provider): full views make sparse images, incremental views update "
                        "them in place")
    cp.add_argument("view", help="a mounted snapfs view")
    cp.add_argument("dest", help="the backup directory")
    cp.add_argument("--discard", action="store_true",
                    help="punch each copied range in the view, freeing fleecing space")

    s = sub.add_parser("status", help="show active sessions")
    s.add_argument("vmid", nargs="?")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def setup_logging(args: argparse.Namespace, *, background: bool = False) -> None:
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.INFO
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    logfile = os.environ.get("SNAPFS_LOG_FILE")
    handler: logging.Handler
    if logfile:
        handler = logging.FileHandler(logfile)
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s: %(message)s"))
    elif background and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("snapfs[%(process)d]: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("snapfs: %(message)s"))
    root.addHandler(handler)
    if args.verbose:
        return
    # qemu.qmp logs every negotiation step at INFO; that is noise for users.
    logging.getLogger("qemu").setLevel(logging.WARNING)


def fail(err: SnapfsError) -> NoReturn:
    log.debug("error", exc_info=err)
    print(f"snapfs: error: {err}", file=sys.stderr)
    sys.exit(err.exit_code)


class _ReadyPipe:
    """Stands in for trio's task_status: tells the waiting parent the tree is served."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def started(self, value: Any = None) -> None:
        os.write(self.fd, b"ok\n")
        os.close(self.fd)
        self.fd = -1


def _mount(args: argparse.Namespace) -> int:
    unknown = [o for opt in args.options for o in opt.split(",") if o != "allow_other"]
    if unknown:
        raise UsageError(f"unknown mount option {unknown[0]!r}")
    opts = session.validate(args.vmid, args.mountpoint, args.qmp, args.fleecing_dir,
                            args.exclude, args.incremental,
                            allow_other=any("allow_other" in o for o in args.options))
    if args.foreground:
        setup_logging(args)
        sess = session.Session(opts)
        result = session.run_trio(sess.serve)
        return 0 if result.get("ok") else int(result.get("exit", 1))

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the serving process
        os.close(r)
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        setup_logging(args, background=True)
        status = 0
        ready = _ReadyPipe(w)
        try:
            session.run_trio(session.Session(opts).serve, task_status=ready)
        except SnapfsError as err:
            log.error("VM %s: %s", opts.vmid, err)
            status = err.exit_code
            if ready.fd >= 0:
                os.write(w, f"err {status} {err}\n".encode())
        except BaseException as err:
            log.exception("VM %s: serving process failed", opts.vmid)
            status = 1
            if ready.fd >= 0:
                os.write(w, f"err 1 internal error: {err!r}\n".encode())
        os._exit(status)

    os.close(w)
    with os.fdopen(r, "rb") as f:
        line = f.readline().decode(errors="replace").rstrip("\n")
    if line == "ok":
        log.info("VM %s mounted at %s", opts.vmid, opts.mountpoint)
        return 0
    if line.startswith("err "):
        _, code, msg = line.split(" ", 2)
        print(f"snapfs: error: {msg}", file=sys.stderr)
        os.waitpid(pid, 0)
        return int(code) if code.isdigit() else 1
    _, status = os.waitpid(pid, 0)
    print(f"snapfs: error: the serving process died during set-up (status {status})",
          file=sys.stderr)
    return 1


def _status(args: argparse.Namespace) -> int:
    root = session.run_dir() / ".state"
    vmids = [args.vmid] if args.vmid else sorted(p.name for p in root.glob("*")
                                                  if (p / "state.json").exists())
    out: list[dict[str, Any]] = []
    for vmid in vmids:
        reply = session.request(session.check_vmid(vmid), {"op": "status"}, timeout=10)
        out.append(reply["status"])
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for st in out:
        print(f"VM {st['vmid']} at {st['mountpoint']}, snapshot {st['snapshot_time']}"
              + (f", BROKEN: {st['broken']}" if st["broken"] else ""))
        for name, d in st["disks"].items():
            print(f"  {name}: {d['size']} bytes, bitmap {d['bitmap']['mode']}, dirty "
                  f"{d['dirty_bytes']}, read {d['bytes_read']}, discarded {d['discarded_bytes']}")
    return 0


def main(argv: Sequence[str] | None = None) -> NoReturn:
    args = build_parser().parse_args(argv)
    setup_logging(args)
    if os.geteuid() != 0 and args.command in ("mount", "umount", "cleanup"):
        fail(UsageError("snapfs must run as root (it mounts FUSE and talks to QEMU)"))
    try:
        if args.command == "mount":
            sys.exit(_mount(args))
        if args.command == "umount":
            reply = session.umount(args.target, commit=args.commit)
            log.info("unmounted (%s)", "committed" if reply.get("committed") else "aborted")
            sys.exit(0)
        if args.command == "cleanup":
            for line in session.run_trio(session.cleanup, session.check_vmid(args.vmid),
                                         Path(args.qmp) if args.qmp else None):
                log.info("%s", line)
            sys.exit(0)
        if args.command == "copy":
            stats = provider.copy_view(Path(args.view), Path(args.dest), discard=args.discard)
            for name, st in stats.items():
                log.info("%s: read %d, wrote %d, zero %d, holes %d, discarded %d bytes", name,
                         st["read"], st["written"], st["zero"], st["holes"], st["discarded"])
            sys.exit(0)
        if args.command == "status":
            sys.exit(_status(args))
    except SnapfsError as err:
        fail(err)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(2)
