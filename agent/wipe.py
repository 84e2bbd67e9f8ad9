"""`sugarkube-agent wipe`: make this node fresh again, and prove its adverts left the wire.

Steps: stop k3s (systemd), ask the running daemon to withdraw its adverts (goodbye packets),
remove k3s state, this node's tokens, our drop-in and its election ballot, then run the
double-absence gate against our own host name: two live rounds >= 1 s apart in which no advert
names this host. Idempotent.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

from agent import const
from agent.cluster import k3s
from agent.cluster.gate import AbsenceGate
from agent.config import Settings
from agent.daemon import ballot
from agent.daemon.control import request
from agent.daemon.netlink import choose_interface
from agent.mdns import wire
from agent.mdns.records import normalize_host, parse_advert, service_type


async def wipe(settings: Settings, out_lines: list[str], root: Path = Path("/")) -> tuple[int, str]:
    """Wipe this node; (exit code, reason). Progress lines are appended to out_lines."""
    hostname = socket.gethostname()
    out_lines.append(_stop_k3s())
    out_lines.append(await _withdraw())
    removed = await asyncio.to_thread(k3s.wipe_state, root)
    marker = root / str(const.GATE_RELEASED_MARKER).lstrip("/")
    if marker.exists():
        marker.unlink()
        removed.append(str(const.GATE_RELEASED_MARKER))
    try:
        if await asyncio.to_thread(ballot.remove, root):  # its key and promises: start afresh
            removed.append(str(const.BALLOT_FILE))
    except ballot.BallotError as err:
        return const.EXIT_FAIL, str(err)
    out_lines.append(f"removed: {', '.join(removed)}" if removed else "removed: nothing left")
    iface = await asyncio.to_thread(choose_interface, settings.mdns.interface)
    return await confirm_absent(
        service_type(settings.cluster, settings.env), f"{hostname}.local", iface.ip4
    )


async def confirm_absent(stype: str, host: str, address: str) -> tuple[int, str]:
    """The double-absence gate for adverts of `host`; (0, ...) confirmed, (1, reason) not."""
    gate = AbsenceGate()
    deadline = time.monotonic() + const.WIPE_CONFIRM_TIMEOUT
    still: list[str] = []
    while not gate.passed and time.monotonic() < deadline:
        due = gate.next_round_at()
        if due is not None and due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        started = time.monotonic()
        records = await wire.live_round(stype, interface_addr=address)
        still = [r.name for r in records if _names_host(r, host)]
        gate.observe(started, bool(still))
    if gate.passed:
        return const.EXIT_OK, f"confirmed: no advert of {host} on the wire in two live rounds"
    return const.EXIT_FAIL, (
        f"not confirmed within {const.WIPE_CONFIRM_TIMEOUT:g} s: still answered on the wire: "
        f"{', '.join(sorted(set(still))) or 'rounds did not complete'}"
    )


def _names_host(record: wire.LiveRecord, host: str) -> bool:
    if f"@{host} (" in record.name.lower():
        return True
    try:
        return parse_advert(record.txt).host == normalize_host(host)
    except ValueError:
        return False


def _stop_k3s() -> str:
    systemctl = shutil.which("systemctl")
    if systemctl is None or not Path("/run/systemd/system").is_dir():
        return "k3s: not stopped (systemd is not running here)"
    done = subprocess.run(
        [systemctl, "stop", "k3s.service", "k3s-agent.service"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    if done.returncode != 0:
        return f"k3s: systemctl stop failed: {done.stderr.strip().splitlines()[-1:]}"
    return "k3s: stopped"


async def _withdraw() -> str:
    try:
        reader, writer = await request("wipe")
        line = await asyncio.wait_for(reader.readline(), const.SHUTDOWN_GRACE + 2)
        writer.close()
        answer = json.loads(line or b"{}")
    except (OSError, TimeoutError, ValueError):
        return "adverts: the daemon is not running (nothing of ours to withdraw)"
    if answer.get("withdrawn"):
        return "adverts: withdrawn by the daemon (goodbye packets sent)"
    return "adverts: the daemon could not confirm the withdrawal"
