"""The compiled READ path (snapfs/_fastpath.c, snapfs.fastpath) on real mounts of real QEMU.

Each test runs with the compiled path and without it (``SNAPFS_COMPILED=0``): both must give
the snapshot's bytes, and the log says which one answered.
"""

from __future__ import annotations

import errno
import os
import random
import re
import threading
from pathlib import Path

import pytest

from dev.devvm import DiskSpec, GuestIO, MiB, TestVM
from snapfs import fastpath, libc
from tests.conftest import Snapfs, disk_content

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

KiB = 1024
SIZE = 8 * MiB
READ_SIZES = (1, 511, 4096, 4097, 65536, 65536 + 3000, 200_000, MiB)


@pytest.fixture(params=["compiled", "python"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which READ path serves the mount (the snapfs processes inherit the environment)."""
    name: str = request.param
    monkeypatch.setenv("SNAPFS_COMPILED", "1" if name == "compiled" else "0")
    return name


def compiled_answers(snapfs: Snapfs, path: str, mounts: int) -> int:
    """READs the compiled path answered in the last mount, from the log, where it ran."""
    text = snapfs.log_file.read_text()
    answered = [int(n) for n in re.findall(r"compiled code answered (\d+) READs", text)]
    assert len(answered) == (mounts if path == "compiled" else 0)
    return answered[-1] if answered else 0


def test_the_compiled_path_is_built() -> None:
    """``make test`` installs a C compiler and Python's headers, so the suite tests it."""
    assert fastpath.available(), "snapfs._fastpath is not built: install gcc and python3-dev"


def random_read(rng: random.Random, size: int) -> tuple[int, int]:
    length = min(rng.choice(READ_SIZES), size)
    where = rng.choice(["any", "4k", "64k", "across"])
    if where == "across":  # straddle a 64 KiB boundary
        offset = rng.randrange(1, size // 65536) * 65536 - rng.randrange(1, 4096)
    else:
        offset = rng.randrange(0, size - length + 1)
        if where != "any":
            offset -= offset % (4096 if where == "4k" else 65536)
    return max(0, min(offset, size - length)), length


def read_in_threads(
    raw: Path, want: bytes, threads: int, reads: int, seed: int
) -> list[tuple[int, int]]:
    """``reads`` random preads in each of ``threads`` threads at once, with direct I/O (a full
    view is cached: every read must reach snapfs); the ranges that read wrong (none, if all
    is well)."""
    wrong: list[tuple[int, int]] = []
    failures: list[BaseException] = []

    def reader(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        fd = os.open(raw, os.O_RDONLY | os.O_DIRECT)
        try:
            for _ in range(reads):
                offset, length = random_read(rng, len(want))
                if os.pread(fd, length, offset) != want[offset : offset + length]:
                    wrong.append((offset, length))
        except BaseException as err:
            failures.append(err)
        finally:
            os.close(fd)

    workers = [threading.Thread(target=reader, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if failures:
        raise failures[0]
    return wrong


@pytest.mark.parametrize("cluster", ["64k", "1M"])
def test_scattered_reads_racing_the_guest_are_exact(
    path: str, cluster: str, shm_dir: Path, snapfs: Snapfs, tmp_path: Path
) -> None:
    """Eight threads read ranges of every size and alignment from a full view while the guest
    writes data and zeros and discards: every read is the snapshot's bytes."""
    spec = DiskSpec("scsi0", "qcow2", "scsi", size=SIZE, detect_zeroes="unmap")
    vm = TestVM(shm_dir, [spec], contents={"scsi0": disk_content(21)})
    with vm:
        with snapfs.mounted(vm, tmp_path / "mnt", "--fleecing-cluster", cluster) as mnt:
            want = vm.snapshot()["scsi0"]
            with GuestIO(vm, seed=5).storm():
                wrong = read_in_threads(mnt / "scsi0.raw", want, 8, 300, seed=1)
            assert wrong == []
        assert not vm.io_errors()
    assert (compiled_answers(snapfs, path, 1) > 0) == (path == "compiled")


def test_incremental_reads_racing_punches(
    path: str, shm_dir: Path, snapfs: Snapfs, tmp_path: Path
) -> None:
    """Reads of an incremental view race punches of the ranges they read and the guest's
    writes: a read gives the snapshot's bytes or ENODATA, never other bytes; once a punch
    has returned, its range reads ENODATA."""
    spec = DiskSpec("virtio0", "raw", "virtio", size=SIZE, detect_zeroes="on")
    vm = TestVM(shm_dir, [spec], contents={"virtio0": disk_content(22)})
    with vm:
        with snapfs.mounted(vm, tmp_path / "m0", "--incremental", "x", commit=True):
            pass
        rng = random.Random(7)
        for slot in rng.sample(range(SIZE // (128 * KiB)), 40):
            vm.guest_write("virtio0", slot * 128 * KiB, 64 * KiB, rng.randrange(1, 256))
        vm.guest_zero("virtio0", 5 * MiB, 64 * KiB, unmap=False)
        with snapfs.mounted(vm, tmp_path / "m1", "--incremental", "x") as mnt:
            want = vm.snapshot()["virtio0"]
            raw = mnt / "virtio0.raw"
            regions = [
                tuple(map(int, line.split()))
                for line in (mnt / "virtio0.dirty").read_text().splitlines()
            ]
            assert len(regions) >= 20
            punched: list[tuple[int, int]] = []
            wrong: list[tuple[int, int]] = []
            stop = threading.Event()

            def reader(k: int) -> None:
                r = random.Random(k)
                fd = os.open(raw, os.O_RDONLY)
                try:
                    while not stop.is_set():
                        off, length = r.choice(regions)
                        sub = r.randrange(0, length)
                        n = r.randrange(1, length - sub + 1)
                        try:
                            got = os.pread(fd, n, off + sub)
                        except OSError as err:
                            if err.errno != errno.ENODATA:
                                wrong.append((off + sub, -(err.errno or 0)))
                            continue
                        if got != want[off + sub : off + sub + n]:
                            wrong.append((off + sub, n))
                finally:
                    os.close(fd)

            readers = [threading.Thread(target=reader, args=(k,)) for k in range(6)]
            for t in readers:
                t.start()
            try:
                with GuestIO(vm, seed=8).storm():
                    fd = os.open(raw, os.O_RDWR)
                    try:
                        for off, length in rng.sample(regions, len(regions) // 2):
                            libc.fallocate(
                                fd,
                                libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE,
                                off,
                                length,
                            )
                            punched.append((off, length))
                    finally:
                        os.close(fd)
            finally:
                stop.set()
                for t in readers:
                    t.join()
            assert wrong == []
            fd = os.open(raw, os.O_RDONLY)
            try:
                for off, length in punched:
                    with pytest.raises(OSError, match="No data available"):
                        os.pread(fd, length, off)
                for off, length in regions:
                    if (off, length) not in punched:
                        assert os.pread(fd, length, off) == want[off : off + length]
            finally:
                os.close(fd)
        assert not vm.io_errors()
    assert (compiled_answers(snapfs, path, 2) > 0) == (path == "compiled")
