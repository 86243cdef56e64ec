"""snapfs.agent against tests/fake_guest_agent.py, a STAND-IN guest agent process (no guest OS
can run here): the protocol, the freeze/thaw order around the snapshot point, and every way an
agent can fail without leaving a guest frozen."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import trio

from dev.devvm import TestVM, poll
from snapfs.agent import FreezeConfig, FreezeResult, frozen
from tests.conftest import Snapfs, vmid

FAKE = Path(__file__).with_name("fake_guest_agent.py")

StartAgent = Callable[..., tuple[FreezeConfig, Path]]


@pytest.fixture
def fake_agent(tmp_path: Path) -> Iterator[StartAgent]:
    """Start the stand-in agent in a mode; returns (config, record file)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(
        mode: str = "normal", delay: float = 1.0, **timeouts: Any
    ) -> tuple[FreezeConfig, Path]:
        sock = tmp_path / f"agent-{len(procs)}.qga"
        record = tmp_path / f"agent-{len(procs)}.jsonl"
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(FAKE),
                    str(sock),
                    str(record),
                    "--mode",
                    mode,
                    "--delay",
                    str(delay),
                ]
            )
        )
        poll(sock.exists, 10, "the stand-in agent's socket")
        return FreezeConfig(sock, **timeouts), record

    try:
        yield start
    finally:
        for p in procs:
            p.kill()
            p.wait()


def calls(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text().splitlines()]


def cmds(record: Path) -> list[str]:
    return [c["cmd"] for c in calls(record)]


def freeze_around(
    cfg: FreezeConfig | None, body: Callable[[], None] = lambda: None, **kw: Any
) -> tuple[FreezeResult, float]:
    """Run ``frozen()`` around a stand-in snapshot point; return the result and that instant."""
    when = 0.0

    async def main() -> FreezeResult:
        nonlocal when
        async with frozen(cfg, vmid="100", **kw) as result:
            when = time.time()
            body()
        return result

    return trio.run(main), when


def test_freeze_then_thaw_around_the_snapshot_point(fake_agent: StartAgent) -> None:
    cfg, record = fake_agent()
    seen_inside: list[str] = []
    result, snap = freeze_around(cfg, lambda: seen_inside.extend(cmds(record)))
    assert seen_inside == ["guest-sync-delimited", "guest-fsfreeze-status", "guest-fsfreeze-freeze"]
    log = calls(record)
    assert [c["cmd"] for c in log] == [*seen_inside, "guest-fsfreeze-thaw"]
    freeze, thaw = log[2], log[3]
    assert freeze["state"] == "frozen"
    assert freeze["t"] <= snap <= thaw["t"]
    assert thaw["state"] == "thawed"
    assert result.state == "frozen"
    assert result.filesystems == 2
    assert result.thaw == "ok"
    assert result.frozen_ms is not None
    assert result.facts()["state"] == "frozen"


def test_an_agent_that_never_answers_gives_a_warning_within_the_timeout(
    fake_agent: StartAgent, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, record = fake_agent("silent", sync_timeout=0.5)
    caplog.set_level(logging.INFO, logger="snapfs.agent")
    start = time.monotonic()
    result, _ = freeze_around(cfg)
    assert time.monotonic() - start < 2.0
    assert result.state == "failed"
    assert result.reason is not None
    assert "guest-sync" in result.reason
    assert "qemu-guest-agent running" in result.reason
    assert any(
        r.levelno == logging.WARNING and "crash-consistent" in r.getMessage()
        for r in caplog.records
    )
    # Nothing but the sync was sent: a late agent cannot freeze the guest.
    poll(lambda: cmds(record) == ["guest-sync-delimited"], 5, "the sync to be recorded")


def test_a_freeze_without_answer_is_still_thawed(fake_agent: StartAgent) -> None:
    cfg, record = fake_agent("slow-freeze", delay=1.0, timeout=0.2)
    start = time.monotonic()
    result, _ = freeze_around(cfg)
    assert result.state == "failed"
    assert result.reason is not None
    assert "no answer to guest-fsfreeze-freeze within 0.2s" in result.reason
    assert result.thaw == "ok"
    log = calls(record)
    assert [c["cmd"] for c in log][-2:] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    assert log[-1]["state"] == "thawed"
    assert time.monotonic() - start < 5


def test_a_failed_freeze_is_thawed_and_warned_about(
    fake_agent: StartAgent, caplog: pytest.LogCaptureFixture
) -> None:
    cfg, record = fake_agent("error-freeze")
    result, _ = freeze_around(cfg)
    assert result.state == "failed"
    assert result.reason is not None
    assert "EIO" in result.reason
    assert cmds(record)[-1] == "guest-fsfreeze-thaw"
    assert "crash-consistent" in caplog.text


def test_a_guest_frozen_by_someone_else_is_left_alone(fake_agent: StartAgent) -> None:
    cfg, record = fake_agent("frozen")
    result, _ = freeze_around(cfg)
    assert result.state == "skipped"
    assert result.already_frozen
    assert result.consistent
    assert result.reason is not None
    assert "already frozen" in result.reason
    assert cmds(record) == ["guest-sync-delimited", "guest-fsfreeze-status"]
    assert result.thaw is None


def test_cancellation_inside_the_block_still_thaws(fake_agent: StartAgent) -> None:
    cfg, record = fake_agent()

    async def main() -> None:
        with trio.CancelScope() as cs:
            async with frozen(cfg):
                cs.cancel()
                await trio.sleep_forever()

    trio.run(main)
    assert cmds(record)[-1] == "guest-fsfreeze-thaw"
    assert calls(record)[-1]["state"] == "thawed"


def test_no_socket_and_no_freeze_skip_quietly(tmp_path: Path) -> None:
    result, _ = freeze_around(FreezeConfig(tmp_path / "missing.qga"))
    assert result.state == "skipped"
    assert result.reason is not None
    assert "no guest agent socket" in result.reason
    result, _ = freeze_around(None)
    assert (result.state, result.reason) == ("skipped", "disabled (--no-freeze)")
    result, _ = freeze_around(FreezeConfig(tmp_path / "x"), skip="the VM is not running")
    assert (result.state, result.reason) == ("skipped", "the VM is not running")


def test_consecutive_sessions_reuse_the_agent(fake_agent: StartAgent) -> None:
    cfg, record = fake_agent()
    for _ in range(3):
        result, _ = freeze_around(cfg)
        assert result.state == "frozen"
    assert cmds(record).count("guest-fsfreeze-thaw") == 3


# -- wired into the session: real QEMU, real mount, the stand-in agent ----------------------------


@pytest.mark.qemu
@pytest.mark.mount
def test_mount_freezes_around_the_snapshot_point(
    vm: TestVM, snapfs: Snapfs, fake_agent: StartAgent, tmp_path: Path
) -> None:
    vm.qmp("cont")  # a running guest (firmware only): a paused one cannot answer an agent
    cfg, record = fake_agent()
    pve_dir = tmp_path / "pve"
    (pve_dir / "qemu-server").mkdir(parents=True)
    conf = b"name: test\nscsi0: local:vm-disk-0\n"
    (pve_dir / "qemu-server" / f"{vmid(vm)}.conf").write_bytes(conf)
    snapfs.env["SNAPFS_PVE_DIR"] = str(pve_dir)
    with snapfs.mounted(vm, tmp_path / "mnt", "--agent", str(cfg.socket)) as mnt:
        facts = json.loads((mnt / "snapfs.json").read_text())
        assert (mnt / "qemu-server.conf").read_bytes() == conf
        assert not (mnt / "qemu-server.fw").exists()
    log = calls(record)
    assert [c["cmd"] for c in log] == [
        "guest-sync-delimited",
        "guest-fsfreeze-status",
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-thaw",
    ]
    snap = datetime.fromisoformat(facts["snapshot_time"]).timestamp()
    # snapshot_time is truncated to milliseconds.
    assert log[2]["t"] <= snap + 0.001 <= log[3]["t"] + 0.001
    assert facts["freeze"]["state"] == "frozen"
    assert facts["freeze"]["thaw"] == "ok"
    assert log[-1]["state"] == "thawed"


@pytest.mark.qemu
@pytest.mark.mount
def test_mount_with_an_agent_that_never_answers(
    vm: TestVM, snapfs: Snapfs, fake_agent: StartAgent, tmp_path: Path
) -> None:
    """The mount succeeds with a crash-consistent snapshot, and says so on the terminal."""
    vm.qmp("cont")
    cfg, record = fake_agent("silent")
    mnt = tmp_path / "mnt"
    start = time.monotonic()
    proc = snapfs.mount_proc(vm, mnt, "--agent", str(cfg.socket))
    took = time.monotonic() - start
    try:
        facts = json.loads((mnt / "snapfs.json").read_text())
    finally:
        snapfs("umount", str(mnt))
    assert took < cfg.sync_timeout + 5
    assert facts["freeze"]["state"] == "failed"
    (warning,) = [line for line in proc.stderr.splitlines() if line.startswith("snapfs: warn")]
    assert "guest agent" in warning
    assert "no answer to guest-sync" in warning
    assert "crash-consistent" in warning
    assert "guest-fsfreeze-freeze" not in cmds(record)


@pytest.mark.qemu
@pytest.mark.mount
def test_freeze_required_takes_no_unfrozen_snapshot(
    vm: TestVM, snapfs: Snapfs, fake_agent: StartAgent, tmp_path: Path
) -> None:
    """--freeze=required: an agent that does not freeze fails the mount (nothing changed in
    the VM); one that does, or a guest frozen by someone else, gives a view."""
    vm.qmp("cont")
    graph = vm.graph()
    mnt = tmp_path / "mnt"
    for mode in ("silent", "error-freeze"):
        cfg, record = fake_agent(mode)
        proc = snapfs.mount_proc(
            vm, mnt, "--agent", str(cfg.socket), "--freeze=required", check=False
        )
        assert proc.returncode == 5, proc.stderr
        assert "--freeze=required: no snapshot was taken" in proc.stderr
        assert len(proc.stderr.splitlines()) == 1, proc.stderr  # the error alone
        assert vm.graph() == graph
        assert not (snapfs.run_dir / ".state" / vmid(vm)).exists()
        if mode == "error-freeze":
            assert cmds(record)[-1] == "guest-fsfreeze-thaw"
    for mode in ("normal", "frozen"):
        cfg, _ = fake_agent(mode)
        with snapfs.mounted(vm, mnt, "--agent", str(cfg.socket), "--freeze=required"):
            facts = json.loads((mnt / "snapfs.json").read_text())
        assert facts["freeze"]["state"] == ("frozen" if mode == "normal" else "skipped")
    # No agent at all (and a paused VM) are refused as well.
    proc = snapfs.mount_proc(
        vm, mnt, "--agent", str(tmp_path / "none.sock"), "--freeze=required", check=False
    )
    assert proc.returncode == 5
    assert "no guest agent socket" in proc.stderr
    assert vm.graph() == graph


@pytest.mark.qemu
@pytest.mark.mount
def test_status_tells_the_freeze_the_pause_and_where_the_log_is(
    vm: TestVM, snapfs: Snapfs, fake_agent: StartAgent, tmp_path: Path
) -> None:
    """Without SNAPFS_LOG_FILE the serving process logs to the journal, to syslog, or (on a
    host with neither) to a file of its own; `snapfs status` names it."""
    vm.qmp("cont")
    cfg, _ = fake_agent("silent")
    del snapfs.env["SNAPFS_LOG_FILE"]
    mnt = tmp_path / "mnt"
    snapfs.mount(vm, mnt, "--agent", str(cfg.socket))
    try:
        text = snapfs("status", vmid(vm)).stdout
        (info,) = json.loads(snapfs("status", vmid(vm), "--json").stdout)
    finally:
        snapfs("umount", str(mnt))
    assert "guest freeze: failed: " in text
    assert "no answer to guest-sync" in text
    assert "; paused " in text
    where = info["log"]
    assert f"log: {where}" in text
    if os.path.exists("/run/systemd/journal/socket"):
        assert where == "journal"
    elif os.path.exists("/dev/log"):
        assert where == "syslog"
    else:
        assert where == str(snapfs.run_dir / "log" / f"{vmid(vm)}.log")
        assert "no answer to guest-sync" in Path(where).read_text()


@pytest.mark.qemu
@pytest.mark.mount
def test_a_paused_vm_is_not_frozen_and_no_freeze_skips(
    vm: TestVM, snapfs: Snapfs, fake_agent: StartAgent, tmp_path: Path
) -> None:
    cfg, record = fake_agent()
    with snapfs.mounted(vm, tmp_path / "m1", "--agent", str(cfg.socket)) as mnt:
        facts = json.loads((mnt / "snapfs.json").read_text())
    assert facts["freeze"]["reason"] == "the VM is not running"
    vm.qmp("cont")
    with snapfs.mounted(vm, tmp_path / "m2", "--agent", str(cfg.socket), "--no-freeze") as mnt:
        facts = json.loads((mnt / "snapfs.json").read_text())
    assert facts["freeze"]["state"] == "skipped"
    assert cmds(record) == []
