"""A disk of the view from its NBD export: its bytes (``NBDSource``, through libnbd), its
readable regions (the incremental bitmap), and where the snapshot reads as zeros.

NBD failures become the tree's SourceError (EIO); the session is told when they mean the
snapshot broke or the VM went away.
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Callable

from snapfs import qmp
from snapfs.errors import NBDError
from snapfs.nbd.client import Extents, NBDClient
from snapfs.nbd.wire import STATE_DIRTY, STATE_ZERO
from snapfs.regions import Regions
from snapfs.tree import Disk, SourceError, TreeError, Unreadable

BASE_ALLOCATION = "base:allocation"
# Block status requests of the allocation walk: QEMU answers up to this many bytes at once.
_STATUS_CHUNK = 1 << 30


def contexts(ds: qmp.DiskState) -> list[str]:
    """The metadata contexts a disk's libnbd connection asks for. QEMU answers a block status
    request for all of them at once, and base:allocation fails outside the copy-before-write
    access bitmap: an incremental view asks for its dirty bitmap only."""
    if ds.export_bitmap:
        return [f"qemu:dirty-bitmap:{ds.export_bitmap}"]
    return [BASE_ALLOCATION, *_guards(ds)]


def _guards(ds: qmp.DiskState) -> list[str]:
    """The contexts of the bitmaps that say where a block status may have come from the live
    disk (QEMU before 8.0; see _zeros)."""
    return [f"qemu:dirty-bitmap:{b}" for b in (ds.written, ds.copied) if b]


async def disk(client: NBDClient, ds: qmp.DiskState, on_broken: Callable[[str], None]) -> Disk:
    """The tree's Disk of one export: its source, what is readable, what reads as zeros."""
    zeros = Regions()
    if ds.export_bitmap:
        dirty = await _regions(client, f"qemu:dirty-bitmap:{ds.export_bitmap}", STATE_DIRTY)
        # Incremental view: nothing is shown as a hole (see tree.Disk): what is outside the
        # backup must fail a tool that reads it, not look like zeros.
    else:
        dirty = Regions.whole(client.size)
        # Full view: SEEK_HOLE and st_blocks follow what reads as zeros, so thin disks copy
        # sparsely.
        if client.can_meta_context(BASE_ALLOCATION):
            zeros = await _zeros(client, _guards(ds))
    # Punches are aligned to what copy-before-write can drop: its cluster, which is never
    # below 64 KiB, nor below the bitmap's granularity.
    source = NBDSource(client, ds.name, on_broken, ds.confine)
    made = Disk(
        name=ds.name,
        size=client.size,
        source=source,
        dirty=dirty,
        zeros=zeros,
        granularity=max(ds.granularity, ds.cbw_cluster),
    )
    source.readable = made.can_read
    return made


class NBDSource:
    """A disk's bytes from its NBD export; NBD failures become the tree's SourceError (EIO).

    The tree never asks for bytes outside the access bitmap, so an error QEMU answers to a read
    means the snapshot itself broke (copy-before-write could not save old data, e.g. the
    fleecing storage is full; QEMU then refuses every snapshot read, with EINVAL over NBD):
    ``on_broken`` is told. Except where the range was punched after the tree's check and
    before QEMU read it: QEMU refuses it as it refuses anything discarded, and the read is
    refused as a read of a punched range is (``readable`` says which, asked after the error).

    The splice data path (snapfs.datapath.SpliceReads) reads most of a disk's bytes through a
    connection of its own; what it cannot read comes here, and its errors are put in words by
    ``read_failed``.
    """

    def __init__(
        self, client: NBDClient, name: str, on_broken: Callable[[str], None], confine: int = 0
    ) -> None:
        self.client = client
        self.name = name
        self.on_broken = on_broken
        self.confine = confine  # see qmp.confine_reads
        #: Whether a range is readable now (the tree's Disk.can_read, once the Disk exists).
        self.readable: Callable[[int, int], bool] = _always

    def _failed(self, what: str, err: NBDError) -> SourceError:
        if not self.client.alive:
            self.on_broken("the VM went away (its NBD server is gone)")
        elif what == "reads":
            self.on_broken(
                f"{self.name}: the snapshot broke: QEMU refuses {what} "
                "(fleecing storage full, or copy-before-write failed)"
            )
        return SourceError(f"{self.name}: {err}", errno.EIO)

    def read_failed(self, err: NBDError, offset: int, length: int) -> TreeError:
        """What an error of QEMU's to a read of ``[offset, offset + length)`` means: the range
        was punched meanwhile (Unreadable), the snapshot broke, or the VM is gone."""
        if self.client.alive and not self.readable(offset, length):
            return Unreadable(f"{self.name}: {offset}+{length} was punched while it was read")
        return self._failed("reads", err)

    async def read_into(self, buf: bytearray, offset: int, length: int) -> None:
        try:
            await self.client.pread_into(buf, offset, length, confine=self.confine)
        except NBDError as err:
            raise self.read_failed(err, offset, length) from err

    async def discard(self, offset: int, length: int) -> None:
        try:
            await self.client.trim(offset, length)
        except NBDError as err:
            raise self._failed("discards", err) from err


def _always(offset: int, length: int) -> bool:
    return True


def _clipped(starts: list[int], lengths: list[int], end: int) -> tuple[list[int], list[int]]:
    """The ranges cut off at ``end`` (a server may answer past the range asked for)."""
    while starts and starts[-1] >= end:
        starts.pop()
        lengths.pop()
    if starts and starts[-1] + lengths[-1] > end:
        lengths[-1] = end - starts[-1]
    return starts, lengths


async def _walk(
    client: NBDClient, contexts: list[str]
) -> AsyncIterator[tuple[int, int, dict[str, Extents]]]:
    """Block status over the whole export, a request at a time: ``(pos, end, extents)`` where
    every context's extents cover ``[pos, end)`` (and maybe more)."""
    pos, size = 0, client.size
    while pos < size:
        got = await client.block_status_raw(pos, min(_STATUS_CHUNK, size - pos), contexts)
        end = min(size, *(e.end for e in got.values()))
        if end <= pos:
            raise NBDError(
                f"block status at {pos}: the server's extents do not go on", errno.EPROTO
            )
        yield pos, end, got
        pos = end


async def _regions(client: NBDClient, context: str, mask: int) -> Regions:
    """The ranges whose block-status flags have a bit of ``mask``, over the whole export; in
    bulk, so a million dirty extents cost a few arrays, not a million Python objects."""
    regions = Regions()
    async for _, end, got in _walk(client, [context]):
        regions.extend(*_clipped(*got[context].selected(mask), end))
    return regions


async def _zeros(client: NBDClient, guards: list[str]) -> Regions:
    """The ranges of a full view that read as zeros in the snapshot.

    ``guards`` (QEMU before 8.0, see qmp.confine_reads): the contexts of the bitmaps of every
    guest write since the snapshot point and of every cluster copy-before-write saved. There,
    block status of a range that starts in a saved cluster and runs on into one that is not
    reports the saved part from the live disk: a later guest zero write shows as zeros. The
    live disk only differs from the snapshot in saved clusters, which QEMU records in the
    copied bitmap before it marks them saved (and so before the guest's write goes on to the
    disk), and QEMU computes the bitmaps' extents after the allocation's in the same request:
    zeros are kept only where every guard is clean.
    """
    zeros = Regions()
    async for _, end, got in _walk(client, [BASE_ALLOCATION, *guards]):
        chunk = Regions()
        chunk.extend(*_clipped(*got[BASE_ALLOCATION].selected(STATE_ZERO), end))
        for guard in guards:
            for off, length in zip(*_clipped(*got[guard].selected(STATE_DIRTY), end),
                                   strict=True):  # fmt: skip
                chunk.remove(off, length)
        starts, ends = chunk.arrays()
        zeros.extend(starts, [e - s for s, e in zip(starts, ends, strict=True)])
    return zeros
