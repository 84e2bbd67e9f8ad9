"""The commands that talk to the running daemon: `gate` and `status`."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, TextIO

from agent import const
from agent.daemon.control import request
from agent.log import printable

UNITS = {"server": "k3s.service", "agent": "k3s-agent.service"}  # the k3s unit of each role


class Unreachable(Exception):
    """The daemon's control socket does not answer."""


async def status() -> dict[str, Any]:
    """One snapshot of the daemon's state."""
    try:
        reader, writer = await request("status")
        line = await asyncio.wait_for(reader.readline(), 5.0)
        writer.close()
    except (OSError, TimeoutError) as err:
        raise Unreachable(
            f"sugarkube-agent is not running ({const.CONTROL_SOCKET}: {err})"
        ) from err
    snapshot: dict[str, Any] = json.loads(line)
    return snapshot


def render_status(snapshot: dict[str, Any]) -> str:
    """`status` for a person, escaped: peer names and reasons come from the LAN."""
    gate = (
        f"released ({snapshot['release_mode']}, {UNITS[snapshot.get('release_role') or 'server']})"
        if snapshot["released"] else "waiting"
    )
    lines = [
        f"phase: {snapshot['phase']}  role: {snapshot['role']}  gate: {gate}  "
        f"avahi: {snapshot['avahi']}",
        f"status: {snapshot['status']}",
    ]
    if snapshot.get("leader"):
        lines.append(f"leader: {snapshot['leader']}")
    degraded = sorted(snapshot.get("degraded", {}).items())
    lines += [f"degraded: {what}: {why}" for what, why in degraded]
    peers = snapshot.get("peers", [])
    lines.append(f"peers ({len(peers)}):")
    lines += [f"  {p['name']}  role={p['role']} phase={p['phase']}" for p in peers]
    timings = snapshot.get("timings_ms", {})
    if timings:
        lines.append("timings: " + " ".join(f"{k}_ms={v:.0f}" for k, v in sorted(timings.items())))
    return "\n".join(map(printable, lines))


def released(snapshot: dict[str, Any], role: str | None) -> tuple[int, str]:
    """The gate's answer to a released snapshot, for the unit of `role` (None: any unit)."""
    held = snapshot.get("release_role") or "server"
    if role is not None and held != role:
        return const.EXIT_OTHER_ROLE, (
            f"released as {held} ({snapshot['release_mode']}): this node runs {UNITS[held]}, "
            f"not {UNITS[role]}"
        )
    return const.EXIT_OK, f"released: {snapshot['release_mode']} as {held}"


async def gate(timeout: float, out: TextIO, role: str | None = None) -> tuple[int, str]:
    """Wait until the daemon releases the k3s gate; (exit code, reason).

    With `role`, the unit of that role asks: released in the other role exits EXIT_OTHER_ROLE.
    """
    started = time.monotonic()
    deadline = started + timeout
    last = "the daemon has not answered yet"
    reached = False
    shown = ("", 0.0)
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            reader, writer = await request("gate", timeout=min(2.0, remaining))
        except (OSError, TimeoutError):
            waited = time.monotonic() - started
            if not reached and waited >= min(timeout, const.GATE_UNREACHABLE_GRACE):
                return const.EXIT_UNAVAILABLE, (
                    f"sugarkube-agent is not running ({const.CONTROL_SOCKET})"
                )
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            continue
        reached = True
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    line = await asyncio.wait_for(reader.readline(), remaining)
                except TimeoutError:
                    break
                if not line:
                    break  # the daemon restarted: connect again
                snapshot = json.loads(line)
                last = printable(snapshot["status"])
                if snapshot["released"]:
                    return released(snapshot, role)
                now = time.monotonic()
                if last != shown[0] or now - shown[1] >= const.GATE_REPORT_INTERVAL:
                    out.write(f"waiting: {last}\n")
                    out.flush()
                    shown = (last, now)
        finally:
            writer.close()
    if not reached:
        return const.EXIT_UNAVAILABLE, f"sugarkube-agent is not running ({const.CONTROL_SOCKET})"
    return const.EXIT_FAIL, f"timed out after {timeout:g} s; the daemon says: {last}"
