"""`snapfs copy` reading an NBD export itself (provider.DirectReads), against a FAKE NBD server
(tests/fake_nbd.py): libnbd with many requests in flight, answered out of order, one of them
failing, the connection breaking. The fast tier; test_chain.py runs the same path on QEMU.
"""

from __future__ import annotations

import os
import random
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from snapfs import provider
from snapfs.errors import CopyError
from snapfs.nbd.pool import Pool
from tests.fake_nbd import FakeNBD

KiB = 1024
MiB = 1 << 20
SIZE = 16 * MiB
CLUSTER = 64 * KiB


def content() -> bytes:
    """Random data with zero runs: whole chunks, whole clusters and pieces of both."""
    rng = random.Random(7)
    data = bytearray(rng.randbytes(SIZE))
    for start, length in [(MiB, MiB), (3 * MiB, CLUSTER), (5 * MiB + 100, 5000)]:
        data[start : start + length] = bytes(length)
    return bytes(data)


def regions() -> list[tuple[int, int]]:
    """Scattered regions of many sizes and alignments, none longer than a chunk, in order."""
    rng = random.Random(8)
    out = [(MiB, MiB), (3 * MiB, CLUSTER)]
    pos = 4 * MiB
    while pos < SIZE - 2 * MiB:
        length = rng.choice([1, 4095, 4 * KiB, CLUSTER, CLUSTER + 1, 300_000, MiB])
        out.append((pos, length))
        pos += length + rng.choice([0, 1, 4 * KiB, CLUSTER])
    return out


@pytest.fixture
def data() -> bytes:
    return content()


def copy(sock: Path, dest: Path, confine: int, wanted: list[tuple[int, int]]) -> provider.DiskCopy:
    """Copy ``wanted`` from the export at ``sock`` into a new file ``dest``."""
    pool = Pool(str(sock), "disk", clients=1, what="the fake export", error=CopyError, tune=True)
    fd = os.open(dest, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, SIZE)
        job = provider.DiskCopy(
            fd,
            provider.FileTarget(fd, in_place=False),
            discard=False,
            progress=lambda n: None,
            direct=provider.DirectReads(pool, confine),
        )
        job.copy(wanted)
        return job
    finally:
        os.close(fd)
        pool.close()


def expected(data: bytes, wanted: list[tuple[int, int]]) -> bytes:
    out = bytearray(SIZE)
    for offset, length in wanted:
        out[offset : offset + length] = data[offset : offset + length]
    return bytes(out)


@pytest.mark.parametrize("confine", [0, CLUSTER], ids=["whole", "confined"])
def test_answers_out_of_order_are_written_where_they_belong(
    tmp_path: Path, data: bytes, confine: int
) -> None:
    """The fake answers the requests in flight in a random order and splits them into chunks
    and holes; every byte lands at its place, zero chunks become holes, and where reads must
    be confined no request crosses a cluster."""
    wanted = regions()
    with FakeNBD(tmp_path / "s", data, shuffle=True, chunk=16 * KiB) as fake:
        job = copy(tmp_path / "s", tmp_path / "out", confine, wanted)
        asked = list(fake.reads)
    assert (tmp_path / "out").read_bytes() == expected(data, wanted)
    total = sum(n for _, n in wanted)
    assert job.stats.read == total
    assert job.stats.zero >= MiB + CLUSTER  # the zero chunk and the zero cluster
    assert job.stats.written + job.stats.zero == total
    assert sum(n for _, n in asked) == total  # each wanted byte asked for once
    step = confine or provider.CHUNK
    assert all(o // step == (o + n - 1) // step for o, n in asked)


@pytest.mark.parametrize("confine", [0, CLUSTER], ids=["whole", "confined"])
def test_a_failing_request_among_many_fails_the_copy(
    tmp_path: Path, data: bytes, confine: int
) -> None:
    """One request in the middle fails (EIO) while many are in flight: the copy stops with a
    one-line error naming the export. Chunks are written in the order their replies come, so
    each chunk holds all its bytes or none, the failed one none, and nothing else is written."""
    wanted = regions()
    bad = wanted[len(wanted) // 2]
    fail = [(bad[0] + bad[1] - 1, 1)]
    with (
        FakeNBD(tmp_path / "s", data, shuffle=True, fail=fail),
        pytest.raises(CopyError, match="reading the fake export") as err,
    ):
        copy(tmp_path / "s", tmp_path / "out", confine, wanted)
    assert "\n" not in str(err.value)
    out = (tmp_path / "out").read_bytes()
    chunks = []  # as DiskCopy cuts the regions: at every CHUNK boundary
    for offset, length in wanted:
        end = offset + length
        while offset < end:
            n = min(end, (offset // provider.CHUNK + 1) * provider.CHUNK) - offset
            chunks.append((offset, n))
            offset += n
    untouched = bytearray(out)
    for offset, n in chunks:
        got = out[offset : offset + n]
        assert got in (data[offset : offset + n], bytes(n)), f"chunk {offset}+{n} half written"
        if offset <= fail[0][0] < offset + n:
            assert data[offset : offset + n] == bytes(n) or got == bytes(n)
        untouched[offset : offset + n] = bytes(n)
    assert untouched == bytes(SIZE)  # nothing outside the regions


def test_a_broken_connection_fails_the_copy(tmp_path: Path, data: bytes) -> None:
    """The server sends garbage and hangs up after a few replies: an error, not a hang."""
    with (
        FakeNBD(tmp_path / "s", data, break_after=5),
        pytest.raises(CopyError, match="reading the fake export"),
    ):
        copy(tmp_path / "s", tmp_path / "out", 0, regions())


@pytest.mark.parametrize("tune", [False, True], ids=["plain", "tuned"])
def test_a_server_that_never_answers_the_handshake_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tune: bool
) -> None:
    """A socket that accepts and then says nothing (a stopped QEMU, a stuck qemu-nbd): the
    connection fails with one line within the connect timeout, it does not hang."""
    monkeypatch.setattr("snapfs.nbd.pool.CONNECT_TIMEOUT", 0.5)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "s"))
        listener.listen(1)
        pool = Pool(str(tmp_path / "s"), "disk", clients=1, what="the mute export",
                    error=CopyError, tune=tune)  # fmt: skip
        try:
            with pytest.raises(CopyError, match="the mute export: no NBD handshake") as err:
                pool.connect()
        finally:
            pool.close()
            (tmp_path / "s").unlink()
    assert "\n" not in str(err.value)


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path: Path) -> Iterator[None]:
    yield
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["out"], ["out", "s"], ["s"])


def test_a_slot_tiles_its_chunk_and_keeps_few_views() -> None:
    """A chunk buffer's requests cover the chunk exactly, in order, none crossing a ``confine``
    block, each a view of the buffer where its bytes belong; the buffer grows for a longer
    chunk, and the slot keeps at most 64 shapes of views."""
    rng = random.Random(9)
    slot = provider._Slot()
    for _ in range(500):
        confine = rng.choice([0, CLUSTER, MiB])
        n = rng.choice([1, 4095, CLUSTER, CLUSTER + 1, 300_000, MiB, rng.randrange(1, MiB)])
        pos = rng.randrange(0, SIZE - n)
        pieces = slot.requests(pos, n, confine)
        slot.buf[:n] = rng.randbytes(n)
        at = pos
        for piece, offset in pieces:
            assert offset == at
            assert piece.to_bytearray() == slot.buf[at - pos : at - pos + piece.size()]
            at += piece.size()
            if confine:
                assert offset // confine == (at - 1) // confine
        assert at == pos + n
        assert len(pieces) == (1 if not confine else (pos + n - 1) // confine - pos // confine + 1)
        assert len(slot.buf) >= n
        assert len(slot._shapes) <= 64


def test_a_server_that_stops_answering_fails_the_copy(
    tmp_path: Path, data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server takes the requests in and answers none: the copy gives up after
    REPLY_TIMEOUT with one line naming the export, and cuts the connection instead of waiting
    for the replies (the fake holds them for 30 s, then hangs up)."""
    monkeypatch.setattr(provider, "REPLY_TIMEOUT", 1.0)
    hold = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            copy(tmp_path / "s", tmp_path / "out", 0, regions())
        except BaseException as err:
            errors.append(err)

    with FakeNBD(tmp_path / "s", data, hold=hold):
        worker = threading.Thread(target=run)
        worker.start()
        worker.join(20)
        ended_while_held = not worker.is_alive()
        hold.set()
        worker.join()
    assert ended_while_held, "the copy waited for replies the server withheld"
    assert len(errors) == 1
    assert isinstance(errors[0], CopyError)
    assert str(errors[0]) == "the fake export did not answer in 1 s"


def test_the_copy_reads_and_writes_as_a_batch_thread_and_is_itself_again_after(
    tmp_path: Path, data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The thread that reads QEMU's replies and writes them runs as SCHED_BATCH while it
    copies (snapfs.sched.batch_scheduled), and as it was scheduled before once it is done."""
    seen: set[int] = set()
    after: list[int] = []
    write = provider.FileTarget.write

    def noting(target: provider.FileTarget, offset: int, chunk: memoryview) -> None:
        seen.add(os.sched_getscheduler(0))
        write(target, offset, chunk)

    monkeypatch.setattr(provider.FileTarget, "write", noting)
    wanted = regions()

    def run() -> None:
        copy(tmp_path / "s", tmp_path / "out", 0, wanted)
        after.append(os.sched_getscheduler(0))

    with FakeNBD(tmp_path / "s", data):
        t = threading.Thread(target=run)
        t.start()
        t.join(60)
    assert (tmp_path / "out").read_bytes() == expected(data, wanted)
    assert seen == {os.SCHED_BATCH}
    assert after == [os.SCHED_OTHER]
