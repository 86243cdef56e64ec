"""A stand-in for a QEMU of another version: a QMP proxy that rewrites selected replies.

The proxy listens on its own unix socket and forwards each client connection to the real QEMU's
QMP socket. The greeting and the ``qmp_capabilities`` negotiation pass through untouched; after
that, what a QEMU of another version might say is injected:

- ``Refuse`` rules answer a matching command with an error reply (its ``id`` echoed) without
  forwarding it: a missing command (``CommandNotFound``), an unknown error class, or a parameter
  an older QEMU does not know (``GenericError``).
- ``events`` are sent to the client before every reply (unknown names, BLOCK_JOB_ERROR, ...).
- ``extra_fields`` are merged into every reply, and into its ``return`` value when that is an
  object or a list of objects.
- ``Hold`` rules swallow a matching command: neither forwarded nor answered (a QEMU that hangs
  in it). ``Rewrite`` rules forward it and replace the ``return`` value of QEMU's reply (a
  malformed reply). ``on_command(name, arguments)`` is called before a command is forwarded
  (e.g. to stop QEMU right then), ``on_reply(name)`` after QEMU's reply to it was delivered.

Every command a client sent is recorded in ``commands`` (name, arguments), so a test can tell
that a refused command really was issued. The proxy runs in threads; ``close()`` (also run by
``__exit__``) stops them and closes every socket, whatever state the connections are in.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

Json = dict[str, Any]


@dataclass
class Refuse:
    """Answer ``command`` (when ``when(arguments)`` holds) with an error, without forwarding."""

    command: str
    error_class: str = "CommandNotFound"
    desc: str = ""  # default: QEMU's own CommandNotFound text
    when: Callable[[Json], bool] = field(default=lambda args: True)
    hits: int = 0

    def reply(self) -> Json:
        desc = self.desc or f"The command {self.command} has not been found"
        return {"error": {"class": self.error_class, "desc": desc}}


@dataclass
class Hold:
    """Never forward nor answer ``command`` (when ``when(arguments)`` holds)."""

    command: str
    when: Callable[[Json], bool] = field(default=lambda args: True)
    hits: int = 0


@dataclass
class Rewrite:
    """Forward ``command``, and replace the ``return`` value of QEMU's reply by ``value``."""

    command: str
    value: Any
    hits: int = 0


def event(name: str, data: Json | None = None) -> Json:
    """A QMP event as QEMU sends it (with a timestamp)."""
    now = time.time()
    return {
        "event": name,
        "data": data or {},
        "timestamp": {"seconds": int(now), "microseconds": int(now % 1 * 1e6)},
    }


class QMPProxy:
    """Forwards QMP connections from ``path`` to ``upstream``; see the module docstring."""

    def __init__(self, upstream: Path, path: Path) -> None:
        self.upstream = upstream
        self.path = path
        self.refuse: list[Refuse] = []
        self.hold: list[Hold] = []
        self.rewrite: list[Rewrite] = []
        self.on_command: Callable[[str, Json], None] | None = None
        self.on_reply: Callable[[str], None] | None = None
        self.events: list[Json] = []
        self.extra_fields: Json = {}
        self.commands: list[tuple[str, Json]] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(4)
        self._start(self._accept_loop)

    # -- lifecycle -----------------------------------------------------------------------------

    def __enter__(self) -> QMPProxy:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, cut every connection, join every thread."""
        with self._lock:
            self._closing.set()
            socks = list(self._sockets)
            threads = list(self._threads)
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=10)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _start(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(
            target=target, args=args, daemon=True, name=f"qmp-proxy-{target.__name__}"
        )
        with self._lock:
            if self._closing.is_set():
                return
            self._threads.append(t)
            t.start()

    def _track(self, s: socket.socket) -> socket.socket:
        """Register a socket for ``close()``; one that arrives after ``close()`` is closed."""
        with self._lock:
            if not self._closing.is_set():
                self._sockets.append(s)
                return s
        s.close()
        raise OSError("the proxy is closed")

    def command_names(self) -> list[str]:
        with self._lock:
            return [name for name, _ in self.commands]

    # -- the connections -----------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            try:
                client = self._track(self._listener.accept()[0])
            except OSError:
                return
            self._start(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = self._track(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        except OSError:
            return
        try:
            upstream.connect(str(self.upstream))
            session = _Session(self, client, upstream)
            self._start(session.from_qemu)
            session.from_client()
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _hold(self, cmd: str, args: Json) -> bool:
        with self._lock:
            for rule in self.hold:
                if rule.command == cmd and rule.when(args):
                    rule.hits += 1
                    return True
        return False

    def _rewrite_for(self, cmd: str) -> Rewrite | None:
        with self._lock:
            for rule in self.rewrite:
                if rule.command == cmd:
                    rule.hits += 1
                    return rule
        return None

    def _rule_for(self, cmd: str, args: Json) -> Refuse | None:
        with self._lock:
            for rule in self.refuse:
                if rule.command == cmd and rule.when(args):
                    rule.hits += 1
                    return rule
        return None


class _Session:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: QMPProxy, client: socket.socket, upstream: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream = upstream
        self.to_client = threading.Lock()  # both directions write to the client
        self.negotiated = False
        self.rewrites: dict[Any, Any] = {}  # reply id -> the return value it gets
        self.names: dict[Any, str] = {}  # reply id -> the command it answers

    def send_client(self, msg: Json) -> None:
        with self.to_client:
            self.client.sendall(json.dumps(msg).encode() + b"\r\n")

    def from_client(self) -> None:
        for msg in _messages(self.client):
            cmd = msg.get("execute") or msg.get("exec-oob") or ""
            args: Json = msg.get("arguments") or {}
            with self.proxy._lock:
                self.proxy.commands.append((cmd, args))
            if self.negotiated and self.proxy._hold(cmd, args):
                continue
            rule = self.proxy._rule_for(cmd, args) if self.negotiated else None
            if rule is None:
                rewrite = self.proxy._rewrite_for(cmd) if self.negotiated else None
                if rewrite is not None:
                    self.rewrites[msg.get("id")] = rewrite.value
                if self.negotiated:
                    self.names[msg.get("id")] = cmd
                    if self.proxy.on_command is not None:
                        self.proxy.on_command(cmd, args)
                self.upstream.sendall(json.dumps(msg).encode() + b"\n")
                continue
            reply = rule.reply()
            if "id" in msg:
                reply["id"] = msg["id"]
            self.deliver(reply)

    def from_qemu(self) -> None:
        for msg in _messages(self.upstream):
            if "event" in msg or "QMP" in msg:
                self.send_client(msg)
            elif not self.negotiated:  # the qmp_capabilities reply
                # Negotiated before the client can see the reply: its next command may arrive
                # (on the other thread) as soon as the reply is sent, and must meet the rules.
                self.negotiated = True
                self.send_client(msg)
            else:
                self.deliver(msg)
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_RDWR)

    def deliver(self, reply: Json) -> None:
        """A reply as the other QEMU would send it: events first, extra fields added."""
        for ev in self.proxy.events:
            self.send_client(ev)
        if reply.get("id") in self.rewrites and "return" in reply:
            reply = {**reply, "return": self.rewrites.pop(reply.get("id"))}
        extra = self.proxy.extra_fields
        if extra:
            reply = {**reply, **extra}
            ret = reply.get("return")
            if isinstance(ret, dict):
                reply["return"] = {**ret, **extra}
            elif isinstance(ret, list):
                reply["return"] = [{**r, **extra} if isinstance(r, dict) else r for r in ret]
        self.send_client(reply)
        name = self.names.pop(reply.get("id"), "")
        if name and self.proxy.on_reply is not None:
            self.proxy.on_reply(name)


def _messages(sock: socket.socket) -> Iterator[Json]:
    """The JSON objects arriving on ``sock`` until EOF or a socket error. Like QEMU's parser it
    needs no separator: qemu.qmp sends commands without a newline."""
    decoder = json.JSONDecoder()
    buf = ""
    while True:
        try:
            chunk = sock.recv(65536)
        except OSError:
            return
        if not chunk:
            return
        buf += chunk.decode()
        while True:
            buf = buf.lstrip()
            try:
                msg, end = decoder.raw_decode(buf)
            except json.JSONDecodeError:
                break  # incomplete: wait for more
            buf = buf[end:]
            yield msg
