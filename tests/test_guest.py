"""The guest freeze against the REAL thing: a Linux guest (Debian 12's cloud kernel) running
Debian's qemu-guest-agent, with a shell loop (the stand-in "application") writing to an ext4
disk all the time; snapfs mounts it with ``--agent`` on the guest's virtio-serial channel.

The guest is built once and cached (``dev.devguest``); building it needs Debian's archive.
The stand-in agent (tests/fake_guest_agent.py) still serves the fault cases in test_agent.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dev.devguest import GuestBuildError, GuestImage, GuestVM, build_guest
from dev.devvm import file_sha256
from tests.conftest import Snapfs, vmid

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

StartGuest = Callable[..., GuestVM]


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """Built once per session (cached across sessions). No network is a failure, not a skip:
    these tests are the only ones that run the real agent."""
    try:
        return build_guest()
    except GuestBuildError as err:
        failure = str(err)
    pytest.fail(f"cannot build the test guest: {failure}", pytrace=False)  # outside: no chain


@pytest.fixture
def start_guest(tmp_path: Path, guest_image: GuestImage) -> Iterator[StartGuest]:
    """Boots the guest (``agent=False``: without qemu-ga) and waits until it writes and its
    agent answers; every guest started is stopped after the test, whatever happened."""
    vms: list[GuestVM] = []

    def start(*, agent: bool = True, iothread: bool = False) -> GuestVM:
        vm = GuestVM(tmp_path, guest_image, agent=agent, iothread=iothread)
        vms.append(vm)
        vm.start()
        vm.wait_ready()
        return vm

    try:
        yield start
    finally:
        for vm in vms:
            vm.stop()


def mount_args(vm: GuestVM, mnt: Path) -> list[str]:
    return [
        "mount",
        vmid(vm),
        str(mnt),
        "--qmp",
        str(vm.qmp_path),
        "--fleecing-dir",
        str(vm.workdir / "fleecing"),
        "--agent",
        str(vm.agent_path),
    ]


def copy_disk(mnt: Path, out: Path) -> Path:
    subprocess.run(["cp", str(mnt / "virtio0.raw"), str(out)], check=True)
    return out


def ext4_features(image: Path) -> list[str]:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Filesystem features:"):
            return line.split(":", 1)[1].split()
    raise AssertionError(f"dumpe2fs -h {image}: no features line:\n{out}")


def assert_frozen_image(image: Path) -> None:
    """A copy of a frozen ext4: FIFREEZE flushed the journal and cleared ``needs_recovery``
    (a copy of a merely mounted one has it set, and without the replay shows an older state),
    and ``e2fsck -fn`` (a full check that changes nothing) finds nothing at all to fix."""
    assert "needs_recovery" not in ext4_features(image), "the journal was not flushed"
    proc = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
    report = f"e2fsck -fn {image}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
    assert proc.returncode == 0, report
    assert "Fix?" not in proc.stdout, report
    assert "journal" not in proc.stdout, report


def assert_writer_files_complete(image: Path, out: Path) -> int:
    """Every f<slot>.<sha256> the writer renamed into place holds exactly those bytes, and the
    file its log names last is there: what a frozen (flushed) file system guarantees.
    Returns how many files were checked."""
    out.mkdir()
    subprocess.run(
        ["debugfs", "-R", f"rdump /w {out}", str(image)], check=True, capture_output=True
    )
    files = {
        p.name: p for p in (out / "w").iterdir() if re.fullmatch(r"f\d+\.[0-9a-f]{64}", p.name)
    }
    assert files, f"no writer files in the copy: {sorted(p.name for p in (out / 'w').iterdir())}"
    for name, path in files.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == name.split(".")[1], name
    log = out / "w" / "log"
    lines = log.read_text().splitlines(keepends=True) if log.exists() else []
    if not any(line.endswith("\n") for line in lines):  # just rotated
        lines = (out / "w" / "log.old").read_text().splitlines(keepends=True)
    last = [line for line in lines if line.endswith("\n")][-1].split()[1]
    assert last in files, f"the log's last file {last} is not in the copy"
    return len(files)


def freeze_facts(mnt: Path) -> dict[str, Any]:
    facts: dict[str, Any] = json.loads((mnt / "snapfs.json").read_text())["freeze"]
    return facts


def test_a_frozen_backup_is_consistent(
    start_guest: StartGuest, snapfs: Snapfs, tmp_path: Path
) -> None:
    """Three mounts of a guest writing all the time: each copy is of a frozen, flushed ext4,
    and the guest was thawed right after each snapshot point."""
    vm = start_guest()
    for i in range(3):
        vm.wait_writer(vm.writer_progress())  # busy right now, and while snapfs mounts
        with snapfs.mounted(vm, tmp_path / f"mnt{i}", "--agent", str(vm.agent_path)) as mnt:
            freeze = freeze_facts(mnt)
            # Thawed right after the snapshot point, not at umount: the guest writes on.
            vm.wait_writer(vm.writer_progress())
            copy = copy_disk(mnt, tmp_path / "copy.raw")
        assert freeze["state"] == "frozen", freeze
        assert freeze["filesystems"] >= 1, freeze
        assert freeze["thaw"] == "ok", freeze
        assert_frozen_image(copy)
        assert assert_writer_files_complete(copy, tmp_path / f"files{i}") >= 8
        copy.unlink()
        assert vm.agent_cmd("guest-fsfreeze-status") == "thawed"
        vm.wait_writer(vm.writer_progress())


def test_a_disk_on_an_io_thread_of_a_running_guest(
    start_guest: StartGuest, snapfs: Snapfs, tmp_path: Path
) -> None:
    """The guest's disk on an I/O thread, which its virtio-blk driver runs (QEMU before 9.0
    aborts when an NBD client of such a disk disconnects first): two backups, each copied
    with ``snapfs copy`` and with ``cp``, a frozen ext4 each time, and the guest writes on
    after every umount."""
    vm = start_guest(iothread=True)
    assert [t["id"] for t in vm.qmp("query-iothreads")] == ["iothread-virtio0"]
    for i in range(2):
        vm.wait_writer(vm.writer_progress())
        with snapfs.mounted(vm, tmp_path / f"mnt{i}", "--agent", str(vm.agent_path)) as mnt:
            assert freeze_facts(mnt)["state"] == "frozen"
            snapfs("copy", str(mnt), str(tmp_path / f"backup{i}"))
            copy = copy_disk(mnt, tmp_path / f"copy{i}.raw")
        assert file_sha256(tmp_path / f"backup{i}" / "virtio0.raw") == file_sha256(copy)
        assert_frozen_image(copy)
        assert assert_writer_files_complete(copy, tmp_path / f"files{i}") >= 8
        vm.wait_writer(vm.writer_progress())
        assert vm.proc is not None
        assert vm.proc.poll() is None


def test_an_agent_configured_but_not_running(
    start_guest: StartGuest, snapfs: Snapfs, tmp_path: Path
) -> None:
    """QEMU has the agent channel, the guest runs no qemu-ga: nothing answers the sync."""
    vm = start_guest(agent=False)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    progress = vm.writer_progress()
    proc = snapfs(*mount_args(vm, mnt))
    try:
        freeze = freeze_facts(mnt)
        copy = copy_disk(mnt, tmp_path / "copy.raw")
        vm.wait_writer(progress)  # never frozen
    finally:
        snapfs("umount", str(mnt))
    assert freeze["state"] == "failed", freeze
    assert "agent" in freeze["reason"], freeze
    assert freeze["thaw"] is None, freeze
    # The control for assert_frozen_image: a crash-consistent copy needs its journal replayed.
    assert "needs_recovery" in ext4_features(copy)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("snapfs: warning:")]
    assert any("agent" in line for line in warnings), proc.stderr


def test_a_guest_frozen_by_someone_else_is_left_alone(
    start_guest: StartGuest, snapfs: Snapfs, tmp_path: Path
) -> None:
    """Frozen through the agent before the mount: snapfs neither freezes nor thaws it."""
    vm = start_guest()
    # Closed before snapfs connects: the agent serves one client at a time.
    with vm.agent_client() as qga:
        assert qga.cmd("guest-fsfreeze-freeze") >= 1
        assert qga.cmd("guest-fsfreeze-status") == "frozen"
    thawed = False
    try:
        with snapfs.mounted(vm, tmp_path / "mnt", "--agent", str(vm.agent_path)) as mnt:
            freeze = freeze_facts(mnt)
            copy = copy_disk(mnt, tmp_path / "copy.raw")
        # Not frozen by snapfs, and consistent all the same: "skipped", already frozen (the
        # warning on the terminal says it was left alone); it neither froze nor thawed.
        assert freeze["state"] == "skipped", freeze
        assert freeze["already_frozen"], freeze
        assert "already frozen" in freeze["reason"], freeze
        assert freeze["thaw"] is None, freeze
        # snapfs did not thaw what it did not freeze.
        assert vm.agent_cmd("guest-fsfreeze-status") == "frozen"
        assert_frozen_image(copy)  # frozen all along, by us
        progress = vm.writer_progress()
        assert vm.agent_cmd("guest-fsfreeze-thaw") >= 1
        thawed = True
        vm.wait_writer(progress)
    finally:
        if not thawed:
            with contextlib.suppress(Exception):
                vm.agent_cmd("guest-fsfreeze-thaw")
