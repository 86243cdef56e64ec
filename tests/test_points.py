"""Restore points (``snapfs copy --keep``, ``points``, ``restore``, ``verify``) without a VM.

The view here is a FAKE: a plain directory with what ``snapfs copy`` reads from a mounted view
(``snapfs.json``, ``<disk>.raw``, ``<disk>.dirty``, the Proxmox config). Everything below it
is real: qemu-img, qemu-nbd, libnbd, loop devices, borg and restic. The chain with a real VM,
real views and a guest writing during the copies is in ``test_points_vm.py``.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dev.devvm import MiB, poll
from snapfs import points, qemuimg
from snapfs.errors import CopyError
from snapfs.records import BitmapFacts, DiskFacts, Facts
from tests.conftest import Snapfs

KiB = 1024
GRAIN = 64 * KiB  # the dirty bitmap's granularity
#: Sizes that are not whole MiB, like Proxmox's 528 KiB efidisk: the last checksum chunk is short.
SIZES = {"scsi0": 5 * MiB + 528 * KiB, "efidisk0": 528 * KiB}
T0 = datetime(2026, 11, 20, 1, 0, 2, 412000, tzinfo=UTC)


class PlainView:
    """A fake view (see the module's docstring) of a disk set that changes from run to run,
    and the disks as they were at every point written from it."""

    def __init__(self, root: Path, seed: int = 7) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.disks = {name: bytearray(self.rng.randbytes(size)) for name, size in SIZES.items()}
        for data in self.disks.values():  # zeros, as a used thin disk has
            data[GRAIN : 4 * GRAIN] = bytes(3 * GRAIN)
        self.changed: dict[str, list[tuple[int, int]]] = {n: [] for n in self.disks}
        self.time = T0
        self.runs = 0
        self.want: dict[str, dict[str, bytes]] = {}

    def change(self, count: int = 12) -> None:
        """Guest writes of data and zeros, of any size and alignment."""
        for _ in range(count):
            name = self.rng.choice(list(self.disks))
            data = self.disks[name]
            length = self.rng.choice([1, 511, 4096, 5000, GRAIN, 300 * KiB, MiB + 7])
            length = min(length, len(data))
            offset = self.rng.randrange(0, len(data) - length + 1)
            fill = bytes(length) if self.rng.random() < 0.4 else self.rng.randbytes(length)
            data[offset : offset + length] = fill
            self.changed[name].append((offset, length))

    def regions(self, name: str, full: bool) -> list[tuple[int, int]]:
        size = len(self.disks[name])
        if full:
            return [(0, size)]
        grains = sorted(
            {
                g
                for off, n in self.changed[name]
                for g in range(off // GRAIN, (off + n - 1) // GRAIN + 1)
            }
        )
        out: list[tuple[int, int]] = []
        for g in grains:
            start, end = g * GRAIN, min((g + 1) * GRAIN, size)
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], end - out[-1][0])
            else:
                out.append((start, end - start))
        return out

    def make(self, *, full: bool, incremental: str | None = "nightly") -> Path:
        """The view of this instant, as files; the changes since the last one are its regions."""
        self.runs += 1
        self.time += timedelta(days=1)
        view = self.root / f"view{self.runs}"
        view.mkdir(parents=True)
        disks = {}
        for name, data in self.disks.items():
            regions = self.regions(name, full)
            (view / f"{name}.raw").write_bytes(data)
            (view / f"{name}.dirty").write_text("".join(f"{o} {n}\n" for o, n in regions))
            dirty = sum(n for _, n in regions)
            disks[name] = DiskFacts(
                size=len(data),
                format="raw",
                nodes={},
                bitmap=BitmapFacts(mode="new" if full else "reuse"),
                dirty_bytes=dirty,
                dirty_regions=len(regions),
                readable_bytes=dirty,
                discarded_bytes=0,
                bytes_read=0,
                fleecing_bytes=0,
            )
            self.changed[name] = []
        facts = Facts(
            vmid="100",
            snapshot_time=self.time.isoformat(timespec="milliseconds"),
            qemu_version="fake",
            pause_ms=None,
            incremental=incremental,
            mountpoint=str(view),
            broken=None,
            freeze=None,
            disks=disks,
        )
        (view / "snapfs.json").write_text(facts.to_json(indent=1))
        (view / "qemu-server.conf").write_text(f"# run {self.runs}\nscsi0: local:100/x.raw\n")
        self.want[points.point_id(facts.snapshot_time)] = {
            n: bytes(d) for n, d in self.disks.items()
        }
        return view


@pytest.fixture
def plain(tmp_path: Path) -> PlainView:
    return PlainView(tmp_path / "views")


def copy(view: Path, dest: Path, keep: int) -> None:
    facts = Facts.from_json((view / "snapfs.json").read_text())
    points.copy_points(view, dest, facts, keep, discard=False)


def restored(store: points.Store, point: points.Point, name: str, out: Path) -> bytes:
    target = out / f"{point.id}-{name}.raw"
    store.restore_disk(point, name, target, None, force=True, progress=False)
    data = target.read_bytes()
    target.unlink()
    return data


def check_all(dest: Path, plain: PlainView, tmp_path: Path) -> list[str]:
    """Every point restores to the disks as they were at its instant, and verifies."""
    store = points.Store(dest)
    ids = []
    with store.locked(exclusive=False):
        for p in store.points():
            ids.append(p.id)
            for name, want in plain.want[p.id].items():
                got = restored(store, p, name, tmp_path)
                assert got == want, f"point {p.id} {name}"
            assert store.verify(p, lambda line: None) == [], p.id
    return ids


def test_points_restore_every_kept_instant_and_prune_the_oldest(
    plain: PlainView, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    history = []
    for run in range(8):
        plain.change()
        full = run in (0, 5)  # run 5: a new chain (a VM restart, a resized disk...)
        copy(plain.make(full=full), dest, keep=3)
        ids = check_all(dest, plain, tmp_path)
        history.append(ids)
        assert len(ids) == min(run + 1, 3)
        assert ids[-1] == max(plain.want)
    assert history[-1] == sorted(plain.want)[-3:]
    store = points.Store(dest)
    newest = store.points()[-1]
    # An incremental point holds only its run's regions, on top of the one before.
    disk = newest.manifest.disks["scsi0"]
    assert disk.mode == "incremental"
    assert disk.backing == store.points()[-2].id
    info = qemuimg.info(newest.path / disk.image)
    assert info["backing-filename"] == f"../{disk.backing}/scsi0.qcow2"
    assert info["actual-size"] < SIZES["scsi0"] // 2
    # The oldest kept point was merged into a base: it has no backing file of its own.
    oldest = store.points()[0]
    for d in oldest.manifest.disks.values():
        assert d.backing is None
        assert "backing-filename" not in qemuimg.info(oldest.path / d.image)
    assert (oldest.path / "qemu-server.conf").exists()
    assert not list((dest / "points").glob(".incomplete-*"))


def test_a_crash_at_any_step_of_a_prune_loses_no_kept_point(
    plain: PlainView, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "dest"
    for run in range(4):
        plain.change()
        copy(plain.make(full=run == 0), dest, keep=10)

    class Crash(Exception):
        pass

    real_commit = qemuimg.commit
    real_replace = points._replace_durably

    def commit_then_crash(top: Path, size: int) -> None:
        real_commit(top, size)
        raise Crash

    def crash(path: Path, data: bytes) -> None:
        raise Crash

    store = points.Store(dest)
    for step, patch in (
        ("after the merge", ("commit", commit_then_crash)),
        ("after the rename", ("replace", crash)),
    ):
        if patch[0] == "commit":
            monkeypatch.setattr(qemuimg, "commit", patch[1])
        else:
            monkeypatch.setattr(points, "_replace_durably", patch[1])
        kept = [p.id for p in store.points()][1:]
        with store.locked(exclusive=True), pytest.raises(Crash):
            store.prune(len(kept))
        monkeypatch.setattr(qemuimg, "commit", real_commit)
        monkeypatch.setattr(points, "_replace_durably", real_replace)
        # The point being pruned is no longer listed; every kept one reads as it was.
        assert check_all(dest, plain, tmp_path) == kept, step
        with store.locked(exclusive=True):
            assert store.recover() == [f"finished pruning point {sorted(plain.want)[0]}"]
        plain.want.pop(sorted(plain.want)[0])
        assert check_all(dest, plain, tmp_path) == kept, step


def test_an_interrupted_copy_leaves_the_earlier_points_and_says_so(
    plain: PlainView, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dest = tmp_path / "dest"
    copy(plain.make(full=True), dest, keep=3)
    plain.change()
    view = plain.make(full=False)
    (view / "scsi0.raw").unlink()  # the view goes away in the middle of the copy
    with pytest.raises(CopyError):
        copy(view, dest, keep=3)
    lost = points.point_id(Facts.from_json((view / "snapfs.json").read_text()).snapshot_time)
    plain.want.pop(lost)
    assert points.describe(dest)["interrupted"] == [lost]
    assert len(check_all(dest, plain, tmp_path)) == 1
    # The next run removes it and says so; its incremental covers everything since.
    plain.change()
    view = plain.make(full=False)
    for name in plain.disks:  # the uncommitted run's regions are in the next view too
        (view / f"{name}.dirty").write_text(f"0 {SIZES[name]}\n")
    copy(view, dest, keep=3)
    assert "removed the incomplete point" in caplog.text
    assert points.describe(dest)["interrupted"] == []
    assert len(check_all(dest, plain, tmp_path)) == 2


# A child that starts a qemu-nbd and says its pid once the top image is open, while qemu-nbd
# still opens the backing chain: then it has its signal handlers but not yet its main loop.
_STARTING = """
import os, sys, time
from pathlib import Path
from snapfs import qemuimg

def target(link):
    try:
        return os.readlink(link)
    except OSError:  # closed meanwhile
        return None

def opening(server):
    fds = f"/proc/{server._proc.pid}/fd"
    while not any(target(f"{fds}/{f}") == str(server.image) for f in os.listdir(fds)):
        pass
    print(server._proc.pid, flush=True)
    time.sleep(600)

qemuimg.Server._wait_listening = opening
with qemuimg.Server(Path(sys.argv[1]), writable=True):
    pass
"""


def test_a_qemu_nbd_never_outlives_a_snapfs_killed_as_it_starts(tmp_path: Path) -> None:
    """qemu-nbd forgets a SIGTERM that comes before its main loop, so a snapfs killed at that
    instant must still take its qemu-nbd with it (else it serves on, and keeps the images of
    the points locked against every later prune). What the killed snapfs left in the
    temporary directory, the next one removes."""
    killed = []
    backing = None
    for i in range(40):  # opening a long chain holds qemu-nbd in the instant that matters
        qemuimg.create(tmp_path / f"{i}.qcow2", MiB, backing)
        backing = f"{i}.qcow2"
    for _ in range(3):
        with subprocess.Popen(
            [sys.executable, "-c", _STARTING, str(tmp_path / "39.qcow2")],
            stdout=subprocess.PIPE,
            text=True,
        ) as child:
            try:
                assert child.stdout is not None
                helper = int(child.stdout.readline())
            finally:
                child.kill()
                killed.append(child.pid)
        try:
            poll(functools.partial(_gone, helper), what="qemu-nbd to follow its killed parent")
        finally:
            if _alive(helper):
                os.kill(helper, signal.SIGKILL)
    tmp = Path(tempfile.gettempdir())

    def left() -> list[Path]:
        return [d for pid in killed for d in tmp.glob(f"{qemuimg.SERVER_DIR_PREFIX}{pid}-*")]

    # Each child's Server removed what the child before it left: the last one's is there.
    assert [d.name.split("-")[2] for d in left()] == [str(killed[-1])]
    server = qemuimg.Server(tmp_path / "39.qcow2", writable=False)
    try:
        assert not left()
        assert server.socket.parent.name.startswith(f"{qemuimg.SERVER_DIR_PREFIX}{os.getpid()}-")
    finally:
        server.close()
    assert not server.socket.parent.exists()


def test_only_what_a_process_that_is_gone_left_is_removed(tmp_path: Path) -> None:
    """Directories of live processes, symlinks, files, other users' directories and other
    names stay."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    p = qemuimg.SERVER_DIR_PREFIX
    stale = tmp_path / f"{p}{gone.pid}-abc"
    (stale / "sub").mkdir(parents=True)
    (stale / "sock").touch()
    live = tmp_path / f"{p}{os.getpid()}-abc"
    live.mkdir()
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").touch()
    link = tmp_path / f"{p}{gone.pid}-link"
    link.symlink_to(target)
    plain = tmp_path / f"{p}{gone.pid}-file"
    plain.touch()
    foreign = tmp_path / f"{p}{gone.pid}-foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    odd = [tmp_path / f"{p}x-1", tmp_path / f"{p}{'9' * 30}-1", tmp_path / f"{p}old"]
    for d in odd:
        d.mkdir()
    qemuimg._remove_orphans(tmp_path)
    assert not stale.exists()
    for kept in (live, link, plain, foreign, target / "keep", *odd):
        assert kept.exists() or kept.is_symlink(), kept


def _gone(pid: int) -> bool:
    return not _alive(pid)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_an_incremental_needs_a_point_of_its_chain(plain: PlainView, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(CopyError, match="no restore point holds this disk"):
        copy(plain.make(full=False), dest, keep=3)
    copy(plain.make(full=True, incremental="weekly"), dest, keep=3)
    with pytest.raises(CopyError, match="incremental ID 'weekly', not 'nightly'"):
        copy(plain.make(full=False), dest, keep=3)
    view = plain.make(full=True, incremental="weekly")
    copy(view, dest, keep=3)
    with pytest.raises(CopyError, match="already holds point"):
        copy(view, dest, keep=3)


def test_verify_finds_a_changed_byte(plain: PlainView, tmp_path: Path, snapfs: Snapfs) -> None:
    dest = tmp_path / "dest"
    copy(plain.make(full=True), dest, keep=3)
    plain.change()
    copy(plain.make(full=False), dest, keep=3)
    ok = snapfs("verify", str(dest))
    assert ok.stdout.count(": ok") == 4, ok.stdout
    base = points.Store(dest).points()[0]
    image = base.path / "scsi0.qcow2"
    mapping = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(image)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    host = next(m["offset"] for m in mapping if m["data"] and "offset" in m)
    with open(image, "r+b") as f:
        f.seek(host + 100)
        byte = f.read(1)
        f.seek(host + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    bad = snapfs("verify", str(dest), check=False)
    assert bad.returncode == 10, bad.stderr
    # Both points read the changed byte: the base directly, the overlay through it.
    assert bad.stdout.count("FAILED") == 2, bad.stdout
    assert len(bad.stderr.strip().splitlines()) == 1


def test_restore_targets_and_choices(plain: PlainView, tmp_path: Path, snapfs: Snapfs) -> None:
    dest = tmp_path / "dest"
    for run in range(3):
        plain.change()
        copy(plain.make(full=run == 0), dest, keep=5)
    ids = sorted(plain.want)
    listing = json.loads(snapfs("points", str(dest), "--json").stdout)
    assert [p["id"] for p in listing["points"]] == ids
    assert listing["points"][0]["disks"]["scsi0"]["mode"] == "full"
    assert listing["points"][1]["changed_bytes"] < sum(SIZES.values())
    text = snapfs("points", str(dest)).stdout
    assert all(i in text for i in ids)

    # --at: an ID, a time, a date (the end of that day), nothing (the newest).
    second = plain.time - timedelta(days=1)
    out = tmp_path / "out"
    out.mkdir()
    cases = {
        ids[0]: ids[0],
        (second + timedelta(hours=2)).isoformat(): ids[1],
        second.date().isoformat(): ids[1],  # in UTC: see TZ below
    }
    snapfs.env["TZ"] = "UTC"
    for at, want_id in cases.items():
        target = out / "x.raw"
        snapfs("restore", str(dest), "--at", at, "scsi0", str(target), "--force")
        assert target.read_bytes() == plain.want[want_id]["scsi0"], at
    snapfs("restore", str(dest), "efidisk0", str(out / "e.qcow2"))
    assert qemuimg.info(out / "e.qcow2")["format"] == "qcow2"
    snapfs("restore", str(dest), "efidisk0", str(out / "e2.raw"), "--format", "raw")
    assert (out / "e2.raw").read_bytes() == plain.want[ids[-1]]["efidisk0"]
    # Sparse: the zeros of the disk are not written.
    snapfs("restore", str(dest), "--at", ids[0], "scsi0", str(out / "s.raw"))
    assert (out / "s.raw").stat().st_blocks * 512 < SIZES["scsi0"]

    # A whole VM with its config.
    snapfs("restore", str(dest), "--to-dir", str(out / "vm"))
    assert (out / "vm" / "qemu-server.conf").read_text().startswith("# run 3")
    for name, data in plain.want[ids[-1]].items():
        assert (out / "vm" / f"{name}.raw").read_bytes() == data
    listed = snapfs("restore", str(dest), "--list").stdout
    for word in ("scsi0", "efidisk0", "qemu-server.conf"):
        assert word in listed

    # Refused, with one line and nothing written.
    for args, code, words in (
        (["scsi0", str(out / "s.raw")], 2, "exists"),
        (["nosuch", str(out / "n.raw")], 2, "no disk 'nosuch'"),
        (["--at", "2020-01-01", "scsi0", str(out / "n.raw")], 2, "no restore point at or before"),
        (["--at", "yesterday", "scsi0", str(out / "n.raw")], 2, "neither a point's ID"),
        (["scsi0"], 2, "give DISK TARGET"),
    ):
        proc = snapfs("restore", str(dest), *args, check=False)
        assert proc.returncode == code, (args, proc.stderr)
        assert words in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (out / "n.raw").exists()
    proc = snapfs("points", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 2
    assert "no restore points" in proc.stderr


def test_restore_onto_a_block_device(plain: PlainView, tmp_path: Path, snapfs: Snapfs) -> None:
    dest = tmp_path / "dest"
    copy(plain.make(full=True), dest, keep=3)
    devices = []
    try:
        for name, size in (("small", SIZES["scsi0"] - 512), ("big", SIZES["scsi0"] + MiB)):
            backing = tmp_path / f"{name}.img"
            backing.write_bytes(b"\xee" * size)
            dev = subprocess.run(
                ["losetup", "--find", "--show", str(backing)],
                capture_output=True,
                text=True,
                check=False,
            )
            if dev.returncode != 0:
                pytest.skip(f"no loop device: {dev.stderr.strip()}")
            devices.append(dev.stdout.strip())
        small, big = devices
        proc = snapfs("restore", str(dest), "scsi0", small, check=False)
        assert proc.returncode == 2
        assert "less than the disk's" in proc.stderr
        assert (tmp_path / "small.img").read_bytes() == b"\xee" * (SIZES["scsi0"] - 512)
        snapfs("restore", str(dest), "scsi0", big)
        with open(big, "rb") as f:
            got = f.read(SIZES["scsi0"] + MiB)
        want = next(iter(plain.want.values()))["scsi0"]
        assert got[: len(want)] == want
        assert got[len(want) :] == b"\xee" * MiB
    finally:
        for dev_path in devices:
            subprocess.run(["losetup", "-d", dev_path], check=False)


def test_points_under_borg_and_restic(plain: PlainView, tmp_path: Path, snapfs: Snapfs) -> None:
    """The points directory, put under borg or restic and brought back, restores the same."""
    for tool in ("borg", "restic"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (make test installs it)")
    dest = tmp_path / "dest"
    for i in range(3):
        plain.change()
        copy(plain.make(full=i == 0), dest, keep=3)
    env = dict(
        os.environ,
        BORG_PASSPHRASE="test",
        BORG_BASE_DIR=str(tmp_path / "borg-home"),
        RESTIC_PASSWORD="test",
        RESTIC_CACHE_DIR=str(tmp_path / "restic-cache"),
    )

    def run(*argv: str, cwd: Path | None = None) -> None:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{argv}: {proc.stderr}"

    back = tmp_path / "borg-out"
    back.mkdir()
    run("borg", "init", "--encryption=repokey", str(tmp_path / "borg"))
    run("borg", "create", "--sparse", f"{tmp_path / 'borg'}::n1", "points", cwd=dest)
    run("borg", "extract", "--sparse", f"{tmp_path / 'borg'}::n1", cwd=back)
    run("restic", "init", "--repo", str(tmp_path / "restic"))
    run("restic", "backup", "--repo", str(tmp_path / "restic"), str(dest / "points"))
    run("restic", "restore", "latest", "--repo", str(tmp_path / "restic"), "--target",
        str(tmp_path / "restic-out"))  # fmt: skip
    for out in (back, tmp_path / "restic-out" / str(dest).lstrip("/")):
        snapfs("verify", str(out))
        for pid, disks in plain.want.items():
            for name, data in disks.items():
                target = tmp_path / "r.raw"
                snapfs("restore", str(out), "--at", pid, name, str(target), "--force")
                assert target.read_bytes() == data, (out, pid, name)


def test_paths_other_users_can_change_are_refused(
    plain: PlainView, tmp_path: Path, snapfs: Snapfs
) -> None:
    """Images name their backing files, and a restore writes as root: a backup directory or a
    target directory that another user can write is refused, with nothing written."""
    dest = tmp_path / "dest"
    copy(plain.make(full=True), dest, keep=3)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by everyone, not sticky
    proc = snapfs("restore", str(dest), "scsi0", str(shared / "x.raw"), check=False)
    assert proc.returncode == 2, proc.stderr
    assert "unsafe" in proc.stderr
    assert list(shared.iterdir()) == []
    owned = tmp_path / "owned"
    shutil.copytree(dest, owned)
    os.chown(owned, 1000, 1000)
    for args in (["points", str(owned)], ["verify", str(owned)]):
        proc = snapfs(*args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "owned by uid 1000" in proc.stderr


def test_a_plain_copy_refuses_unsafe_destinations_and_disk_names(
    plain: PlainView, tmp_path: Path, snapfs: Snapfs
) -> None:
    """`snapfs copy` without --keep, as root: a backup directory another user can change is
    refused, and so is a view whose snapfs.json names a disk that is not a plain file name
    (a view may be any directory someone points the copy at); nothing is written."""
    view = plain.make(full=True)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # writable by everyone, not sticky
    owned = tmp_path / "owned"
    owned.mkdir()
    os.chown(owned, 1000, 1000)
    for dest, why in ((shared / "dest", "unsafe"), (owned, "owned by uid 1000")):
        proc = snapfs("copy", str(view), str(dest), check=False)
        assert proc.returncode == 2, proc.stderr
        assert why in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert list(shared.iterdir()) == list(owned.iterdir()) == []
    facts = json.loads((view / "snapfs.json").read_text())
    disk = facts["disks"]["scsi0"]
    for bad in ("../evil", ".hidden", "a/b"):
        facts["disks"] = {bad: disk}
        (view / "snapfs.json").write_text(json.dumps(facts))
        dest = tmp_path / "dest"
        proc = snapfs("copy", str(view), str(dest), check=False)
        assert proc.returncode == CopyError.exit_code, proc.stderr
        assert "is not a plain file name" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not dest.exists()
        assert not (tmp_path / "evil.raw").exists()
