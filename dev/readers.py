"""The benchmark's own readers of a regions list (``OFFSET LENGTH`` lines, as a ``.dirty``
sidecar has them), run by ``dev.bench`` as processes of their own:

    python -m dev.readers pread SRC REGIONS DEST [--threads N]
    python -m dev.readers nbd URI REGIONS [--requests N]

``pread`` copies the regions of a file (a disk of a view, through snapfs or nbdfuse) into the
same offsets of DEST with pread/pwrite, in requests of at most 1 MiB, with N threads (each
with one buffer of its own, reused, taking the next request when it is done), then fsyncs
DEST. ``nbd`` reads the regions straight from an NBD export with libnbd, N requests in flight,
from N buffers that are reused, and keeps no byte: the most QEMU's NBD server gives one
connection for these regions, with no FUSE and no destination (the ceiling of the incremental
workload).

Both fail (exit status 1, a message on stderr) on any short or failed read.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

CHUNK = 1 << 20


def requests(path: str) -> Iterator[tuple[int, int]]:
    """The regions of the list, cut into requests of at most CHUNK bytes."""
    with open(path) as f:
        for line in f:
            offset, length = (int(x) for x in line.split())
            while length:
                n = min(length, CHUNK)
                yield offset, n
                offset += n
                length -= n


def prefill(regions: str, dest: str) -> None:
    """Write zeros into the regions of ``dest`` (made if missing), so that the pread readers
    that copy into it later find its pages there: whichever runs first would otherwise also
    pay for the destination's new pages (on tmpfs more than the copy itself)."""
    zeros = bytes(CHUNK)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for offset, n in requests(regions):
            os.pwrite(fd, memoryview(zeros)[:n], offset)
    finally:
        os.close(fd)


def pread_copy(src: str, regions: str, dest: str, threads: int) -> None:
    """Copy the regions of ``src`` into ``dest`` with ``threads`` pread/pwrite threads.

    Each thread takes the next request from the one shared list and has one buffer of its
    own: no executor, no future per request, so the reader's own CPU (it shares the machine
    with the server it measures) stays small."""
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dest, os.O_WRONLY | os.O_CREAT, 0o600)
    work = requests(regions)
    lock = threading.Lock()
    failed: list[BaseException] = []

    def run() -> None:
        view = memoryview(bytearray(CHUNK))
        try:
            while not failed:
                with lock:
                    request = next(work, None)
                if request is None:
                    return
                offset, n = request
                got = os.preadv(sfd, [view[:n]], offset)
                if got != n:
                    raise OSError(f"short read at {offset}: {got} of {n} bytes")
                done = 0
                while done < n:
                    done += os.pwrite(dfd, view[done:n], offset + done)
        except BaseException as err:
            failed.append(err)

    try:
        workers = [threading.Thread(target=run) for _ in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if failed:
            raise failed[0]
        os.fsync(dfd)
    finally:
        os.close(sfd)
        os.close(dfd)


def nbd_read(uri: str, regions: str, in_flight: int) -> None:
    """Read the regions from the export at ``uri`` with ``in_flight`` requests at once."""
    import nbd  # Debian's python3-libnbd: only this reader needs it

    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        pool: dict[int, list[Any]] = {}  # idle buffers by size: a read fills its buffer
        pending: dict[int, Any] = {}  # cookie -> its buffer
        work = requests(regions)
        more = True
        while more or pending:
            while more and len(pending) < in_flight:
                try:
                    offset, n = next(work)
                except StopIteration:
                    more = False
                    break
                idle = pool.get(n)
                buf = idle.pop() if idle else nbd.Buffer(n)
                pending[h.aio_pread(buf, offset)] = buf
            if not pending:
                break
            cookie = h.aio_peek_command_completed()
            if cookie <= 0:
                h.poll(-1)
                continue
            h.aio_command_completed(cookie)  # raises if the read failed
            buf = pending.pop(cookie)
            pool.setdefault(buf.size(), []).append(buf)
    finally:
        h.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dev.readers", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("pread", help="copy the regions of a file with pread/pwrite")
    pr.add_argument("src")
    pr.add_argument("regions")
    pr.add_argument("dest")
    pr.add_argument("--threads", type=int, default=1)
    nb = sub.add_parser("nbd", help="read the regions from an NBD export with libnbd")
    nb.add_argument("uri")
    nb.add_argument("regions")
    nb.add_argument("--requests", type=int, default=16)
    args = p.parse_args(argv)
    try:
        if args.cmd == "pread":
            pread_copy(args.src, args.regions, args.dest, max(1, args.threads))
        else:
            nbd_read(args.uri, args.regions, max(1, args.requests))
    except Exception as err:
        print(f"dev.readers {args.cmd}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
