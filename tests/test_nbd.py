"""snapfs.nbd against QEMU's own NBD server, in a real (paused) QEMU process."""

from __future__ import annotations

import errno
import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from dev.devvm import QEMU_IMG, DiskSpec, MiB, TestVM, running_vm
from snapfs.errors import NBDError
from snapfs.nbd.client import Extent, NBDClient, extents
from tests.conftest import export, fleecing, start_server, unexport

pytestmark = pytest.mark.qemu

KiB = 1024
GiB = 1024 * MiB
QEMU_IO = "qemu-io"


def run(fn: Callable[[], Any]) -> Any:
    return trio.run(fn)


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[TestVM]:
    with running_vm(tmp_path, [DiskSpec("virtio0", "qcow2", "virtio")]) as vm:
        yield vm


@pytest.fixture
def sock(vm: TestVM, tmp_path: Path) -> str:
    path = start_server(vm, tmp_path)
    export(vm, "virtio0-fmt", "virtio0")
    return path


def test_size_and_flags(vm: TestVM, sock: str) -> None:
    async def main() -> None:
        async with NBDClient.open(sock, "virtio0", meta_contexts=["base:allocation"]) as c:
            assert c.size == len(vm.expected["virtio0"])
            assert not c.can_trim  # read-only export
            with pytest.raises(NBDError) as info:
                await c.trim(0, 4096)
            assert info.value.errno == errno.EOPNOTSUPP
            assert c.can_meta_context("base:allocation")
            assert not c.can_meta_context("qemu:dirty-bitmap:nope")
            assert c.alive
        assert not c.alive

    run(main)


def test_reads_match_disk(vm: TestVM, sock: str) -> None:
    expected = vm.expected["virtio0"]
    rng = random.Random(7)

    async def main() -> None:
        async with NBDClient.open(sock, "virtio0") as c:
            buf = bytearray(MiB)
            for offset in (0, MiB, c.size - MiB):
                await c.pread_into(buf, offset)
                assert buf == expected[offset : offset + MiB]
            for _ in range(100):
                length = rng.randrange(1, MiB + 1)
                offset = rng.randrange(0, c.size - length + 1)
                await c.pread_into(buf, offset, length)
                assert buf[:length] == expected[offset : offset + length]
            # Larger than QEMU's 32 MiB maximum request: split and pipelined.
            whole = bytearray(c.size)
            await c.pread_into(whole, 0)
            assert whole == expected
            with pytest.raises(NBDError) as info:
                await c.pread_into(buf, c.size - 10)
            assert info.value.errno == errno.EINVAL

    run(main)


def test_concurrent_reads(vm: TestVM, sock: str) -> None:
    expected = vm.expected["virtio0"]
    rng = random.Random(8)
    jobs = [
        (rng.randrange(0, len(expected) - 256 * KiB), rng.choice([4 * KiB, 256 * KiB]))
        for _ in range(400)
    ]

    async def main() -> None:
        async with NBDClient.open(sock, "virtio0") as c:
            todo = iter(jobs)

            async def worker() -> None:
                buf = bytearray(256 * KiB)
                for offset, length in todo:
                    await c.pread_into(buf, offset, length)
                    assert buf[:length] == expected[offset : offset + length]

            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(worker)

    run(main)


def test_more_requests_than_the_socket_holds(vm: TestVM, sock: str) -> None:
    # QEMU serves 16 requests at a time and then stops reading requests until we read its
    # replies: sending blocks, libnbd wants to read and write at once, and neither the reads
    # nor the requests queued behind them may be stranded.
    expected = vm.expected["virtio0"]

    async def main() -> None:
        async with NBDClient.open(sock, "virtio0") as c:

            async def one(i: int) -> None:
                buf = bytearray(512)
                offset = (i * 4096) % c.size
                await c.pread_into(buf, offset)
                assert buf == expected[offset : offset + 512]

            with trio.fail_after(60):
                async with trio.open_nursery() as nursery:
                    for i in range(20000):
                        nursery.start_soon(one, i)

    run(main)


def test_cancelled_read_keeps_buffer_safe(vm: TestVM, sock: str) -> None:
    expected = vm.expected["virtio0"]

    async def main() -> None:
        async with NBDClient.open(sock, "virtio0") as c:
            buf = bytearray(8 * MiB)
            for _ in range(20):
                with trio.CancelScope() as scope:
                    scope.cancel()
                    await c.pread_into(buf, 0)
                # The cancelled read may still be in flight: this one must not be mixed with it.
                await c.pread_into(buf, 16 * MiB)
                assert buf == expected[16 * MiB : 24 * MiB]

    run(main)


def test_trim_reads_zeros(vm: TestVM, tmp_path: Path) -> None:
    # The test VM's own qcow2 node ignores discards; a node with discard=unmap does not.
    image = tmp_path / "trim.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(image), "16M"], check=True)
    subprocess.run(
        [QEMU_IO, "-f", "qcow2", "-c", "write -P 0x5a 0 16M", str(image)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    vm.qmp(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "trimmed"},
        discard="unmap",
        file={"driver": "file", "filename": str(image)},
    )
    sock = start_server(vm, tmp_path)
    export(vm, "trimmed", "trimmed", writable=True)

    async def main() -> None:
        async with NBDClient.open(sock, "trimmed") as c:
            assert c.can_trim
            await c.trim(4 * MiB, 2 * MiB)
            buf = bytearray(16 * MiB)
            await c.pread_into(buf, 0)
            assert buf[: 4 * MiB] == b"\x5a" * (4 * MiB)
            assert buf[4 * MiB : 6 * MiB] == bytes(2 * MiB)
            assert buf[6 * MiB :] == b"\x5a" * (10 * MiB)

    try:
        run(main)
    finally:
        unexport(vm, "trimmed")
        vm.qmp("blockdev-del", **{"node-name": "trimmed"})


def test_dirty_bitmap_context(vm: TestVM, tmp_path: Path) -> None:
    gran = 64 * KiB
    vm.qmp("block-dirty-bitmap-add", node="virtio0-fmt", name="b0")
    writes = [(100_000, 5_000), (3 * MiB, 200 * KiB), (3 * MiB + 300 * KiB, 1), (20 * MiB, gran)]
    for i, (offset, length) in enumerate(writes):
        vm.guest_write("virtio0", offset, length, 0x10 + i)
    # QEMU exports only disabled bitmaps on a read-only export.
    vm.qmp("block-dirty-bitmap-disable", node="virtio0-fmt", name="b0")
    dirty = bytearray(len(vm.expected["virtio0"]) // gran)
    for offset, length in writes:
        for cluster in range(offset // gran, (offset + length - 1) // gran + 1):
            dirty[cluster] = 1
    want: list[Extent] = []
    for cluster, flag in enumerate(dirty):
        if want and want[-1][2] == flag:
            want[-1] = (want[-1][0], want[-1][1] + gran, flag)
        else:
            want.append((cluster * gran, gran, flag))
    sock = start_server(vm, tmp_path)
    export(vm, "virtio0-fmt", "virtio0", bitmaps=["b0"])
    ctx = "qemu:dirty-bitmap:b0"

    async def main() -> None:
        async with NBDClient.open(sock, "virtio0", meta_contexts=[ctx]) as c:
            assert c.can_meta_context(ctx)
            got = [e async for e in extents(c, ctx)]
            assert got == want
            # Small chunks exercise the merging across block status calls.
            assert [e async for e in extents(c, ctx, chunk=gran)] == want
            first = await c.block_status(0, c.size, ctx)
            assert first[0] == (0, gran, 0)
            assert first[1] == (gran, gran, 1)
            # A sub-range is clipped to the range.
            assert [e async for e in extents(c, ctx, 3 * MiB + KiB, 3 * MiB + 2 * KiB)] == [
                (3 * MiB + KiB, KiB, 1)
            ]

    run(main)


def test_extents_of_large_sparse_disk(vm: TestVM, tmp_path: Path) -> None:
    size = 1024 * GiB
    cluster = 64 * KiB
    rng = random.Random(9)
    image = tmp_path / "big.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(image), str(size)], check=True)
    writes = sorted(
        {
            (rng.randrange(0, size // cluster - 16) * cluster, rng.randrange(1, 16) * cluster)
            for _ in range(300)
        }
    )
    commands: list[str] = []
    for offset, length in writes:
        commands += ["-c", f"write -P 0x33 {offset} {length}"]
    subprocess.run(
        [QEMU_IO, "-f", "qcow2", *commands, str(image)], check=True, stdout=subprocess.DEVNULL
    )
    data: list[list[int]] = []
    for offset, length in writes:
        if data and data[-1][1] >= offset:
            data[-1][1] = max(data[-1][1], offset + length)
        else:
            data.append([offset, offset + length])
    want: list[Extent] = []
    pos = 0
    for start, end in data:
        if start > pos:
            want.append((pos, start - pos, 3))
        want.append((start, end - start, 0))
        pos = end
    if pos < size:
        want.append((pos, size - pos, 3))

    vm.qmp(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "big"},
        file={"driver": "file", "filename": str(image)},
    )
    sock = start_server(vm, tmp_path)
    export(vm, "big", "big")

    async def main() -> None:
        async with NBDClient.open(sock, "big", meta_contexts=["base:allocation"]) as c:
            assert c.size == size
            got = [e async for e in extents(c, "base:allocation")]
            assert got == want

    try:
        run(main)
    finally:
        unexport(vm, "big")
        vm.qmp("blockdev-del", **{"node-name": "big"})


def test_qemu_killed(vm: TestVM, sock: str) -> None:
    expected = vm.expected["virtio0"]

    async def main() -> None:
        async with NBDClient.open(sock, "virtio0") as c:
            failures: list[NBDError] = []

            async def reader(seed: int) -> None:
                rng = random.Random(seed)
                buf = bytearray(MiB)
                while True:
                    offset = rng.randrange(0, c.size - MiB)
                    try:
                        await c.pread_into(buf, offset)
                    except NBDError as err:
                        failures.append(err)
                        return
                    assert buf == expected[offset : offset + MiB]

            with trio.fail_after(5):
                async with trio.open_nursery() as nursery:
                    for seed in range(4):
                        nursery.start_soon(reader, seed)
                    await trio.to_thread.run_sync(lambda: vm.stop(kill=True))
            assert len(failures) == 4
            assert all(err.errno == errno.EIO for err in failures)
            assert "went away" in str(failures[0])
            assert not c.alive
            with trio.fail_after(5), pytest.raises(NBDError) as info:
                await c.pread_into(bytearray(4096), 0)
            assert info.value.errno == errno.EIO

    run(main)


def test_idle_connection_notices_death(vm: TestVM, sock: str) -> None:
    async def main() -> None:
        async with NBDClient.open(sock, "virtio0") as c:
            vm.stop(kill=True)
            with trio.fail_after(5):
                await c.wait_lost()  # the driver notices EOF on its own
            assert not c.alive
            with pytest.raises(NBDError):
                await c.block_status(0, 4096, "base:allocation")

    run(main)


def test_connect_to_missing_export(vm: TestVM, sock: str) -> None:
    async def main() -> None:
        with trio.fail_after(5), pytest.raises(NBDError, match="cannot connect"):
            async with NBDClient.open(sock, "nope"):
                pass  # pragma: no cover

    run(main)


def test_copy_before_write_access_bitmap(vm: TestVM, tmp_path: Path) -> None:
    vm.qmp("block-dirty-bitmap-add", node="virtio0-fmt", name="b0")
    vm.guest_write("virtio0", MiB, 64 * KiB, 0x42)
    before = bytes(vm.expected["virtio0"])
    sock = start_server(vm, tmp_path)

    async def main() -> None:
        async with NBDClient.open(sock, "acc") as c:
            buf = bytearray(64 * KiB)
            await c.pread_into(buf, MiB)
            assert buf == before[MiB : MiB + 64 * KiB]
            # The guest overwrites it: the snapshot still reads the old data.
            vm.guest_write("virtio0", MiB, 4 * KiB, 0x43)
            await c.pread_into(buf, MiB)
            assert buf == before[MiB : MiB + 64 * KiB]
            with pytest.raises(NBDError) as info:
                await c.pread_into(buf, 2 * MiB)
            assert info.value.errno == errno.EINVAL
            assert c.alive  # a refused read does not break the connection
            await c.pread_into(buf, MiB, 4 * KiB)
            assert buf[: 4 * KiB] == before[MiB : MiB + 4 * KiB]

    with fleecing(vm, tmp_path):
        run(main)
