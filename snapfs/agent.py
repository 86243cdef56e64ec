"""Guest filesystem freeze around the snapshot point, through the QEMU guest agent (QGA).

The agent speaks JSON lines over a unix socket (a virtio-serial port in the guest; Proxmox puts
its host end at ``/var/run/qemu-server/VMID.qga``). A freeze makes the snapshot
application-consistent instead of crash-consistent; it is never worth a frozen guest::

    connect -> guest-sync-delimited (flushes stale replies) -> guest-fsfreeze-status
      -> guest-fsfreeze-freeze -> [the snapshot point] -> guest-fsfreeze-thaw

Invariants:
- Every step has a short timeout; a missing, silent or failing agent gives a warning and a
  crash-consistent snapshot (``FreezeResult.state == "failed"``), never an error.
- Once ``guest-fsfreeze-freeze`` has been sent, ``guest-fsfreeze-thaw`` is always sent after it,
  whatever the freeze answered or if it did not answer at all: the agent runs commands in order,
  so a late freeze is still followed by the thaw. The thaw runs shielded from cancellation.
- A guest that is already frozen (by someone else) is left alone: no freeze, no thaw.
- The guest must be running: freeze before QEMU's ``stop``, thaw after ``cont``.

Only ``frozen()`` (or a ``Freezer``) is meant to be used by the session.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import trio

log = logging.getLogger(__name__)

DEFAULT_AGENT_DIR = Path("/var/run/qemu-server")
DELIMITER = b"\xff"  # precedes the reply to guest-sync-delimited; resets the agent's parser

FreezeState = Literal["frozen", "skipped", "failed"]


def default_socket(vmid: str) -> Path:
    """Where Proxmox puts a VM's guest agent socket."""
    return DEFAULT_AGENT_DIR / f"{vmid}.qga"


@dataclass(frozen=True)
class FreezeConfig:
    """How to reach the agent and how long to wait for it (seconds)."""

    socket: Path
    timeout: float = 10.0  # guest-fsfreeze-freeze: flushing can legitimately take a while
    #: --freeze=required: a snapshot without frozen file systems is not taken at all.
    required: bool = False
    sync_timeout: float = 2.0  # connect, guest-sync-delimited, guest-fsfreeze-status
    thaw_timeout: float = 10.0


@dataclass
class FreezeResult:
    """What happened to the guest's file systems around the snapshot point."""

    state: FreezeState
    reason: str | None = None  # why not frozen
    filesystems: int | None = None  # as the agent counted them
    thaw: str | None = None  # None (no thaw needed), "ok", or why it failed
    frozen_ms: float | None = None  # from the freeze's reply to the thaw's
    already_frozen: bool = False  # frozen by someone else at the snapshot point

    @property
    def consistent(self) -> bool:
        """Whether the guest's file systems were frozen at the snapshot point."""
        return self.state == "frozen" or self.already_frozen

    def facts(self) -> dict[str, Any]:
        """For snapfs.json and ``snapfs status``."""
        return {
            "state": self.state,
            "reason": self.reason,
            "filesystems": self.filesystems,
            "thaw": self.thaw,
            "frozen_ms": self.frozen_ms,
            "already_frozen": self.already_frozen,
        }

    def describe(self) -> str:
        """One line for people: what the snapshot's consistency rests on."""
        if self.state == "frozen":
            thaw = "thawed" if self.thaw == "ok" else f"THAW FAILED: {self.thaw}"
            took = f" after {self.frozen_ms:.1f} ms" if self.frozen_ms is not None else ""
            count = f"{self.filesystems} file system(s) " if self.filesystems is not None else ""
            return f"frozen ({count}{thaw}{took})"
        return f"{self.state}: {self.reason}" if self.reason else self.state


class AgentError(Exception):
    """The agent failed or did not answer; never leaves this module."""


class Agent:
    """One connection to a guest agent. Replies are matched to requests by ``id``."""

    def __init__(self, stream: trio.SocketStream, path: Path) -> None:
        self.stream = stream
        self.path = path
        self._buf = bytearray()
        self._ids = itertools.count(int.from_bytes(os.urandom(3), "big"))

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, path: Path, timeout: float) -> AsyncIterator[Agent]:  # noqa: ASYNC109
        """Connect and synchronise within ``timeout`` seconds."""
        try:
            with trio.fail_after(timeout):
                stream = await trio.open_unix_socket(str(path))
        except trio.TooSlowError:
            raise AgentError(f"no connection to {path} within {timeout:g}s") from None
        except OSError as err:
            raise AgentError(f"cannot connect to {path}: {err.strerror or err}") from err
        async with stream:
            agent = cls(stream, path)
            await agent.sync(timeout)
            yield agent

    async def _send(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, OSError) as err:
            raise AgentError(f"lost the connection to {self.path}: {err}") from err

    async def _line(self) -> bytes:
        while (end := self._buf.find(b"\n")) < 0:
            await self._more()
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return line

    async def _reply(self, want: int) -> Any:
        """The reply whose id is ``want``; stale replies and events are skipped."""
        while True:
            line = (await self._line()).strip(DELIMITER + b" \r\t")
            if not line:
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                log.debug("guest agent: skipping unparsable %r", line[:200])
                continue
            if not isinstance(msg, dict) or msg.get("id") != want:
                log.debug("guest agent: skipping %r", msg)
                continue
            if "error" in msg:
                err = msg["error"]
                desc = err.get("desc", err) if isinstance(err, dict) else err
                raise AgentError(str(desc))
            return msg.get("return")

    async def sync(self, timeout: float) -> None:  # noqa: ASYNC109
        """Flush whatever an earlier client left: send 0xFF (resets the agent's parser), then
        guest-sync-delimited, and drop every byte up to the 0xFF that precedes its reply."""
        sync_id = next(self._ids) & 0x7FFFFFFF
        req = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
        try:
            with trio.fail_after(timeout):
                await self._send(DELIMITER + json.dumps(req).encode() + b"\n")
                while True:
                    while (at := self._buf.find(DELIMITER)) < 0:
                        self._buf.clear()
                        await self._more()
                    del self._buf[: at + 1]
                    if await self._sync_reply() == sync_id:
                        return
        except trio.TooSlowError:
            raise AgentError(
                f"no answer to guest-sync within {timeout:g}s "
                "(is qemu-guest-agent running in the guest?)"
            ) from None

    async def _more(self) -> None:
        try:
            chunk = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, OSError) as err:
            raise AgentError(f"lost the connection to {self.path}: {err}") from err
        if not chunk:
            raise AgentError(f"{self.path} closed the connection")
        self._buf += chunk

    async def _sync_reply(self) -> Any:
        line = (await self._line()).strip(DELIMITER + b" \r\t")
        try:
            msg = json.loads(line)
        except ValueError:
            return None
        return msg.get("return") if isinstance(msg, dict) else None

    async def command(
        self,
        cmd: str,
        timeout: float,  # noqa: ASYNC109
        args: dict[str, Any] | None = None,
    ) -> Any:
        """Run one command; AgentError on an error reply, a timeout or a lost connection."""
        req_id = next(self._ids)
        req: dict[str, Any] = {"execute": cmd, "id": req_id}
        if args:
            req["arguments"] = args
        log.debug("guest agent -> %s", cmd)
        try:
            with trio.fail_after(timeout):
                await self._send(json.dumps(req).encode() + b"\n")
                result = await self._reply(req_id)
        except trio.TooSlowError:
            raise AgentError(f"no answer to {cmd} within {timeout:g}s") from None
        except AgentError as err:
            raise AgentError(f"{cmd}: {err}") from err
        log.debug("guest agent <- %s %r", cmd, result)
        return result


class Freezer:
    """Freeze, then thaw, one guest; for callers that cannot use ``frozen()`` as a block.

    ``freeze()`` never raises (a failure is in the result); ``thaw()`` must be called after it,
    in a ``finally``, and is a no-op when nothing was frozen or attempted.
    """

    def __init__(
        self, config: FreezeConfig | None, *, vmid: str = "", skip: str | None = None
    ) -> None:
        self.config = config
        self.vmid = vmid
        self.skip = skip if skip is not None else None if config else "disabled (--no-freeze)"
        self.result = FreezeResult("skipped", self.skip)
        self._agent: Agent | None = None
        self._stack = contextlib.AsyncExitStack()
        self._sent_freeze = False
        self._frozen_at: float | None = None

    def _who(self) -> str:
        return f"VM {self.vmid}: " if self.vmid else ""

    async def freeze(self) -> FreezeResult:
        cfg = self.config
        if self.skip is not None or cfg is None:
            log.debug("%sguest freeze skipped: %s", self._who(), self.skip)
            return self.result
        if not _is_socket(cfg.socket):
            self.result = FreezeResult("skipped", f"no guest agent socket at {cfg.socket}")
            log.info(
                "%sno guest agent socket (%s): crash-consistent snapshot", self._who(), cfg.socket
            )
            return self.result
        try:
            self._agent = await self._stack.enter_async_context(
                Agent.connect(cfg.socket, cfg.sync_timeout)
            )
            status = await self._agent.command("guest-fsfreeze-status", cfg.sync_timeout)
            if status == "frozen":
                # Consistent as long as whoever froze them keeps them so; not ours to thaw.
                self.result = FreezeResult(
                    "skipped",
                    "the guest's file systems were already frozen (by another tool?); left alone",
                    already_frozen=True,
                )
                log.warning("%sguest agent: %s", self._who(), self.result.reason)
                return self.result
            self._sent_freeze = True
            count = await self._agent.command("guest-fsfreeze-freeze", cfg.timeout)
        except AgentError as err:
            self.result = FreezeResult("failed", str(err))
            log.warning(
                "%sguest agent: %s: the snapshot is crash-consistent only", self._who(), err
            )
            return self.result
        self._frozen_at = trio.current_time()
        self.result = FreezeResult(
            "frozen", filesystems=int(count) if isinstance(count, int) else None
        )
        log.info("%sguest file systems frozen (%s)", self._who(), count)
        return self.result

    async def thaw(self) -> None:
        """Thaw if a freeze was sent; never raises, never cancelled; logs an error if the guest
        may still be frozen."""
        with trio.CancelScope(shield=True):
            try:
                if self._sent_freeze:
                    await self._thaw()
            finally:
                self._sent_freeze = False
                await self._stack.aclose()
                self._agent = None

    async def _thaw(self) -> None:
        cfg = self.config
        assert cfg is not None
        errors: list[str] = []
        for attempt in range(2):
            try:
                if attempt or self._agent is None:
                    # The first connection broke: a fresh one (the agent serialises commands).
                    await self._stack.aclose()
                    self._stack = contextlib.AsyncExitStack()
                    self._agent = await self._stack.enter_async_context(
                        Agent.connect(cfg.socket, cfg.sync_timeout)
                    )
                count = await self._agent.command("guest-fsfreeze-thaw", cfg.thaw_timeout)
            except AgentError as err:
                errors.append(str(err))
                if "no answer" in str(err):
                    break  # a second try would only wait again
                continue
            self.result.thaw = "ok"
            if self._frozen_at is not None:
                self.result.frozen_ms = round((trio.current_time() - self._frozen_at) * 1000, 3)
                log.info(
                    "%sguest file systems thawed (%s) after %.1f ms",
                    self._who(),
                    count,
                    self.result.frozen_ms,
                )
            else:
                log.info("%sguest thaw sent after an unanswered freeze (%s)", self._who(), count)
            return
        self.result.thaw = "; ".join(errors)
        log.error(
            "%sTHE GUEST MAY STILL BE FROZEN: thaw failed (%s); run "
            "'qm guest cmd %s fsfreeze-thaw' or restart qemu-guest-agent in the guest",
            self._who(),
            self.result.thaw,
            self.vmid or "VMID",
        )


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


@contextlib.asynccontextmanager
async def frozen(
    config: FreezeConfig | None, *, vmid: str = "", skip: str | None = None
) -> AsyncIterator[FreezeResult]:
    """Freeze the guest's file systems for the body of the block, thaw after it (always).

    ``config=None`` or a ``skip`` reason (e.g. "the VM is not running") does nothing and yields
    a "skipped" result. The yielded result is completed with the thaw's outcome on exit.
    """
    freezer = Freezer(config, vmid=vmid, skip=skip)
    try:
        yield await freezer.freeze()
    finally:
        await freezer.thaw()
