"""Sets of byte ranges: what a disk file may read, what its sidecar lists, where its data lies.

A ``Regions`` is a sorted list of disjoint, non-adjacent half-open ranges ``[start, end)``, kept
in two ``array('Q')`` so that millions of extents cost 16 bytes each and lookups are a bisect.
Invariant (checked by the constructor helpers, relied on everywhere): for every i,
``ends[i] > starts[i]`` and ``starts[i + 1] > ends[i]``.
"""

from __future__ import annotations

import operator
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence


class Regions:
    __slots__ = ("_ends", "_starts", "_total")

    def __init__(self) -> None:
        self._starts = array("Q")
        self._ends = array("Q")
        self._total = 0

    @classmethod
    def whole(cls, size: int) -> Regions:
        r = cls()
        if size > 0:
            r._starts.append(0)
            r._ends.append(size)
            r._total = size
        return r

    @classmethod
    def from_extents(cls, extents: Iterable[tuple[int, int]]) -> Regions:
        """Build from ``(offset, length)`` pairs in ascending order; adjacent ones are merged."""
        r = cls()
        for offset, length in extents:
            r.append(offset, length)
        return r

    def append(self, offset: int, length: int) -> None:
        """Add a range after all others (merged with the last one if adjacent), so a set can
        be built while streaming extents without an intermediate list."""
        if length <= 0:
            return
        starts, ends = self._starts, self._ends
        if ends and offset < ends[-1]:
            raise ValueError(f"extent at {offset} is not in ascending order")
        if ends and offset == ends[-1]:
            ends[-1] = offset + length
        else:
            starts.append(offset)
            ends.append(offset + length)
        self._total += length

    def extend(self, starts: Sequence[int], lengths: Sequence[int]) -> None:
        """``append`` for many ranges at once (ascending), in bulk: the millions of extents of
        a block-status walk do not go through Python one by one."""
        if not starts:
            return
        firsts = array("Q", starts)
        ends = array("Q", map(operator.add, firsts, lengths))
        # Ranges that touch or overlap each other, or empty ones: the careful way.
        if 0 in lengths or any(map(operator.le, firsts[1:], ends[:-1])):
            for offset, length in zip(firsts, lengths, strict=True):
                self.append(offset, length)
            return
        if self._ends and firsts[0] < self._ends[-1]:
            raise ValueError(f"extent at {firsts[0]} is not in ascending order")
        total = sum(lengths)
        if self._ends and firsts[0] == self._ends[-1]:
            self._ends[-1] = ends[0]
            firsts, ends = firsts[1:], ends[1:]
        self._starts.extend(firsts)
        self._ends.extend(ends)
        self._total += total

    def arrays(self) -> tuple[array[int], array[int]]:
        """The ranges as two arrays, starts and ends (the set's own: do not change them)."""
        return self._starts, self._ends

    def __len__(self) -> int:
        return len(self._starts)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """``(offset, length)`` pairs, ascending."""
        for s, e in zip(self._starts, self._ends, strict=True):
            yield s, e - s

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Regions):
            return NotImplemented
        return self._starts == other._starts and self._ends == other._ends

    def __repr__(self) -> str:
        shown = ", ".join(f"[{s}, {s + n})" for s, n in list(self)[:4])
        more = "" if len(self) <= 4 else f", ... ({len(self)} in all)"
        return f"Regions({shown}{more})"

    def nth(self, i: int) -> tuple[int, int]:
        """The i-th range as ``(offset, length)``."""
        return self._starts[i], self._ends[i] - self._starts[i]

    def copy(self) -> Regions:
        r = Regions()
        r._starts = array("Q", self._starts)
        r._ends = array("Q", self._ends)
        r._total = self._total
        return r

    @property
    def total(self) -> int:
        """Bytes covered."""
        return self._total

    def _index(self, offset: int) -> int:
        """Index of the last range starting at or before ``offset``, or -1."""
        return bisect_right(self._starts, offset) - 1

    def contains(self, offset: int, length: int) -> bool:
        """True if all of ``[offset, offset + length)`` is covered (an empty range always is)."""
        if length <= 0:
            return True
        i = self._index(offset)
        return i >= 0 and self._ends[i] >= offset + length

    def seek_data(self, offset: int) -> int | None:
        """The first covered offset at or after ``offset``, or None."""
        i = self._index(offset)
        if i >= 0 and self._ends[i] > offset:
            return offset
        if i + 1 < len(self._starts):
            return self._starts[i + 1]
        return None

    def seek_hole(self, offset: int) -> int:
        """The first uncovered offset at or after ``offset`` (may be the end of the file)."""
        i = self._index(offset)
        if i >= 0 and self._ends[i] > offset:
            return self._ends[i]
        return offset

    def covered_in(self, offset: int, length: int) -> int:
        """Bytes covered within ``[offset, offset + length)``."""
        end = offset + length
        i = max(self._index(offset), 0)
        n = 0
        while i < len(self._starts) and self._starts[i] < end:
            n += max(0, min(self._ends[i], end) - max(self._starts[i], offset))
            i += 1
        return n

    def remove(self, offset: int, length: int) -> int:
        """Take ``[offset, offset + length)`` out of the set; return how many bytes that removed."""
        if length <= 0:
            return 0
        end = offset + length
        removed = self.covered_in(offset, length)
        if not removed:
            return 0
        starts, ends = self._starts, self._ends
        lo = max(self._index(offset), 0)
        hi = lo
        while hi < len(starts) and starts[hi] < end:
            hi += 1
        keep_s: list[int] = []
        keep_e: list[int] = []
        for i in range(lo, hi):
            s, e = starts[i], ends[i]
            if e <= offset or s >= end:
                keep_s.append(s)
                keep_e.append(e)
                continue
            if s < offset:
                keep_s.append(s)
                keep_e.append(offset)
            if e > end:
                keep_s.append(end)
                keep_e.append(e)
        starts[lo:hi] = array("Q", keep_s)
        ends[lo:hi] = array("Q", keep_e)
        self._total -= removed
        return removed

    def intersect(self, other: Regions) -> Regions:
        """The ranges covered by both sets."""
        out: list[tuple[int, int]] = []
        a, b = list(self), list(other)
        i = j = 0
        while i < len(a) and j < len(b):
            s = max(a[i][0], b[j][0])
            e = min(a[i][0] + a[i][1], b[j][0] + b[j][1])
            if e > s:
                out.append((s, e - s))
            if a[i][0] + a[i][1] < b[j][0] + b[j][1]:
                i += 1
            else:
                j += 1
        return Regions.from_extents(out)
