"""The FUSE layer under random operations, through the real kernel mount of an incremental view.

A hypothesis state machine opens and closes disk files, reads at random offsets and sizes (past
EOF, across region boundaries, larger than one FUSE request), seeks data and holes, stats,
punches holes, reads the sidecars and snapfs.json, reads from several threads at once and writes
to the guest's disks meanwhile. Every answer is checked against an independent model of the
tree: the snapshot's bytes (``TestVM.snapshot()`` at the mount) and the readable 64 KiB blocks
(the sidecar's regions minus what was punched). A watchdog turns a hung syscall into a failure.

The mount is shared by all examples, so the model carries over from one example to the next;
shrinking would replay steps against a changed tree, so it is off (the failing run's steps are
printed as they ran).
"""

from __future__ import annotations

import errno
import json
import os
import random
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dev.devvm import DiskSpec, TestVM
from snapfs import libc
from tests.conftest import Snapfs

pytestmark = [pytest.mark.qemu, pytest.mark.mount]

G = 65536  # bitmap granularity and punch block
MiB = 1 << 20
WATCHDOG_S = 240.0
PUNCH_BUDGET = 40  # punches over the whole run: each one shrinks the shared view for good
# The kernel splits a read into FUSE requests of at most 1 MiB of the caller's buffer pages
# (snapfs negotiates 256 pages). Each request is all or nothing, but when a later one fails the
# kernel returns what the earlier ones read: a read that may span two requests can come back
# short instead of failing with ENODATA. Only reads up to this size are always one request.
ONE_REQUEST = MiB - 4096


def punch(fd: int, offset: int, length: int) -> None:
    """fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)."""
    libc.fallocate(fd, libc.FALLOC_FL_PUNCH_HOLE | libc.FALLOC_FL_KEEP_SIZE, offset, length)


def outcome(fn: Any, *args: Any) -> Any:
    """What a syscall gave: its result, or the errno it failed with."""
    try:
        return fn(*args)
    except OSError as err:
        return errno.errorcode.get(err.errno or 0, err.errno)


# -- the model -------------------------------------------------------------------------------------


@dataclass
class DiskModel:
    """One disk file as the tree must serve it."""

    name: str
    size: int
    content: bytes
    dirty: list[tuple[int, int]]
    readable: set[int] = field(default_factory=set)  # 64 KiB block indices
    discarded: int = 0

    def __post_init__(self) -> None:
        for off, n in self.dirty:
            assert off % G == 0, (off, n)
            assert (off + n) % G == 0 or off + n == self.size, (off, n)
            self.readable |= set(range(off // G, -(-(off + n) // G)))

    def block_len(self, i: int) -> int:
        return min(G, self.size - i * G)

    @property
    def readable_bytes(self) -> int:
        return sum(self.block_len(i) for i in self.readable)

    def read(self, offset: int, size: int) -> bytes | str:
        n = max(0, min(size, self.size - offset))
        if n == 0:
            return b""
        if all(i in self.readable for i in range(offset // G, (offset + n - 1) // G + 1)):
            return self.content[offset : offset + n]
        return "ENODATA"

    def seek(self, offset: int, whence: int) -> int | str:
        """An incremental view shows no holes: bytes outside the backup (or punched) are not
        zeros of the snapshot, so they are data that fails to read."""
        if offset >= self.size:
            return "ENXIO"
        return offset if whence == os.SEEK_DATA else self.size

    def punch(self, offset: int, length: int) -> int | str:
        """The tree's rule: whole blocks inside the range; the final partial block too when the
        range reaches the disk's end."""
        if offset >= self.size:
            return "EINVAL"
        end = min(offset + length, self.size)
        start = -(-offset // G) * G
        stop = end if end == self.size else end // G * G
        gone = {i for i in range(start // G, -(-stop // G)) if i in self.readable}
        self.discarded += sum(self.block_len(i) for i in gone)
        self.readable -= gone
        return 0

    def runs(self) -> list[tuple[int, int]]:
        """The readable runs as (offset, length), ascending."""
        out: list[tuple[int, int]] = []
        for i in sorted(self.readable):
            if out and out[-1][0] + out[-1][1] == i * G:
                out[-1] = (out[-1][0], out[-1][1] + self.block_len(i))
            else:
                out.append((i * G, self.block_len(i)))
        return out

    def edges(self) -> list[int]:
        """Where reads and seeks get interesting: region boundaries, punched ones too, EOF."""
        out = {0, self.size}
        for i in range(-(-self.size // G) + 1):
            if (i in self.readable) != (i - 1 in self.readable):
                out.add(min(i * G, self.size))
        return sorted(out)


@dataclass
class World:
    """What every example shares: the mount, the VM, the model, the thread pool."""

    vm: TestVM
    mnt: Path
    disks: dict[str, DiskModel]
    pool: ThreadPoolExecutor
    rng: random.Random
    punches_left: int = PUNCH_BUDGET
    ops: int = 0
    seen: Counter[str] = field(default_factory=Counter)  # what the checks covered


# Where a read, seek or punch starts: anywhere up to 2 MiB past EOF; inside a readable run, or
# up to 2 MiB before the end of one longer than a FUSE request (reads that span requests and
# end outside); on, near (4 KiB),
# around (128 KiB) or far (2 MiB) from one of the model's edges. Drawn independently of the
# model (hypothesis needs the same draws for the same choices) and resolved against the
# model's current state by ``offset_of``.
WHERE = st.tuples(
    st.sampled_from(["any", "inside", "tail", "edge", "near", "around", "far"]),
    st.integers(0, 1 << 24),
    st.integers(-2 * MiB, 2 * MiB),
)
Where = tuple[str, int, int]


def offset_of(m: DiskModel, where: Where) -> int:
    how, r, delta = where
    if how == "any":
        return r % (m.size + 2 * MiB + 1)
    runs = m.runs()
    if how == "inside" and runs:
        start, length = runs[r % len(runs)]
        return start + delta % length
    long_runs = [run for run in runs if run[1] > ONE_REQUEST]
    if how == "tail" and long_runs:
        start, length = long_runs[delta % len(long_runs)]
        # Spread over (0, 2 MiB]: hypothesis draws few integers from the middle of a range.
        return max(start, start + length - 1 - (r * 2654435761) % (2 * MiB))
    edges = m.edges()
    edge = edges[r % len(edges)]
    if how == "edge":
        delta = 0
    elif how == "near":
        delta = delta % 8193 - 4096
    elif how == "around":
        delta = delta % (4 * G + 1) - 2 * G
    return max(0, edge + delta)


SIZES = st.one_of(
    st.integers(1, 8192),
    st.integers(1, 2 * MiB),
    st.sampled_from([1, 512, G, G + 1, MiB, MiB + 4096, 2 * MiB]),
)


@dataclass
class Handle:
    fd: int
    disk: str
    writable: bool


class FuseMachine(RuleBasedStateMachine):
    """Random syscalls against the mounted view; ``world`` is set by the test."""

    world: ClassVar[World]

    def __init__(self) -> None:
        super().__init__()
        self.handles: list[Handle] = []

    def teardown(self) -> None:
        for h in self.handles:
            os.close(h.fd)
        self.handles.clear()

    def model(self, disk: str) -> DiskModel:
        return self.world.disks[disk]

    def path(self, name: str) -> Path:
        return self.world.mnt / name

    # -- open / close --------------------------------------------------------------------------

    @precondition(lambda self: len(self.handles) < 8)
    @rule(disk=st.sampled_from(["virtio0", "scsi0"]), writable=st.booleans())
    def open_disk(self, disk: str, writable: bool) -> None:
        fd = os.open(self.path(f"{disk}.raw"), os.O_RDWR if writable else os.O_RDONLY)
        self.handles.append(Handle(fd, disk, writable))

    @precondition(lambda self: self.handles)
    @rule(pick=st.integers(0, 7))
    def close_disk(self, pick: int) -> None:
        h = self.handles.pop(pick % len(self.handles))
        os.close(h.fd)

    # -- reads and seeks -----------------------------------------------------------------------

    def handle(self, pick: int) -> Handle:
        """One of the open descriptors; with none open, a new read-only one."""
        if not self.handles:
            self.open_disk(["virtio0", "scsi0"][pick % 2], False)
        return self.handles[pick % len(self.handles)]

    @rule(pick=st.integers(0, 7), where=WHERE, size=SIZES)
    def pread(self, pick: int, where: Where, size: int) -> None:
        h = self.handle(pick)
        m = self.model(h.disk)
        offset = offset_of(m, where)
        got = outcome(os.pread, h.fd, size, offset)
        check_read(m, offset, size, got, f"pread({h.disk}, {size}, {offset})", self.world.seen)

    @rule(pick=st.integers(0, 7), whence=st.sampled_from([os.SEEK_DATA, os.SEEK_HOLE]), where=WHERE)
    def seek(self, pick: int, whence: int, where: Where) -> None:
        h = self.handle(pick)
        m = self.model(h.disk)
        offset = offset_of(m, where)
        got = outcome(os.lseek, h.fd, offset, whence)
        name = "SEEK_DATA" if whence == os.SEEK_DATA else "SEEK_HOLE"
        assert got == m.seek(offset, whence), f"lseek({h.disk}, {offset}, {name})"
        self.world.seen[f"{name} {'ENXIO' if got == 'ENXIO' else 'ok'}"] += 1

    @rule(
        reads=st.lists(
            st.tuples(st.sampled_from(["virtio0", "scsi0"]), WHERE, SIZES), min_size=2, max_size=6
        )
    )
    def concurrent_reads(self, reads: list[tuple[str, Where, int]]) -> None:
        jobs = [(disk, offset_of(self.model(disk), where), size) for disk, where, size in reads]

        def one(disk: str, offset: int, size: int) -> Any:
            fd = os.open(self.path(f"{disk}.raw"), os.O_RDONLY)
            try:
                return outcome(os.pread, fd, size, offset)
            finally:
                os.close(fd)

        futures = [self.world.pool.submit(one, *job) for job in jobs]
        for (disk, offset, size), fut in zip(jobs, futures, strict=True):
            check_read(
                self.model(disk),
                offset,
                size,
                fut.result(timeout=60),
                f"concurrent pread({disk}, {size}, {offset})",
                self.world.seen,
            )

    # -- attributes, sidecars, facts -----------------------------------------------------------

    @rule(disk=st.sampled_from(["virtio0", "scsi0"]))
    def stat(self, disk: str) -> None:
        m = self.model(disk)
        st_ = os.stat(self.path(f"{disk}.raw"))
        assert st_.st_size == m.size
        assert st_.st_blocks * 512 == m.size, disk  # no hole: every byte counts

    @rule(
        disk=st.sampled_from(["virtio0", "scsi0"]),
        offset=st.integers(0, 100),
        size=st.integers(1, 4096),
    )
    def sidecar(self, disk: str, offset: int, size: int) -> None:
        m = self.model(disk)
        text = "".join(f"{o} {n}\n" for o, n in m.dirty).encode()
        path = self.path(f"{disk}.dirty")
        assert path.read_bytes() == text
        fd = os.open(path, os.O_RDONLY)
        try:
            assert os.pread(fd, size, offset) == text[offset : offset + size]
            want = offset if offset < len(text) else "ENXIO"
            assert outcome(os.lseek, fd, offset, os.SEEK_DATA) == want
        finally:
            os.close(fd)

    @rule()
    def facts(self) -> None:
        facts = json.loads(self.path("snapfs.json").read_bytes())
        for name, m in self.world.disks.items():
            d = facts["disks"][name]
            assert d["bitmap"]["mode"] == "reuse"
            assert d["size"] == m.size
            assert d["dirty_bytes"] == sum(n for _, n in m.dirty)
            assert d["readable_bytes"] == m.readable_bytes, name
            assert d["discarded_bytes"] == m.discarded, name

    # -- changes -------------------------------------------------------------------------------

    @rule(
        disk=st.sampled_from(["virtio0", "scsi0"]),
        where=st.one_of(WHERE, st.just(("end", 0, 0))),
        length=st.one_of(
            st.integers(1, 3 * G), st.integers(1, MiB), st.sampled_from([G, 2 * G, 3 * G])
        ),
    )
    def punch(self, disk: str, where: Where, length: int) -> None:
        if self.world.punches_left <= 0:
            return  # (not a precondition: those must not depend on state shared by examples)
        self.world.punches_left -= 1
        m = self.model(disk)
        offset = m.size - 1 if where[0] == "end" else offset_of(m, where)
        writable = [h for h in self.handles if h.disk == disk and h.writable]
        fd = writable[0].fd if writable else os.open(self.path(f"{disk}.raw"), os.O_RDWR)
        try:
            got = outcome(punch, fd, offset, length)
        finally:
            if not writable:
                os.close(fd)
        before = m.discarded
        assert got == (None if m.punch(offset, length) == 0 else "EINVAL"), (offset, length)
        effect = got or ("discarded" if m.discarded > before else "nothing")
        self.world.seen[f"punch {effect}"] += 1

    @rule(
        disk=st.sampled_from(["virtio0", "scsi0"]),
        block=st.integers(0, 200),
        length=st.sampled_from([1, 512, 4096, G, 3 * G + 512]),
        how=st.sampled_from(["data", "zeros", "unmap", "discard"]),
        skew=st.integers(0, 4095),
    )
    def guest_write(self, disk: str, block: int, length: int, how: str, skew: int) -> None:
        """The guest keeps writing (data, zeros, discards, at any alignment): the view must
        keep showing the snapshot."""
        size = self.model(disk).size
        offset = min(block * 4096 + skew, size - length)
        vm = self.world.vm
        if how == "data":
            vm.guest_write(disk, offset, length, self.world.rng.randrange(1, 256))
        elif how == "discard":
            vm.guest_discard(disk, offset, length)
        else:
            vm.guest_zero(disk, offset, length, unmap=how == "unmap")

    @invariant()
    def count(self) -> None:
        self.world.ops += 1


def check_read(
    m: DiskModel, offset: int, size: int, got: Any, what: str, seen: Counter[str]
) -> None:
    """``got`` is what the model says, or (see ``ONE_REQUEST``) a readable prefix of it."""
    want = m.read(offset, size)
    if want == "ENODATA" and size > ONE_REQUEST and isinstance(got, bytes) and got:
        # The kernel split the read and stopped at the first request that failed.
        assert ONE_REQUEST <= len(got) < size, (what, len(got))
        want = m.read(offset, len(got))
        assert isinstance(want, bytes), (what, f"short read of {len(got)} bytes is not readable")
        seen["pread short (kernel split)"] += 1
    assert_same(got, want, what)
    seen[f"pread {kind(want, size)}"] += 1


def kind(result: Any, size: int = 0) -> str:
    """A short label of an outcome, for the coverage counts."""
    if isinstance(result, bytes):
        if not result:
            return "eof"
        return "bytes>1MiB" if len(result) > MiB else "bytes"
    return str(result) + (">1MiB" if size > MiB else "")


def assert_same(got: Any, want: bytes | str, what: str) -> None:
    """Compare without printing megabytes: the first differing byte is enough."""
    if isinstance(got, bytes) and isinstance(want, bytes):
        if got != want:
            first = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                min(len(got), len(want)),
            )
            pytest.fail(
                f"{what}: {len(got)} bytes, expected {len(want)}; first difference at +{first}"
            )
        return
    summary = f"{len(got)} bytes" if isinstance(got, bytes) else got
    want_s = f"{len(want)} bytes" if isinstance(want, bytes) else want
    assert summary == want_s, what


# -- the test --------------------------------------------------------------------------------------


@pytest.fixture
def fuzz_vm(tmp_path: Path) -> Iterator[TestVM]:
    """A qcow2 disk and a raw disk whose last 64 KiB block is partial."""
    machine = TestVM(
        tmp_path,
        [
            DiskSpec("virtio0", "qcow2", "virtio", size=6 * MiB),
            DiskSpec("scsi0", "raw", "scsi", size=4 * MiB + 20 * 1024),
        ],
        seed=3,
    )
    try:
        yield machine.start()
    finally:
        machine.stop()


def scattered_writes(vm: TestVM, rng: random.Random) -> None:
    """Guest writes all over both disks, including their first and last blocks, and one long
    run."""
    for name, spec in vm.disks.items():
        vm.guest_write(name, 0, 512, 0x01)
        vm.guest_write(name, spec.size - 4096, 4096, 0x02)
        # One region of more than two FUSE requests (1 MiB each).
        vm.guest_write(name, MiB, spec.size // 2 + 4096, 0x03)
        for _ in range(25):
            length = rng.choice([512, 4096, G, 3 * G + 512])
            offset = rng.randrange(0, spec.size - length) // 512 * 512
            vm.guest_write(name, offset, length, rng.randrange(1, 256))


def read_dirty(path: Path) -> list[tuple[int, int]]:
    return [(int(o), int(n)) for o, n in (line.split() for line in path.read_text().splitlines())]


def test_random_operations_through_the_mount(
    fuzz_vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    vm = fuzz_vm
    with snapfs.mounted(vm, tmp_path / "m0", "--incremental", "f", commit=True):
        pass
    rng = random.Random(1)
    scattered_writes(vm, rng)
    at_point = vm.snapshot()
    pool = ThreadPoolExecutor(max_workers=6, thread_name_prefix="fuzz-reader")
    try:
        with snapfs.mounted(vm, tmp_path / "m1", "--incremental", "f") as mnt:
            disks = {
                name: DiskModel(name, spec.size, at_point[name], read_dirty(mnt / f"{name}.dirty"))
                for name, spec in vm.disks.items()
            }
            for m in disks.values():
                assert 0 < m.readable_bytes < m.size, m.dirty
            # The last, partial block of scsi0 was written, so it is a region reaching EOF.
            assert disks["scsi0"].dirty[-1][0] + disks["scsi0"].dirty[-1][1] == disks["scsi0"].size
            world = World(vm, mnt, disks, pool, rng)
            run_with_watchdog(world, snapfs)
            print(
                f"\n{world.ops} steps: "
                + ", ".join(f"{k} {v}" for k, v in sorted(world.seen.items()))
            )
            assert world.ops > 0
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def run_with_watchdog(world: World, snapfs: Snapfs) -> None:
    """Run the state machine in a thread; a hang kills the serving process (so the stuck
    syscalls fail and the thread ends) and fails the test."""
    machine = type("BoundFuseMachine", (FuseMachine,), {"world": world})
    failure: list[BaseException] = []

    def run() -> None:
        try:
            run_state_machine_as_test(
                machine,
                settings=settings(
                    max_examples=40,
                    stateful_step_count=30,
                    deadline=None,
                    database=None,
                    phases=[Phase.explicit, Phase.generate],
                    print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow],
                ),
            )
        except BaseException as err:
            failure.append(err)

    worker = threading.Thread(target=run, name="fuzz", daemon=True)
    worker.start()
    worker.join(WATCHDOG_S)
    if worker.is_alive():
        for pid in snapfs.pids():
            os.kill(pid, 9)
        worker.join(30)
        pytest.fail(
            f"hang: the operations did not finish within {WATCHDOG_S:g}s (after {world.ops} steps)"
        )
    if failure:
        raise failure[0]
