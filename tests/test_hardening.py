"""Path attacks on a tool that runs as root, and what ``-o allow_other`` shares.

Each attack is played as described, as user nobody where it needs an unprivileged user, against
the real CLI, a real QEMU and real mounts; the test states what must not happen. Scratch
directories that nobody must reach are made directly in /tmp (pytest's tmp_path is root's
alone) and removed afterwards, after lazily unmounting anything left below them. A root-owned
non-empty directory below tmp_path stands in for /etc: nothing is ever mounted over a real
system directory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dev.devvm import QEMU_ROOT_ENV, TestVM, poll
from snapfs import paths
from snapfs.errors import UsageError
from snapfs.fuse import kernel
from tests.conftest import Snapfs, lazy_umount, mounts_below

NOBODY = 65534
G = 65536
PYTHON3 = "/usr/bin/python3"  # not a per-user shim: nobody runs it
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"]

qemu = [pytest.mark.qemu, pytest.mark.mount]


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*AS_NOBODY, *cmd], capture_output=True, text=True, timeout=30)


def nobody_ok(*cmd: str) -> None:
    proc = as_nobody(*cmd)
    assert proc.returncode == 0, (cmd, proc.stderr)


def repoint(link: Path, target: Path) -> None:
    """As nobody: make ``link`` point at ``target`` in one rename, as an attacker would."""
    tmp = f"{link}.new"
    nobody_ok(PYTHON3, "-c", f"import os; os.symlink({str(target)!r}, {tmp!r}); "
              f"os.rename({tmp!r}, {str(link)!r})")  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """The single stderr line of a refused command (exit 2: bad input), with ``words`` in it."""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("snapfs: error: "), lines[0]
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert proc.returncode == 2, proc
    return lines[0]


def remove_scratch(path: Path) -> None:
    for mp in reversed(mounts_below(path)):
        lazy_umount(mp)
    shutil.rmtree(path, ignore_errors=True)  # never follows symlinks


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A fresh name directly in /tmp (not created): the attacker's or a world-readable place."""
    path = Path(tempfile.mkdtemp(prefix="snapfs-hardening-", dir="/tmp"))
    path.rmdir()
    try:
        yield path
    finally:
        remove_scratch(path)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A root file that no snapfs run may touch (stands in for /root/victim)."""
    path = tmp_path / "victim"
    path.write_text("root's precious data\n")
    os.chmod(path, 0o600)
    return path


def assert_untouched(victim: Path) -> None:
    assert not victim.is_symlink()
    assert victim.read_bytes() == b"root's precious data\n"
    assert victim.stat().st_mode & 0o777 == 0o600


def mount_args(vm: TestVM, mnt: str, *extra: str) -> list[str]:
    return ["mount", vm.vmid, mnt, "--qmp", str(vm.qmp_path), *extra]


def kill_session(snapfs: Snapfs, vm: TestVM) -> None:
    """Kill this VM's serving process (only it: the run directory may be the real one) and
    clean up after it."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int((snapfs.run_dir / ".state" / vm.vmid / "pid").read_text()), signal.SIGKILL)
    snapfs("cleanup", vm.vmid, "--qmp", str(vm.qmp_path), check=False)


# -- 1. root writes through a symlink in a user-owned --fleecing-dir ---------------------------


@pytest.mark.qemu
@pytest.mark.mount
def test_symlink_in_a_user_fleecing_dir_writes_nothing(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path, scratch: Path, victim: Path
) -> None:
    graph = vm.graph()
    fl = scratch
    nobody_ok("mkdir", "-m777", str(fl))
    nobody_ok("ln", "-s", str(victim), str(fl / ".bitmaps.json.tmp"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = snapfs(
        *mount_args(vm, str(mnt), "--fleecing-dir", str(fl), "--incremental", "nightly"),
        check=False,
    )
    if proc.returncode == 0:
        snapfs("umount", vm.vmid, "--commit", check=False)
    assert_untouched(victim)
    assert os.readlink(fl / ".bitmaps.json.tmp") == str(victim)
    assert not (fl / "bitmaps.json").exists()
    assert list(fl.glob("*.qcow2")) == []
    one_line_error(proc, f"fleecing directory {fl} is unsafe", "uid 65534")
    assert not kernel.is_mounted(mnt)
    assert vm.graph() == graph


# -- 2. a symlink renamed over the fleecing image before qemu-img opens it ---------------------

RACER = r"""
import os, stat, sys, time
d, name, victim = sys.argv[1:4]
path, tmp = os.path.join(d, name), os.path.join(d, ".lnk")
end = time.monotonic() + 60
while time.monotonic() < end:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        continue
    if stat.S_ISREG(st.st_mode) and st.st_uid == 0:
        try:
            os.symlink(victim, tmp)
            os.rename(tmp, path)
            print("swapped", flush=True)
        except OSError:
            pass
"""


@pytest.mark.qemu
@pytest.mark.mount
def test_race_on_the_fleecing_image_truncates_nothing(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path, scratch: Path, victim: Path
) -> None:
    graph = vm.graph()
    fl = scratch
    nobody_ok("mkdir", "-m777", str(fl))
    racer = subprocess.Popen(
        [*AS_NOBODY, PYTHON3, "-c", RACER, str(fl), f"snapfs-{vm.vmid}-virtio0.qcow2", str(victim)],
        stdout=subprocess.DEVNULL,
    )
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        time.sleep(0.2)  # the racer is polling
        proc = snapfs(*mount_args(vm, str(mnt), "--fleecing-dir", str(fl)), check=False)
        if proc.returncode == 0:
            snapfs("umount", vm.vmid, check=False)
    finally:
        racer.kill()
        racer.wait()
    assert_untouched(victim)
    one_line_error(proc, f"fleecing directory {fl} is unsafe")
    assert not kernel.is_mounted(mnt)
    assert vm.graph() == graph


# -- 3. symlinked mountpoints --------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path) -> Iterator[Path]:
    """Another file system, mounted at ``path``, with a marker file in it."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "snapfs-other", str(path)], check=True)
    try:
        (path / "marker").write_text("other fs\n")
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.qemu
@pytest.mark.mount
def test_repointed_symlink_does_not_make_umount_unmount_another_fs(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path, scratch: Path
) -> None:
    graph = vm.graph()
    (tmp_path / "a" / "mnt").mkdir(parents=True)
    nobody_ok("mkdir", "-m755", str(scratch))
    nobody_ok("ln", "-s", str(tmp_path / "a"), str(scratch / "link"))
    with tmpfs(tmp_path / "b" / "mnt") as other:
        proc = snapfs(
            *mount_args(vm, f"{scratch}/link/mnt", "--fleecing-dir", str(vm.workdir / "fl")),
            check=False,
        )
        umount = None
        if proc.returncode == 0:
            repoint(scratch / "link", tmp_path / "b")
            umount = snapfs("umount", vm.vmid, check=False)
        try:
            assert kernel.is_mounted(other), umount
            assert (other / "marker").read_text() == "other fs\n"
            assert not kernel.is_mounted(tmp_path / "a" / "mnt")
            one_line_error(proc, f"mountpoint {scratch}/link/mnt is unsafe", "uid 65534")
        finally:
            if umount is not None:
                kill_session(snapfs, vm)
    assert vm.graph() == graph


@pytest.mark.qemu
@pytest.mark.mount
def test_repointed_symlink_during_set_up_mounts_nothing_over_etc(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path, scratch: Path
) -> None:
    graph = vm.graph()
    etc = tmp_path / "etc" / "mnt"  # root's, not empty: stands in for /etc
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tmp_path / "a" / "mnt").mkdir(parents=True)
    nobody_ok("mkdir", "-m755", str(scratch))
    nobody_ok("ln", "-s", str(tmp_path / "a"), str(scratch / "link"))
    args = mount_args(vm, f"{scratch}/link/mnt", "--fleecing-dir", str(vm.workdir / "fl"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "snapfs", *args],
        env=snapfs.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The serving process has taken the session: set-up has begun.
        poll(
            lambda: (snapfs.run_dir / ".state" / vm.vmid).exists() or proc.poll() is not None,
            30,
            "set-up to begin",
        )
        repoint(scratch / "link", tmp_path / "etc")
        out, err = proc.communicate(timeout=60)
        done = subprocess.CompletedProcess(args, proc.returncode, out, err)
        assert not kernel.is_mounted(etc)
        assert os.listdir(etc) == ["passwd"]
        assert not kernel.is_mounted(tmp_path / "a" / "mnt")
        one_line_error(done, f"mountpoint {scratch}/link/mnt is unsafe", "uid 65534")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if snapfs.pids():
            kill_session(snapfs, vm)
        for mp in reversed(mounts_below(scratch)):
            lazy_umount(mp)  # (the snapfs fixture does so below tmp_path)
    assert vm.graph() == graph


@pytest.mark.qemu
@pytest.mark.mount
def test_umount_and_cleanup_leave_alone_what_is_not_their_mount(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    """Defence in depth on a trusted path: root itself stacks another file system on the view.
    Neither umount nor cleanup may take that one for the view."""
    graph = vm.graph()
    mnt = snapfs.mount(vm, tmp_path / "mnt")
    with tmpfs(mnt) as other:
        proc = snapfs("umount", str(mnt), check=False)
        assert proc.returncode == 3, proc
        line = proc.stderr.strip()
        assert len(line.splitlines()) == 1, line
        assert f"{mnt} no longer leads to the snapfs mount of VM {vm.vmid}" in line
        assert (other / "marker").exists()
        # The serving process dies; cleanup must leave the tmpfs alone as well.
        os.kill(int((snapfs.run_dir / ".state" / vm.vmid / "pid").read_text()), signal.SIGKILL)
        poll(lambda: not snapfs.pids() or not Path(f"/proc/{snapfs.pids()[0]}").exists(), 10)
        proc = snapfs("cleanup", vm.vmid, check=False)
        assert proc.returncode == 3, proc
        line = proc.stderr.strip()
        assert len(line.splitlines()) == 1, line
        assert f"{mnt} no longer leads to the snapfs mount of VM {vm.vmid}" in line
        assert (other / "marker").exists()
        assert vm.graph() == graph  # restored all the same
    # With the tmpfs gone the dead view shows again, and cleanup removes it.
    assert kernel.is_mounted(mnt)
    snapfs("cleanup", vm.vmid)
    assert not kernel.is_mounted(mnt)


# -- 4. -o allow_other shares reading, never punching --------------------------------------------


@pytest.fixture
def public_mnt(scratch: Path) -> Path:
    """A mountpoint every user can reach: root's 0755 directories in /tmp."""
    scratch.mkdir(mode=0o755)
    os.chmod(scratch, 0o755)
    mnt = scratch / "mnt"
    mnt.mkdir(mode=0o755)
    return mnt


FALLOCATE_FD = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
fd = int(sys.argv[1])
print(0 if libc.fallocate(fd, 3, 0, 65536) == 0 else ctypes.get_errno())
"""


@pytest.mark.qemu
@pytest.mark.mount
def test_allow_other_lets_no_other_user_punch(vm: TestVM, snapfs: Snapfs, public_mnt: Path) -> None:
    mnt = public_mnt
    before = vm.snapshot()
    snapfs(*mount_args(vm, str(mnt), "-o", "allow_other", "--fleecing-dir", str(vm.workdir / "fl")))
    try:
        raw = mnt / "virtio0.raw"
        proc = as_nobody(
            "fallocate", "--punch-hole", "--keep-size", "-o", "0", "-l", "65536", str(raw)
        )
        assert proc.returncode != 0
        assert "Permission denied" in proc.stderr
        # A descriptor root opened read-write, in nobody's hands: snapfs refuses the punch.
        fd = os.open(raw, os.O_RDWR)
        try:
            handed = subprocess.run(
                [*AS_NOBODY, PYTHON3, "-c", FALLOCATE_FD, str(fd)],
                pass_fds=(fd,),
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            )
        finally:
            os.close(fd)
        assert int(handed.stdout) == errno.EPERM
        facts = json.loads((mnt / "snapfs.json").read_text())
        assert facts["disks"]["virtio0"]["discarded_bytes"] == 0
        assert raw.read_bytes()[: 4 * G] == before["virtio0"][: 4 * G]
        # Root still may.
        subprocess.run(
            ["fallocate", "--punch-hole", "--keep-size", "-o", "0", "-l", "65536", str(raw)],
            check=True,
        )
        facts = json.loads((mnt / "snapfs.json").read_text())
        assert facts["disks"]["virtio0"]["discarded_bytes"] == G
    finally:
        snapfs("umount", str(mnt), check=False)
    assert not kernel.is_mounted(mnt)


@pytest.mark.qemu
@pytest.mark.mount
def test_allow_other_shares_reading(vm: TestVM, snapfs: Snapfs, public_mnt: Path) -> None:
    mnt = public_mnt
    before = vm.snapshot()
    snapfs(*mount_args(vm, str(mnt), "-o", "allow_other", "--fleecing-dir", str(vm.workdir / "fl")))
    try:
        assert os.stat(mnt).st_mode & 0o7777 == 0o755
        assert os.stat(mnt / "virtio0.raw").st_mode & 0o7777 == 0o644
        assert os.stat(mnt / "virtio0.dirty").st_mode & 0o7777 == 0o444
        assert os.stat(mnt / "snapfs.json").st_mode & 0o7777 == 0o444
        ls = as_nobody("ls", str(mnt))
        assert ls.returncode == 0, ls.stderr
        assert "virtio0.raw" in ls.stdout.split()
        facts = json.loads(as_nobody("cat", str(mnt / "snapfs.json")).stdout)
        assert facts["vmid"] == vm.vmid
        data = subprocess.run(
            [*AS_NOBODY, "dd", f"if={mnt / 'scsi0.raw'}", "bs=1M", "status=none"],
            capture_output=True,
            timeout=30,
            check=True,
        ).stdout
        assert data == before["scsi0"]
        # Read-only for everyone but root: no write access is granted.
        proc = as_nobody("sh", "-c", f"exec 3<>{mnt / 'virtio0.raw'}")
        assert "Permission denied" in proc.stderr
    finally:
        snapfs("umount", str(mnt), check=False)
    assert not kernel.is_mounted(mnt)


# -- 5. relative paths ---------------------------------------------------------------------------


def run_in(
    snapfs: Snapfs, cwd: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "snapfs", *args],
        env=dict(snapfs.env, PYTHONPATH=str(Path(__file__).resolve().parents[1])),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    if check:
        assert proc.returncode == 0, (args, proc.stderr)
    return proc


@pytest.mark.qemu
@pytest.mark.mount
def test_relative_paths_are_resolved_against_the_working_directory(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    graph = vm.graph()
    cwd = vm.workdir
    assert (cwd / "qmp.sock").samefile(vm.qmp_path)
    (cwd / "mnt").mkdir()
    q = ["--qmp", "qmp.sock", "--fleecing-dir", "fl", "--agent", "no-agent.qga"]
    run_in(snapfs, cwd, "mount", vm.vmid, "mnt", *q)
    try:
        assert kernel.is_mounted(cwd / "mnt")
        facts = json.loads((cwd / "mnt" / "snapfs.json").read_text())
        assert facts["mountpoint"] == str(cwd / "mnt")
        assert len(list((cwd / "fl").glob("*.qcow2"))) == 2
        run_in(snapfs, cwd, "copy", "mnt", "backup")
        assert (cwd / "backup" / "scsi0.raw").read_bytes() == vm.expected["scsi0"]
        run_in(snapfs, cwd, "umount", "mnt")
    finally:
        if kernel.is_mounted(cwd / "mnt"):
            kill_session(snapfs, vm)
    assert not kernel.is_mounted(cwd / "mnt")
    (cwd / "m2").mkdir()
    script = 'test "$SNAPFS_MOUNT" = "$1" && cat "$SNAPFS_MOUNT/snapfs.json" > out.json'
    run_in(snapfs, cwd, "run", vm.vmid, "--mountpoint", "m2", *q, "--",
           "sh", "-c", script, "sh", str(cwd / "m2"))  # fmt: skip
    assert json.loads((cwd / "out.json").read_text())["mountpoint"] == str(cwd / "m2")
    run_in(snapfs, cwd, "cleanup", vm.vmid, "--qmp", "qmp.sock")
    assert vm.graph() == graph
    # What is wrong is named with the path it resolved to.
    proc = run_in(snapfs, cwd, "mount", vm.vmid, "missing", *q, check=False)
    one_line_error(proc, f"mountpoint {cwd / 'missing'} does not exist")
    proc = run_in(snapfs, cwd, "mount", vm.vmid, "mnt", "--qmp", "nope.qmp", check=False)
    one_line_error(proc, f"QMP socket {cwd / 'nope.qmp'} does not exist")


# -- the defaults, and what is accepted ----------------------------------------------------------


@pytest.mark.qemu
@pytest.mark.mount
def test_default_locations_and_a_new_directory_in_tmp_work(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path, scratch: Path
) -> None:
    """/run/snapfs/VMID, /run/snapfs/.state/VMID and /var/lib/snapfs/VMID as they are; then a
    fleecing directory that snapfs makes itself in sticky /tmp."""
    graph = vm.graph()
    env = {k: v for k, v in snapfs.env.items() if k != "SNAPFS_RUN_DIR"}
    real = Snapfs(Path("/run/snapfs"), snapfs.log_file)
    real.env = env
    mnt = Path("/run/snapfs") / vm.vmid
    fleecing = Path("/var/lib/snapfs") / vm.vmid
    chrooted = bool(os.environ.get(QEMU_ROOT_ENV))  # its QEMU does not see /var/lib
    extra = ["--fleecing-dir", str(tmp_path / "fl")] if chrooted else []
    try:
        real("mount", vm.vmid, "--qmp", str(vm.qmp_path), *extra)
        assert kernel.is_mounted(mnt)
        assert (mnt / "scsi0.raw").read_bytes() == vm.expected["scsi0"]
        assert (Path("/run/snapfs/.state") / vm.vmid / "state.json").exists()
        if not chrooted:
            assert len(list(fleecing.glob("*.qcow2"))) == 2
        real("umount", vm.vmid)
        assert not mnt.exists()
        assert not (Path("/run/snapfs/.state") / vm.vmid).exists()
    finally:
        if kernel.is_mounted(mnt):
            kill_session(real, vm)
            lazy_umount(str(mnt))
        with contextlib.suppress(OSError):
            mnt.rmdir()
        with contextlib.suppress(OSError):
            fleecing.rmdir()
    (tmp_path / "m").mkdir()
    with snapfs.mounted(vm, tmp_path / "m"):
        pass
    snapfs(*mount_args(vm, str(tmp_path / "m"), "--fleecing-dir", str(scratch)))
    try:
        st = os.stat(scratch)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
        assert len(list(scratch.glob("*.qcow2"))) == 2
    finally:
        snapfs("umount", vm.vmid)
    assert vm.graph() == graph


# -- the checks themselves (no VM) ---------------------------------------------------------------


def test_trusted_paths(tmp_path: Path, scratch: Path) -> None:
    root = tmp_path / "root"
    (root / "real" / "dir").mkdir(parents=True)
    os.symlink("real", root / "link")  # root's symlink in root's directory: followed
    os.symlink("../root/real/./dir", root / "dotted")
    assert paths.resolve(root / "link" / "dir", "x") == root / "real" / "dir"
    assert paths.resolve(root / "dotted", "x") == root / "real" / "dir"
    assert paths.resolve(root / "link" / "new" / "deeper", "x") == root / "real" / "new" / "deeper"
    with paths.open_dir(root / "link" / "dir", "x") as d:
        assert d.path == root / "real" / "dir"

    user = root / "user"
    user.mkdir()
    os.chown(user, NOBODY, NOBODY)
    with pytest.raises(UsageError, match=f"^fleecing directory {user}/x is unsafe: {user} is "
                       "owned by uid 65534, not root$"):  # fmt: skip
        paths.resolve(user / "x", "fleecing directory")
    ulink = root / "ulink"
    os.symlink("real", ulink)
    os.lchown(ulink, NOBODY, NOBODY)
    with pytest.raises(UsageError, match="ulink is owned by uid 65534"):
        paths.resolve(ulink / "dir", "x")
    group = root / "group"
    group.mkdir()
    os.chmod(group, 0o775)
    with pytest.raises(UsageError, match=r"group is writable by group or others \(mode 0775\)$"):
        paths.resolve(group, "x")
    with pytest.raises(UsageError, match="does not exist"), paths.open_dir(root / "none", "x"):
        pass
    (root / "file").write_text("")
    with pytest.raises(UsageError, match="is not a directory"), paths.open_dir(root / "file", "x"):
        pass

    # A sticky directory writable by all (like /tmp): root's entries in it are fine, others' not.
    sticky = root / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    with paths.open_dir(sticky / "made", "x", create=0o700) as d:
        assert d.created
        st = os.stat(d.path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    (sticky / "theirs").mkdir()
    os.chown(sticky / "theirs", NOBODY, NOBODY)
    with (
        pytest.raises(UsageError, match="theirs is owned by uid 65534"),
        paths.open_dir(sticky / "theirs", "x", create=0o700),
    ):
        pass
    # A world-writable directory without the sticky bit lets anyone rename its entries.
    os.chmod(sticky, 0o777)
    with pytest.raises(UsageError, match=r"writable by group or others \(mode 0777\)"):
        paths.resolve(sticky / "made", "x")

    # Relative paths: against the working directory; '..' is refused.
    old = os.getcwd()
    os.chdir(root)
    try:
        assert paths.absolute("real/dir", "x") == root / "real" / "dir"
        assert paths.absolute("./real//dir/", "x") == root / "real" / "dir"
    finally:
        os.chdir(old)
    with pytest.raises(UsageError, match=r"'\.\.'"):
        paths.absolute("a/../b", "x")
    with pytest.raises(UsageError, match="newline"):
        paths.absolute("a\nb", "x")


def test_files_in_a_trusted_directory_never_follow_symlinks(tmp_path: Path, victim: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    os.symlink(victim, d / "record.json")
    with pytest.raises(OSError, match="symbolic links") as e:
        paths.read_text(d / "record.json", "x")
    assert e.value.errno == errno.ELOOP
    os.symlink(victim, d / ".record.json.tmp")
    paths.write_atomic(d / "record.json", "{}", "x")
    assert_untouched(victim)
    assert not (d / "record.json").is_symlink()
    assert (d / "record.json").read_text() == "{}"
    assert stat.S_IMODE((d / "record.json").stat().st_mode) == 0o600
    assert not (d / ".record.json.tmp").exists()
    os.symlink(victim, d / "gone")
    paths.unlink(d / "gone", "x")
    assert_untouched(victim)
    assert not (d / "gone").is_symlink()
