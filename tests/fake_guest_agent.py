"""A STAND-IN for the QEMU guest agent, for tests: no guest OS can run here.

It serves a unix socket speaking the agent's JSON-lines protocol as QEMU's qemu-ga does, for the
commands snapfs uses: guest-sync-delimited (reply preceded by 0xFF), guest-sync,
guest-fsfreeze-status, guest-fsfreeze-freeze, guest-fsfreeze-thaw. Like the real agent behind a
virtio-serial port it serves one client at a time and runs commands strictly in order. A 0xFF
byte in the input resets the parser (discards a partial line), as in qemu-ga.

Every command is appended to the record file as a JSON line ``{"t": <time.time()>, "cmd": ...,
"state": <freeze state after it>}``, so tests can check the order and timing of calls.

Modes (``--mode``): ``normal``; ``silent`` (reads everything, never answers: an agent that is
configured in QEMU but not running in the guest); ``slow-freeze`` (the freeze answers after
``--delay`` seconds); ``error-freeze`` (the freeze fails); ``frozen`` (starts frozen).

    python tests/fake_guest_agent.py SOCKET RECORD [--mode MODE] [--delay SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path
from typing import Any


class FakeAgent:
    def __init__(self, record: Path, mode: str, delay: float) -> None:
        self.record = record
        self.mode = mode
        self.delay = delay
        self.state = "frozen" if mode == "frozen" else "thawed"

    def log(self, cmd: str) -> None:
        with open(self.record, "a") as f:
            f.write(json.dumps({"t": time.time(), "cmd": cmd, "state": self.state}) + "\n")
            f.flush()

    def handle(self, req: dict[str, Any]) -> bytes | None:
        cmd = str(req.get("execute"))
        args = req.get("arguments") or {}
        reply: dict[str, Any]
        if cmd in ("guest-sync-delimited", "guest-sync"):
            reply = {"return": args.get("id")}
        elif cmd == "guest-fsfreeze-status":
            reply = {"return": self.state}
        elif cmd == "guest-fsfreeze-freeze":
            if self.mode == "slow-freeze":
                time.sleep(self.delay)
            if self.mode == "error-freeze":
                reply = {"error": {"class": "GenericError", "desc": "fsfreeze failed: EIO"}}
            elif self.state == "frozen":
                reply = {
                    "error": {
                        "class": "GenericError",
                        "desc": "Command guest-fsfreeze-freeze has been disabled",
                    }
                }
            else:
                self.state = "frozen"
                reply = {"return": 2}
        elif cmd == "guest-fsfreeze-thaw":
            count = 2 if self.state == "frozen" else 0
            self.state = "thawed"
            reply = {"return": count}
        else:
            reply = {
                "error": {
                    "class": "CommandNotFound",
                    "desc": f"The command {cmd} has not been found",
                }
            }
        self.log(cmd)
        if self.mode == "silent":
            return None
        if "id" in req and cmd not in ("guest-sync-delimited", "guest-sync"):
            reply["id"] = req["id"]
        out = json.dumps(reply).encode() + b"\n"
        return b"\xff" + out if cmd == "guest-sync-delimited" else out

    def serve(self, conn: socket.socket) -> None:
        buf = b""
        while True:
            data = conn.recv(65536)
            if not data:
                return
            buf += data
            if b"\xff" in buf:  # parser reset: drop everything up to the last 0xFF
                buf = buf[buf.rindex(b"\xff") + 1 :]
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                try:
                    req = json.loads(line)
                except ValueError:
                    continue
                out = self.handle(req)
                if out is not None:
                    try:
                        conn.sendall(out)
                    except OSError:
                        return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("socket")
    ap.add_argument("record")
    ap.add_argument(
        "--mode",
        default="normal",
        choices=["normal", "silent", "slow-freeze", "error-freeze", "frozen"],
    )
    ap.add_argument("--delay", type=float, default=1.0)
    args = ap.parse_args()
    agent = FakeAgent(Path(args.record), args.mode, args.delay)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = args.socket + ".tmp"
    srv.bind(tmp)
    srv.listen(1)
    os.rename(tmp, args.socket)  # appears only once it accepts connections
    while True:
        conn, _ = srv.accept()
        with conn:
            agent.serve(conn)


if __name__ == "__main__":
    main()
