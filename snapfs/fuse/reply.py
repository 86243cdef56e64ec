"""The answer to one READ: a handle the server gives the file system instead of a request id.

As fuser's reply objects and go-fuse's ``ReadResult``: whoever has the handle answers the
READ exactly once, in one of three ways, and never sees the request's id:

- ``data(payload)``: with bytes, on the trio thread;
- ``error(errno)``: with an error, on the trio thread;
- ``header(length)``: the reply's header for a payload spliced behind it through a
  ``ReplyPipe``, from any thread (the splice data path's worker).

``later(work)`` runs ``work()`` in a task of the server (interruptible: INTERRUPT answers
EINTR; a ``FuseErrno`` it raises is answered with its errno, anything else with EIO), for reads
that have to wait.

Invariant: a reply is answered at most once; a second answer is a bug and raises. A reply the
kernel gave up on (interrupted, unmounted) is still answered: the write is dropped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from snapfs.fuse import protocol as p

if TYPE_CHECKING:
    from snapfs.fuse.server import FuseServer

_HEADER_SIZE = p.OUT_HEADER.size


class ReplyTwice(RuntimeError):
    """A READ was answered twice (a bug of the file system)."""


class ReadReply:
    """One READ's answer; see the module."""

    __slots__ = ("_answered", "_server", "_unique", "spawned")

    def __init__(self, unique: int, server: FuseServer | None = None) -> None:
        # The server builds these; a server of None serves tests that only splice.
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
        """Answer with these bytes (trio thread)."""
        self._claim()
        assert self._server is not None
        self._server.write_reply(
            (p.OUT_HEADER.pack(_HEADER_SIZE + len(payload), 0, self._unique), payload)
        )

    def error(self, errno: int) -> None:
        """Answer with an error (trio thread)."""
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
