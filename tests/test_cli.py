"""The CLI without QEMU: argument parsing of `run`, logging targets, the progress bar on and off
a terminal, the Proxmox config reader, and contrib/snapfs-rsync-remote on hand-made views."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import pty
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dev.devvm import file_sha256
from snapfs import cli, pve
from snapfs.records import BitmapFacts, DiskFacts, Facts

ROOT = Path(__file__).resolve().parents[1]
RSYNC_REMOTE = ROOT / "contrib" / "snapfs-rsync-remote"
MiB = 1 << 20


# -- arguments ------------------------------------------------------------------------------------


def test_run_takes_options_then_the_command_after_dashdash() -> None:
    args = cli.parse_args(
        [
            "run",
            "100",
            "--incremental",
            "nightly",
            "-v",
            "--",
            "rsync",
            "-a",
            "--sparse",
            "{}/",
            "/dest/",
            "--",
            "x",
        ]
    )
    assert (args.command, args.vmid, args.incremental, args.verbose) == (
        "run",
        "100",
        "nightly",
        True,
    )
    assert args.argv == ["rsync", "-a", "--sparse", "{}/", "/dest/", "--", "x"]
    assert cli.command_line(args.argv, Path("/run/snapfs/100")) == [
        "rsync",
        "-a",
        "--sparse",
        "/run/snapfs/100/",
        "/dest/",
        "--",
        "x",
    ]
    assert cli.parse_args(["-q", "run", "7", "--", "true"]).quiet is True
    assert cli.parse_args(["run", "7", "--", "true"]).quiet is False
    assert cli.parse_args(["umount", "7", "--commit"]).commit is True


def test_freeze_options() -> None:
    args = cli.parse_args(["run", "100", "--", "true"])
    cfg = cli.freeze_config(args)
    assert cfg is not None
    assert (str(cfg.socket), cfg.timeout) == ("/var/run/qemu-server/100.qga", 10.0)
    args = cli.parse_args(
        ["run", "100", "--agent", "/x.qga", "--freeze-timeout", "2.5", "--", "true"]
    )
    cfg = cli.freeze_config(args)
    assert cfg is not None
    assert (str(cfg.socket), cfg.timeout) == ("/x.qga", 2.5)
    assert cli.freeze_config(cli.parse_args(["mount", "100", "--no-freeze"])) is None


# -- logging --------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers[:]:
        root.removeHandler(h)
        if h not in handlers:
            h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def verbosity(verbose: bool = False, quiet: bool = False) -> argparse.Namespace:
    return argparse.Namespace(verbose=verbose, quiet=quiet)


def test_background_logs_go_to_the_journal_with_fields(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    path = str(tmp_path / "journal.sock")
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(path)
    journal.settimeout(5)
    monkeypatch.delenv("SNAPFS_LOG_FILE", raising=False)
    monkeypatch.setattr(cli, "JOURNAL_SOCKET", path)
    monkeypatch.setattr(cli.JournalHandler.__init__, "__defaults__", (path, "snapfs"))
    cli.setup_logging(verbosity(), background=True)
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, cli.JournalHandler)
    logging.getLogger("snapfs.test").warning("two\nlines")
    data = journal.recv(65536)
    journal.close()
    assert b"PRIORITY=4\n" in data
    assert b"SYSLOG_IDENTIFIER=snapfs\n" in data
    assert b"LOGGER=snapfs.test\n" in data
    msg = b"two\nlines"
    assert b"MESSAGE\n" + len(msg).to_bytes(8, "little") + msg + b"\n" in data


def test_foreground_logs_go_to_stderr_and_levels_follow_the_flags(
    monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    monkeypatch.delenv("SNAPFS_LOG_FILE", raising=False)
    cli.setup_logging(verbosity(), background=False)
    (handler,) = logging.getLogger().handlers
    assert isinstance(handler, logging.StreamHandler)
    assert handler.stream is sys.stderr
    assert logging.getLogger().level == logging.INFO
    cli.setup_logging(verbosity(quiet=True))
    assert logging.getLogger().level == logging.ERROR
    cli.setup_logging(verbosity(verbose=True))
    assert logging.getLogger().level == logging.DEBUG


# -- progress -------------------------------------------------------------------------------------


def fake_view(
    path: Path,
    disks: dict[str, bytes],
    regions: dict[str, list[tuple[int, int]]],
    mode: str = "none",
    incremental: str | None = None,
) -> Path:
    """A directory laid out like a view (plain files; enough for the providers)."""
    path.mkdir(exist_ok=True)
    disk_facts: dict[str, DiskFacts] = {}
    for name, data in disks.items():
        readable = regions.get(name, [(0, len(data))])
        (path / f"{name}.raw").write_bytes(data)
        (path / f"{name}.dirty").write_text("".join(f"{o} {n}\n" for o, n in readable))
        disk_facts[name] = DiskFacts(
            size=len(data),
            format="raw",
            nodes={},
            bitmap=BitmapFacts(mode=mode),  # type: ignore[arg-type]
            dirty_bytes=sum(n for _, n in readable),
            dirty_regions=len(readable),
            readable_bytes=sum(n for _, n in readable),
            discarded_bytes=0,
            bytes_read=0,
            fleecing_bytes=0,
        )
    facts = Facts(
        vmid="100",
        snapshot_time="2026-01-01T00:00:00.000+00:00",
        qemu_version="10.0.13",
        pause_ms=None,
        incremental=incremental,
        mountpoint=str(path),
        broken=None,
        freeze=None,
        disks=disk_facts,
    )
    (path / "snapfs.json").write_text(facts.to_json(indent=2))
    return path


def test_copy_shows_progress_only_on_a_terminal(tmp_path: Path) -> None:
    view = fake_view(tmp_path / "view", {"scsi0": random.randbytes(4 * MiB)}, {})
    cmd = [sys.executable, "-m", "snapfs", "copy", str(view), str(tmp_path / "a")]
    quiet = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        check=True,
        env={k: v for k, v in os.environ.items() if k != "SNAPFS_LOG_FILE"},
    )
    assert "%" not in quiet.stderr
    assert "scsi0: read" in quiet.stderr  # the summary is logged, not a progress bar
    primary, secondary = pty.openpty()
    try:
        subprocess.run(
            [*cmd[:-1], str(tmp_path / "b")],
            stderr=secondary,
            stdout=subprocess.DEVNULL,
            check=True,
        )
        os.close(secondary)
        shown = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(primary)
    assert b"100.0% 4 of 4 MiB" in shown
    assert file_sha256(tmp_path / "b/scsi0.raw") == file_sha256(view / "scsi0.raw")


# -- Proxmox config -------------------------------------------------------------------------------


def test_guest_files_reads_conf_and_firewall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "qemu-server").mkdir()
    (tmp_path / "firewall").mkdir()
    (tmp_path / "qemu-server/100.conf").write_bytes(b"scsi0: local:vm-100-disk-0,size=8G\n")
    (tmp_path / "firewall/100.fw").write_bytes(b"[OPTIONS]\nenable: 1\n")
    (tmp_path / "qemu-server/101.conf").write_bytes(b"memory: 512\n")
    (tmp_path / "qemu-server/102.conf").write_bytes(b"x" * (pve.MAX_SIZE + 1))
    assert pve.guest_files("100", tmp_path) == {
        "qemu-server.conf": b"scsi0: local:vm-100-disk-0,size=8G\n",
        "qemu-server.fw": b"[OPTIONS]\nenable: 1\n",
    }
    assert pve.guest_files("101", tmp_path) == {"qemu-server.conf": b"memory: 512\n"}
    assert pve.guest_files("102", tmp_path) == {}
    assert pve.guest_files("103", tmp_path) == {}
    assert pve.guest_files("100", tmp_path / "missing") == {}
    monkeypatch.setenv("SNAPFS_PVE_DIR", str(tmp_path))
    assert set(pve.guest_files("100")) == {"qemu-server.conf", "qemu-server.fw"}


# -- contrib/snapfs-rsync-remote ------------------------------------------------------------------


def provider(view: Path, dest: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(RSYNC_REMOTE), str(view), dest],
        capture_output=True,
        text=True,
        env=dict(os.environ, **env),
    )


@pytest.mark.parametrize("remote", [False, True], ids=["local", "stand-in-ssh"])
def test_rsync_remote_full_then_incremental(tmp_path: Path, remote: bool) -> None:
    dest = tmp_path / "dest"
    env: dict[str, str] = {}
    target = str(dest)
    if remote:
        # A stand-in for ssh that runs the remote command here: no host is contacted.
        rsh = tmp_path / "fake-ssh"
        rsh.write_text(
            "#!/bin/sh\n"
            'while [ "${1#-}" != "$1" ]; do [ "$1" = -l ] && shift; shift; done\n'
            'shift\nexec sh -c "$*"\n'
        )
        rsh.chmod(0o755)
        env["SNAPFS_RSH"] = str(rsh)
        target = f"backup@stand-in-host:{dest}"
    disk = bytearray(random.randbytes(3 * MiB))
    full = fake_view(tmp_path / "full", {"scsi0": bytes(disk)}, {})
    (full / "qemu-server.conf").write_text("memory: 512\n")
    proc = provider(full, target, **env)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "scsi0.raw").read_bytes() == disk
    assert (dest / "qemu-server.conf").read_text() == "memory: 512\n"

    # Incremental: only two regions readable; the rest of the view file is garbage that must
    # never reach the backup (a real view would fail reads there with ENODATA).
    changes = [(65536, 4096), (2 * MiB, MiB)]
    for off, n in changes:
        disk[off : off + n] = random.randbytes(n)
    garbage = bytearray(b"\xee" * len(disk))
    for off, n in changes:
        garbage[off : off + n] = disk[off : off + n]
    inc = fake_view(
        tmp_path / "inc",
        {"scsi0": bytes(garbage)},
        {"scsi0": changes},
        mode="reuse",
        incremental="nightly",
    )
    proc = provider(inc, target, **env)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "scsi0.raw").read_bytes() == disk
    assert (dest / "scsi0.dirty").read_text() == "65536 4096\n2097152 1048576\n"
    assert not (dest / "scsi0.raw.incomplete").exists()


def test_rsync_remote_refuses_an_incremental_without_a_full_image(tmp_path: Path) -> None:
    inc = fake_view(tmp_path / "inc", {"scsi0": bytes(MiB)}, {"scsi0": [(0, 4096)]}, mode="reuse")
    proc = provider(inc, str(tmp_path / "dest"))
    assert proc.returncode == 1
    assert "no full image" in proc.stderr
    assert not (tmp_path / "dest/scsi0.raw").exists()


def test_rsync_remote_marks_an_interrupted_update_incomplete(tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    full = fake_view(tmp_path / "full", {"scsi0": bytes(MiB)}, {})
    assert provider(full, str(dest)).returncode == 0
    # A region past the end of the view's file: the data stream comes up short.
    inc = fake_view(
        tmp_path / "inc",
        {"scsi0": bytes(MiB)},
        {"scsi0": [(0, 4096), (2 * MiB, 4096)]},
        mode="reuse",
    )
    proc = provider(inc, str(dest))
    assert proc.returncode != 0
    assert (dest / "scsi0.raw.incomplete").exists()


def test_rsync_remote_usage(tmp_path: Path) -> None:
    proc = provider(tmp_path, str(tmp_path / "d"))
    assert proc.returncode == 2
    assert "not a snapfs view" in proc.stderr


def test_a_helper_whose_parent_is_already_gone_dies_at_once() -> None:
    """libc.die_with_parent in a child: when the pid that forked it is no longer its parent (it
    died before the prctl, so the death signal will never come), the child takes the signal
    itself; with its parent alive it goes on. The parent catches SIGTERM in Python, as snapfs
    does (it relays it): the child inherits that handler until exec and must still die."""
    from snapfs import libc

    caught: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda signum, _frame: caught.append(signum))
    try:
        for parent, status in [(os.getpid(), 0), (1, -signal.SIGTERM)]:
            proc = subprocess.run(
                [sys.executable, "-c", "pass"],
                preexec_fn=functools.partial(libc.die_with_parent, signal.SIGTERM, parent),
                check=False,
                timeout=60,
            )
            assert proc.returncode == status
    finally:
        signal.signal(signal.SIGTERM, old)
    assert caught == []  # the signal went to the child only
