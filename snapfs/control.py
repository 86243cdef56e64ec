"""The control socket of a serving process: one request per connection, one JSON object per
line each way (snapfs.records: Request, then Ack and/or Outcome).

The serving side (``serve``) answers ``status`` with the view's facts and ``umount`` with the
teardown's outcome, acknowledged at once when asked (so a client tells a stopped process from a
long teardown). The client side (``request``, ``umount``) bounds every wait and says in one line
what to do about a serving process that is stopped or gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import trio

from snapfs import qmp, state
from snapfs.errors import StateError, TeardownError, by_exit_code
from snapfs.records import Ack, Facts, Outcome, Request

log = logging.getLogger(__name__)

# How long the CLI waits for a serving process to answer a control request (a status, or the
# acknowledgement of an umount): its event loop answers at once unless it is stopped or hung.
CONTROL_TIMEOUT = 5.0
# Besides the QMP teardown (qmp.teardown_bound): the FUSE unmount, closing the NBD connections
# (a second each at most) and the QMP connection.
_UMOUNT_SLACK = 30.0


class Handler(Protocol):
    """What the serving process answers."""

    def status(self) -> Facts: ...

    async def umount(self, commit: bool, acknowledge: Callable[[], Awaitable[bool]]) -> Outcome:
        """Unmount and tear down; call ``acknowledge()`` once the request is taken (False:
        the client is gone, do nothing)."""
        ...


async def serve(
    path: Path, handler: Handler, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on ``path`` (0600) and answer requests until cancelled."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(str(path))
    os.chmod(path, 0o600)
    sock.listen(4)
    task_status.started()

    async def answer(stream: trio.SocketStream) -> None:
        await _answer(stream, handler)

    await trio.serve_listeners(answer, [trio.SocketListener(sock)])


async def _send(stream: trio.SocketStream, message: Ack | Outcome) -> bool:
    with trio.CancelScope(shield=True), contextlib.suppress(trio.BrokenResourceError):
        await stream.send_all(message.to_json().encode() + b"\n")
        return True
    return False


async def _answer(stream: trio.SocketStream, handler: Handler) -> None:
    async with stream:
        data = b""
        with trio.move_on_after(CONTROL_TIMEOUT):
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
        if not data.endswith(b"\n"):
            return
        try:
            req = Request.from_json(data, "control request")
        except ValueError as err:
            await _send(stream, Outcome(ok=False, error=f"bad request: {err}"))
            return
        if req.op == "status":
            await _send(stream, Outcome(ok=True, status=handler.status()))
        elif req.op == "umount":
            if hung_up(stream):
                # The client gave up waiting (this process was stopped): not acted upon.
                log.warning("ignoring an umount request its client gave up")
                return

            async def acknowledge() -> bool:
                return not req.ack or await _send(stream, Ack())

            await _send(stream, await handler.umount(req.commit, acknowledge))
        else:
            await _send(stream, Outcome(ok=False, error=f"unknown op {req.op!r}"))


def hung_up(stream: trio.SocketStream) -> bool:
    """Whether the peer of a control connection has closed it (EOF is waiting)."""
    with socket.socket(fileno=os.dup(stream.socket.fileno())) as s:
        try:
            return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True


class _Control:
    """The CLI's end of one control connection: one request, then reply lines, every wait
    bounded. The errors say what to do about a serving process that is stopped or gone."""

    def __init__(self, vmid: str) -> None:
        self.vmid = vmid
        self.pid = state.read_pid(state.state_dir(vmid))
        self.who = f"the serving process of VM {vmid}" + (f" (pid {self.pid})" if self.pid else "")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = b""

    def __enter__(self) -> _Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def not_answering(self) -> StateError:
        resume = f"resume it (kill -CONT {self.pid}) and retry, or " if self.pid else ""
        return StateError(
            f"{self.who} does not answer (stopped?); nothing was done: {resume}kill it and "
            f"run 'snapfs cleanup {self.vmid}'"
        )

    def send(self, req: Request) -> None:
        path = state.state_dir(self.vmid) / "control.sock"
        self.sock.settimeout(CONTROL_TIMEOUT)
        try:
            self.sock.connect(str(path))
            self.sock.sendall(req.to_json().encode() + b"\n")
        except (FileNotFoundError, ConnectionRefusedError) as err:
            if self.pid is not None and state.alive(self.pid) and not path.exists():
                raise StateError(f"{self.who} is still setting up; try again") from err
            raise StateError(
                f"the serving process of VM {self.vmid} is gone (run 'snapfs cleanup {self.vmid}')"
            ) from err
        except TimeoutError as err:
            raise self.not_answering() from err
        except OSError as err:
            raise StateError(f"cannot reach {self.who}: {err.strerror or err}") from err

    def reply(self, timeout: float, on_wait: Callable[[], None] | None = None) -> Ack | Outcome:
        """The next reply line within ``timeout`` seconds (TimeoutError). ``on_wait`` runs
        every second while there is none; EOF: StateError."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self.sock.settimeout(min(left, 1.0))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                if on_wait is not None:
                    on_wait()
                continue
            except OSError as err:  # e.g. ECONNRESET: it died
                raise StateError(f"{self.who} ended without an answer ({err})") from err
            if not chunk:
                raise StateError(f"{self.who} ended without an answer")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            data = json.loads(line)
            if isinstance(data, dict) and data.get("ack") is True:
                return Ack.from_dict(data, "acknowledgement")
            return Outcome.from_dict(data, "reply")
        except ValueError as err:
            raise StateError(f"{self.who} gave a reply snapfs cannot read: {err}") from err


def status(vmid: str, timeout: float = CONTROL_TIMEOUT) -> Facts:
    """The facts of a serving process's view (within ``timeout`` seconds, else StateError
    "does not answer")."""
    with _Control(vmid) as c:
        c.send(Request(op="status"))
        try:
            reply = c.reply(timeout)
        except TimeoutError as err:
            raise c.not_answering() from err
    if not isinstance(reply, Outcome) or reply.status is None:
        raise StateError(f"{c.who} answered no status: {getattr(reply, 'error', '')}")
    return reply.status


def umount(target: str, *, commit: bool) -> Outcome:
    """Ask the serving process to unmount and tear down; its outcome.

    It acknowledges at once and answers when the teardown is done: no acknowledgement within
    CONTROL_TIMEOUT (stopped), no outcome within a bound derived from the QMP timeouts, or a
    process that stops or dies before its outcome: a one-line error saying what to do.
    """
    vmid, record = state.find_session(target)
    disks = len(record.graph.get("disks", []))
    bound = qmp.teardown_bound(max(disks, 1)) + _UMOUNT_SLACK
    with _Control(vmid) as c:
        c.send(Request(op="umount", commit=commit, ack=True))
        try:
            reply = c.reply(CONTROL_TIMEOUT)
        except TimeoutError as err:
            raise c.not_answering() from err
        if isinstance(reply, Ack):  # (a serving process of an older snapfs sends the outcome)
            stopped_since: list[float] = []

            def watch() -> None:
                # A stopped process never answers: say so within CONTROL_TIMEOUT.
                if c.pid is None or not state.stopped(c.pid):
                    stopped_since.clear()
                    return
                stopped_since[:] = stopped_since or [time.monotonic()]
                if time.monotonic() - stopped_since[0] >= CONTROL_TIMEOUT:
                    raise TimeoutError

            advice = (
                f"resume it (kill -CONT {c.pid}) to let it finish, or kill it and " if c.pid else ""
            ) + f"run 'snapfs cleanup {vmid}'"
            try:
                reply = c.reply(bound, on_wait=watch)
            except TimeoutError as err:
                how = "was stopped" if c.pid and state.stopped(c.pid) else f"took over {bound:g}s"
                raise TeardownError(f"{c.who} {how} during the teardown: {advice}") from err
            except StateError as err:
                maybe = " (the commit may not have been made)" if commit else ""
                raise TeardownError(
                    f"{c.who} died during the teardown{maybe}: run 'snapfs cleanup {vmid}'"
                ) from err
    if not isinstance(reply, Outcome):
        raise StateError(f"{c.who} acknowledged twice")
    if not reply.ok:
        raise by_exit_code(reply.exit or StateError.exit_code)(reply.error or "umount failed")
    return reply
