"""The answer to one READ: a handle the server gives the file system instead of a request id.

As fuser's reply objects and go-fuse's ``ReadResult``: whoever has the handle answers the
READ exactly once, in one of three ways, and never sees the request's id:

- ``data(payload)``: with bytes, on the thread that has the READ (the trio thread, or the
  intake's thread that read it, snapfs.fuse.server.Intake);
- ``error(errno)``: with an error, likewise;
- ``header(length)``: the reply's header for a payload spliced behind it through a
  ``ReplyPipe``, from any thread (the splice data path's worker).

``later(work)`` runs ``work()`` in a task of the server (interruptible: INTERRUPT answers
EINTR; a ``FuseErrno`` it raises is answered with its errno, anything else with EIO), for reads
that have to wait.

Invariant: a reply is answered at most once; a second answer is a bug and raises. A reply the
kernel gave up on (interrupted, unmounted) is still answered: the write is dropped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from snapfs.fuse import protocol as p

_HEADER_SIZE = p.OUT_HEADER.size


class Replies(Protocol):
    """Where a READ's answer goes: the server (trio thread), or the intake that read it."""

    def write_reply(self, iov: Sequence[bytes | bytearray | memoryview]) -> None: ...

    def reply_err(self, unique: int, err: int) -> None: ...

    def spawn_read(
        self, unique: int, reply: ReadReply, work: Callable[[], Awaitable[None]]
    ) -> None: ...


class ReplyTwice(RuntimeError):
    """A READ was answered twice (a bug of the file system)."""


class ReadReply:
    """One READ's answer; see the module."""

    __slots__ = ("_answered", "_server", "_unique", "spawned")

    def __init__(self, unique: int, server: Replies | None = None) -> None:
        # The server (or an intake) builds these; None serves tests that only splice.
        self._unique = unique
        self._server = server
        self._answered = False
        #: Whether ``later`` gave the work to a task of the server.
        self.spawned = False

    def _claim(self) -> None:
        if self._answered:
            raise ReplyTwice(f"READ {self._unique} answered twice")
        self._answered = True

    @property
    def answered(self) -> bool:
        return self._answered

    def data(self, payload: bytes | bytearray | memoryview) -> None:
        """Answer with these bytes (the thread that has the READ)."""
        self._claim()
        assert self._server is not None
        self._server.write_reply(
            (p.OUT_HEADER.pack(_HEADER_SIZE + len(payload), 0, self._unique), payload)
        )

    def error(self, errno: int) -> None:
        """Answer with an error (the thread that has the READ)."""
        self._claim()
        assert self._server is not None
        self._server.reply_err(self._unique, errno)

    def header(self, length: int) -> bytes:
        """The header of a ``length``-byte reply whose payload follows it in a ReplyPipe; the
        reply counts as answered (any thread)."""
        self._claim()
        return p.OUT_HEADER.pack(_HEADER_SIZE + length, 0, self._unique)

    def later(self, work: Callable[[], Awaitable[None]]) -> None:
        """Answer from ``work()``, run in a task of the server (trio thread); see the module."""
        assert self._server is not None
        self.spawned = True
        self._server.spawn_read(self._unique, self, work)
