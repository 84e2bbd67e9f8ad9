"""The daemon's control socket: `status`, `gate` and `wipe` talk to the running daemon here.

Protocol: the client sends one JSON object on a line, `{"cmd": "status" | "gate" | "wipe"}`;
the daemon answers with JSON lines. `status` gets one snapshot; `gate` gets a snapshot now and
on every change until the gate is released (no polling on either side); `wipe` gets one line
once the adverts are withdrawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent import const

_REQUEST_MAX = 4096  # bytes: a request is one small JSON line


@dataclass
class PeerInfo:
    """One peer as `status` shows it (no addresses: status output may be pasted anywhere)."""

    name: str
    host: str
    role: str
    phase: str


@dataclass
class Snapshot:
    """What the daemon tells `status` and `gate`."""

    phase: str = "starting"
    role: str = "candidate"
    status: str = "starting"
    released: bool = False
    release_mode: str = ""
    release_role: str = ""  # server or agent: which k3s unit runs (`gate --role`)
    degraded: dict[str, str] = field(default_factory=dict)  # what does not work, and why
    leader: str = ""
    avahi: str = "unknown"
    peers: list[PeerInfo] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


class DaemonState:
    """The snapshot plus a way to wait for its next change."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()
        self._changed = asyncio.Condition()

    async def update(self, **fields: Any) -> None:
        """Change fields and wake every waiter."""
        for key, value in fields.items():
            setattr(self.snapshot, key, value)
        async with self._changed:
            self._changed.notify_all()

    async def wait_change(self, timeout: float) -> None:
        """Return after the next update, or after timeout."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait()


WipeHandler = Callable[[], Awaitable[bool]]


class ControlServer:
    """Serves the control socket for the daemon's lifetime."""

    def __init__(self, state: DaemonState, wipe: WipeHandler, path: Path = const.CONTROL_SOCKET):
        self._state = state
        self._wipe = wipe
        self._path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Bind the socket (mode 0600: root's tools only), replacing a stale one."""
        self._path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self._path))
        finally:
            os.umask(old)

    async def close(self) -> None:
        """Stop serving and remove the socket."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            request = json.loads(line[:_REQUEST_MAX] or b"{}")
            command = request.get("cmd") if isinstance(request, dict) else None
            if command == "status":
                await _send(writer, self._state.snapshot.as_dict())
            elif command == "gate":
                await self._gate(writer)
            elif command == "wipe":
                withdrawn = await self._wipe()
                await _send(writer, {"withdrawn": withdrawn})
            else:
                await _send(writer, {"error": f"unknown command {command!r}"})
        except (TimeoutError, ValueError, ConnectionError):
            pass  # a client that went away or spoke nonsense: nothing to tell it
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _gate(self, writer: asyncio.StreamWriter) -> None:
        while True:
            snapshot = self._state.snapshot.as_dict()
            await _send(writer, snapshot)
            if snapshot["released"]:
                return
            await self._state.wait_change(const.GATE_REPORT_INTERVAL)


async def _send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    writer.write(json.dumps(message).encode() + b"\n")
    await writer.drain()


async def request(
    command: str, path: Path = const.CONTROL_SOCKET, timeout: float = 5.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect and send a command; the caller reads the JSON lines. Raises OSError."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), timeout)
    writer.write(json.dumps({"cmd": command}).encode() + b"\n")
    await writer.drain()
    return reader, writer
