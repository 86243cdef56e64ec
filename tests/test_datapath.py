"""The splice data path (snapfs.datapath, NBDStream) against QEMU's own NBD server.

Replies go into a plain pipe standing in for /dev/fuse (splice and writev treat both alike),
so each test reads back exactly what the kernel would have received: header and payload.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import random
import socket
import struct
import subprocess
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

import snapfs.nbd.tuning
from dev.devvm import QEMU_IMG, DiskSpec, MiB, TestVM, poll, running_vm
from snapfs.datapath import DiskReader, SharedDepth
from snapfs.errors import NBDError
from snapfs.fuse.reply import ReadReply
from snapfs.nbd.tuning import SERVER_SNDBUF
from snapfs.nbd.wire import CHUNK_FLAG_DONE, CHUNK_OFFSET_DATA, NBDStream, StreamLost
from tests.conftest import (
    QEMU_IO,
    FakeDevice,
    Snapfs,
    export,
    fleecing,
    read_back,
    start_server,
    unexport,
    with_reader,
)

pytestmark = pytest.mark.qemu

KiB = 1024


@pytest.fixture
def vm(tmp_path: Path) -> Iterator[TestVM]:
    with running_vm(tmp_path, [DiskSpec("virtio0", "qcow2", "virtio")]) as vm:
        yield vm


@pytest.fixture
def sock(vm: TestVM, tmp_path: Path) -> str:
    path = start_server(vm, tmp_path)
    export(vm, "virtio0-fmt", "virtio0")
    return path


@pytest.mark.parametrize("limit", [1, 2, 3])
def test_read_aheads_stay_within_the_shared_depth(vm: TestVM, sock: str, limit: int) -> None:
    """A sequential reader asks for two ranges ahead each time. With a depth of one (its own
    request) it never reads ahead; with more it does, never past ``limit`` requests outstanding.
    The bytes are right in all cases."""
    expected = vm.expected["virtio0"]
    length = 64 * KiB
    depth = SharedDepth(limit)
    seen: list[int] = []

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        for i in range(20):
            offset = i * length
            ahead = [(offset + k * length, length) for k in (1, 2)]
            got = await read_back(reader, dev, i + 1, offset, length, ahead)
            assert got == expected[offset : offset + length]
            seen.append(reader.outstanding)  # read-aheads still on their way, at most

    reader = with_reader(sock, "virtio0", body, depth=depth)
    assert max(seen) <= min(limit, 2)
    if limit == 1:
        assert max(seen) == 0
        assert reader.hits == 0
    else:
        assert reader.hits >= 19 - 1  # all but the first read (and maybe one racing the end)
    assert reader.outstanding == 0


@pytest.mark.parametrize("confine", [0, 64 * KiB], ids=["whole", "confined"])
@pytest.mark.parametrize("pipe_size", [1 << 20, 64 * KiB], ids=["splice", "small-pipes"])
def test_reads_match_the_disk(vm: TestVM, sock: str, pipe_size: int, confine: int) -> None:
    """Random and sequential reads, with read-aheads used, dropped when done and dropped in
    flight. With 64 KiB pipes no 1 MiB reply fits: every one goes out by copying. Confined:
    one NBD request (with a simple reply) per 64 KiB block a read touches, answered in any
    order and reassembled."""
    expected = vm.expected["virtio0"]
    size = len(expected)
    rng = random.Random(11)

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        unique = 0
        for _ in range(60):
            length = rng.choice([512, 4096, 65536, 128 * KiB, MiB, rng.randrange(1, MiB)])
            offset = rng.randrange(0, size - 4 * length)
            # A sequential reader: its next reads are asked for ahead, one or two at a time,
            # and it stops after a while (the rest is dropped, done or in flight).
            for _ in range(rng.randrange(1, 5)):
                depth = rng.choice([0, 1, 2])
                ahead = [(offset + i * length, length) for i in range(1, depth + 1)]
                unique += 1
                got = await read_back(reader, dev, unique, offset, length, ahead)
                assert got == expected[offset : offset + length]
                offset += length

    reader = with_reader(sock, "virtio0", body, pipe_size=pipe_size, confine=confine)
    assert reader.hits > 10
    if pipe_size < MiB:
        assert reader.copied > 0
    elif not confine:
        assert reader.copied == 0
    # Confined: most reads are split (every read that is not inside one 64 KiB block).
    if confine:
        assert reader.requests > 1.5 * reader.fetches
    else:
        assert reader.requests == reader.fetches


def test_many_reads_in_flight_at_once(vm: TestVM, sock: str) -> None:
    """Concurrent READs of one disk are all in flight together, answered in any order, each
    with its own bytes; one that fails (past the end of the disk) fails alone."""
    expected = vm.expected["virtio0"]
    size = len(expected)
    rng = random.Random(5)
    reads = {
        u: (rng.randrange(0, size - MiB), rng.choice([4096, 65536, 300_000, MiB]))
        for u in range(1, 41)
    }
    reads[41] = (size - 4096, 8192)  # fails: past the end

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        failed: dict[int, NBDError | None] = {}
        got: dict[int, bytes] = {}

        def taker() -> None:
            while len(got) < len(reads) - 1:
                u, error, payload = dev.take()
                assert error == 0
                got[u] = payload

        one_failed = trio.Event()

        def done(u: int, err: NBDError | None) -> None:
            failed[u] = err
            one_failed.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: trio.to_thread.run_sync(taker, abandon_on_cancel=True))
            for u, (offset, length) in reads.items():
                reader.submit(ReadReply(u), offset, length, (), functools.partial(done, u))
            with trio.fail_after(60):
                await one_failed.wait()
        for u, (offset, length) in reads.items():
            if u != 41:
                assert got[u] == expected[offset : offset + length], u
        error = failed[41]
        assert error is not None
        assert error.errno == errno.EINVAL
        assert set(failed) == {41}

    for confine in (0, 64 * KiB):
        reader = with_reader(sock, "virtio0", body, confine=confine)
        assert reader.most_jobs > 1


def test_holes_arrive_as_zeros(vm: TestVM, tmp_path: Path) -> None:
    """A sparse qcow2 answers with hole chunks between data chunks."""
    image = tmp_path / "sparse.qcow2"
    subprocess.run([QEMU_IMG, "create", "-q", "-f", "qcow2", str(image), "8M"], check=True)
    subprocess.run(
        [
            QEMU_IO,
            "-f",
            "qcow2",
            "-c",
            "write -P 0x61 64k 64k",
            "-c",
            "write -P 0x62 1M 4k",
            "-c",
            "write -P 0x63 3M 1M",
            str(image),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    want = bytearray(8 * MiB)
    want[64 * KiB : 128 * KiB] = b"\x61" * (64 * KiB)
    want[MiB : MiB + 4096] = b"\x62" * 4096
    want[3 * MiB : 4 * MiB] = b"\x63" * MiB
    vm.qmp(
        "blockdev-add",
        driver="qcow2",
        **{"node-name": "sparse"},
        file={"driver": "file", "filename": str(image)},
    )
    sock = start_server(vm, tmp_path)
    export(vm, "sparse", "sparse")

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        for i, offset in enumerate(range(0, 8 * MiB, MiB)):
            ahead = [(o, MiB) for o in (offset + MiB, offset + 2 * MiB) if o < 8 * MiB]
            got = await read_back(reader, dev, i + 1, offset, MiB, ahead)
            assert got == want[offset : offset + MiB], offset
        got = await read_back(reader, dev, 99, 60 * KiB, 80 * KiB)
        assert got == want[60 * KiB : 140 * KiB]

    try:
        with_reader(sock, "sparse", body)
    finally:
        unexport(vm, "sparse")
        vm.qmp("blockdev-del", **{"node-name": "sparse"})


def test_an_error_reply_fails_one_read_only(vm: TestVM, sock: str) -> None:
    """A read past the end gets an error chunk from QEMU: that read fails with the server's
    errno, and the reader goes on serving."""
    expected = vm.expected["virtio0"]
    size = len(expected)

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        with pytest.raises(NBDError) as info:
            await reader.read(ReadReply(1), size - 4096, 8192, ())
        assert not isinstance(info.value, StreamLost)
        assert info.value.errno == errno.EINVAL
        assert reader.alive
        assert await read_back(reader, dev, 2, 0, 4096) == expected[:4096]

    with_reader(sock, "virtio0", body)


def test_a_refused_warm_up_read_is_harmless(vm: TestVM, tmp_path: Path) -> None:
    """An incremental snapshot whose first bytes are outside the backup: the reader's WARM_UP
    read at offset 0 gets an error reply, and the reader serves reads all the same."""
    vm.qmp("block-dirty-bitmap-add", node="virtio0-fmt", name="b0")
    vm.guest_write("virtio0", 16 * MiB, MiB, 0x42)
    want = bytes(vm.expected["virtio0"][16 * MiB : 17 * MiB])
    sock = start_server(vm, tmp_path)

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        assert reader.warmed_up
        assert reader.alive
        assert await read_back(reader, dev, 1, 16 * MiB, MiB) == want
        with pytest.raises(NBDError) as info:
            await reader.read(ReadReply(2), 0, 4096, ())
        assert info.value.errno == errno.EINVAL

    with fleecing(vm, tmp_path):
        reader = with_reader(sock, "acc", body)
    assert reader.warmed_up


def test_one_warm_up_read_per_qemu(vm: TestVM, sock: str) -> None:
    """Readers that share a SharedDepth share a QEMU: only the first makes the WARM_UP read."""
    depth = SharedDepth()

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        assert await read_back(reader, dev, 1, 0, 4096) == vm.expected["virtio0"][:4096]

    first = with_reader(sock, "virtio0", body, depth=depth)
    second = with_reader(sock, "virtio0", body, depth=depth)
    assert first.warmed_up
    assert depth.warmed_up
    assert not second.warmed_up


@pytest.mark.parametrize("tune", [True, False], ids=["tuned", "no-tune"])
def test_tuning_qemu_is_optional(vm: TestVM, sock: str, tune: bool) -> None:
    """With tuning QEMU's end of the stream gets a wide send buffer and the first reader makes
    the warm-up read; with --no-tune neither happens. The bytes are the same."""
    expected = vm.expected["virtio0"]

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        assert reader._stream is not None
        if tune:
            assert reader._stream.server_sndbuf >= SERVER_SNDBUF
        else:
            assert reader._stream.server_sndbuf == 0
        got = await read_back(reader, dev, 1, MiB, MiB, [(2 * MiB, MiB)])
        assert got == expected[MiB : 2 * MiB]
        got = await read_back(reader, dev, 2, 2 * MiB, MiB)
        assert got == expected[2 * MiB : 3 * MiB]

    reader = with_reader(sock, "virtio0", body, tune=tune)
    assert reader.warmed_up == tune


def queued(stream: NBDStream) -> int:
    """Bytes waiting in the stream's socket (FIONREAD)."""
    buf = fcntl.ioctl(stream._fd, termios.FIONREAD, b"\0" * 4)
    return int(struct.unpack("i", buf)[0])


def test_the_servers_send_buffer_is_widened(vm: TestVM, sock: str) -> None:
    """QEMU's end of a stream takes whole replies: a 4 MiB reply waits in our socket in full,
    where QEMU's default buffer lets through about 230 KiB until we read."""
    stream = NBDStream.connect(sock, "virtio0")
    try:
        assert stream.server_sndbuf >= SERVER_SNDBUF
        stream.send_read(1, 0, 4 * MiB)
        poll(lambda: queued(stream) >= 4 * MiB, what="the whole reply to be queued")
        data = bytearray()
        while True:
            handle, ctype, flags, length = stream.recv_chunk()
            assert handle == 1
            if ctype == CHUNK_OFFSET_DATA:
                stream.read_exact(8)
                chunk = bytearray(length - 8)
                stream.recv_into(memoryview(chunk))
                data += chunk
            if flags & CHUNK_FLAG_DONE:
                break
        assert data == vm.expected["virtio0"][: 4 * MiB]
    finally:
        stream.close()


def test_a_server_out_of_reach_keeps_its_buffer(
    vm: TestVM, sock: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the right to reach into QEMU (pidfd_getfd refused), reads work as before."""

    def refused(pidfd: int, fd: int) -> int:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(snapfs.nbd.tuning, "_pidfd_getfd", refused)

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        assert reader._stream is not None
        assert reader._stream.server_sndbuf == 0
        got = await read_back(reader, dev, 1, MiB, 2 * MiB, [(3 * MiB, MiB)])
        assert got == vm.expected["virtio0"][MiB : 3 * MiB]

    with_reader(sock, "virtio0", body)


def test_qemu_killed_ends_the_reader(vm: TestVM, sock: str) -> None:
    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        assert await read_back(reader, dev, 1, 0, 4096) == vm.expected["virtio0"][:4096]
        await trio.to_thread.run_sync(lambda: vm.stop(kill=True))
        with pytest.raises(StreamLost):
            await reader.read(ReadReply(2), 0, MiB, [(MiB, MiB)])
        assert not reader.alive
        with pytest.raises(StreamLost):
            await reader.read(ReadReply(3), 0, 4096, ())

    with_reader(sock, "virtio0", body)


def test_close_while_a_read_ahead_is_in_flight(vm: TestVM, sock: str) -> None:
    """close() ends the worker even while it waits on the socket; nothing hangs."""

    async def body(reader: DiskReader, dev: FakeDevice) -> None:
        await read_back(reader, dev, 1, 0, MiB, [(MiB, MiB), (2 * MiB, MiB)])
        reader.close()
        assert not reader.alive
        with pytest.raises(StreamLost):
            await reader.read(ReadReply(2), MiB, MiB, ())
        with trio.fail_after(10):  # the worker ends (it does not wait for QEMU)
            await reader.stopped.wait()

    with_reader(sock, "virtio0", body)


def test_stream_handshake_errors(vm: TestVM, sock: str, tmp_path: Path) -> None:
    stream = NBDStream.connect(sock, "virtio0")
    assert stream.size == len(vm.expected["virtio0"])
    stream.close()
    with pytest.raises(NBDError, match="nope"):
        NBDStream.connect(sock, "nope")
    with pytest.raises(NBDError, match="cannot connect"):
        NBDStream.connect(str(tmp_path / "missing.sock"), "virtio0")
    # Something that is not an NBD server.
    path = str(tmp_path / "other.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen()
        with pytest.raises(NBDError, match="did not answer"):
            NBDStream.connect(path, "virtio0", timeout=2)


def test_a_read_spanning_saved_and_unsaved_clusters(
    vm: TestVM, snapfs: Snapfs, tmp_path: Path
) -> None:
    """One read over a cluster copy-before-write saved (the guest wrote it after the snapshot)
    and one it did not returns the snapshot's bytes for both. (QEMU 7.2 gets this wrong for
    reads without structured replies.)"""
    before = vm.snapshot()["virtio0"]
    with snapfs.mounted(vm, tmp_path / "mnt") as mnt:
        vm.guest_write("virtio0", 0, 64 * KiB, 0x5A)
        vm.guest_write("virtio0", 2 * MiB + 64 * KiB, 64 * KiB, 0x5B)
        fd = os.open(mnt / "virtio0.raw", os.O_RDONLY)
        try:
            assert os.pread(fd, 128 * KiB, 0) == before[: 128 * KiB]
            assert os.pread(fd, MiB, 2 * MiB) == before[2 * MiB : 3 * MiB]
        finally:
            os.close(fd)
