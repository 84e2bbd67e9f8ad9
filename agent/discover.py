"""`sugarkube-agent discover`: one browse for this cluster/env's nodes, resolved and timed."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from agent import const
from agent.avahi.browser import Browser
from agent.avahi.bus import AvahiBus, AvahiError
from agent.cluster.peers import Peer, PeerTable
from agent.config import Settings
from agent.log import EventLog, printable
from agent.mdns.records import service_type


class AvahiUnavailable(Exception):
    """avahi-daemon (or the system bus) cannot be reached."""


@dataclass(frozen=True)
class Found:
    """A node seen by the browse, with the time from browse start to its resolved record."""

    peer: Peer
    port: int
    ms_elapsed: float


async def discover(settings: Settings, timeout: float, log: EventLog) -> tuple[list[Found], float]:
    """Browse until Avahi's AllForNow plus a settle time, or timeout; (found, ms_elapsed)."""
    started = time.monotonic()
    bus = AvahiBus(asyncio.get_running_loop(), log=log)
    try:
        await bus.open()
    except AvahiError as err:
        raise AvahiUnavailable(str(err)) from err
    try:
        if bus.state is None:
            raise AvahiUnavailable(
                "avahi-daemon is not running (nothing owns org.freedesktop.Avahi on the system bus)"
            )
        table = PeerTable(settings.cluster, settings.env, settings.advert_key())
        found: dict[str, Found] = {}
        stype = service_type(settings.cluster, settings.env)
        async with Browser(bus, stype, log) as browser:
            deadline = started + timeout
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    event = await asyncio.wait_for(anext(browser), remaining)
                except TimeoutError:
                    break
                if event.kind == "all_for_now":
                    deadline = min(deadline, time.monotonic() + const.DISCOVER_SETTLE)
                elif event.record is not None and event.kind == "removed":
                    table.gone(event.record)
                    found.pop(event.record.name, None)
                elif event.record is not None:
                    change = table.seen(event.record)
                    if change is not None and change.peer is not None:
                        found[change.name] = Found(
                            change.peer, event.record.port, event.ms_elapsed
                        )
                    elif change is not None and change.kind == "ignored":
                        log.event(
                            "record_ignored", "notice", name=change.name, reason=change.reason
                        )
        elapsed = (time.monotonic() - started) * 1000
        return sorted(found.values(), key=lambda f: f.peer.name), elapsed
    finally:
        await bus.close()


def render(found: list[Found], ms_elapsed: float, stype: str, *, as_json: bool) -> str:
    """The discover output: one line per node, escaped (names come from the LAN), or one JSON
    document (json.dumps escapes every control character)."""
    if as_json:
        return json.dumps(
            {
                "stype": stype,
                "ms_elapsed": round(ms_elapsed),
                "servers": [
                    {
                        "name": f.peer.name, "host": f.peer.host, "address": f.peer.address,
                        "port": f.port, "role": f.peer.advert.role.value,
                        "phase": f.peer.advert.phase, "leader": f.peer.advert.leader,
                        "ip4": f.peer.advert.ip4, "ip6": f.peer.advert.ip6,
                        "ca": f.peer.advert.ca, "local": f.peer.local,
                        "ms_elapsed": round(f.ms_elapsed),
                    }
                    for f in found
                ],
            },
            indent=2,
        )
    if not found:
        return f"no {stype} adverts found in {round(ms_elapsed)} ms"
    lines = [
        f"{f.peer.name}  host={f.peer.host} address={f.peer.address} port={f.port} "
        f"role={f.peer.advert.role.value} phase={f.peer.advert.phase}"
        f"{' local=true' if f.peer.local else ''} ms_elapsed={round(f.ms_elapsed)}"
        for f in found
    ]
    return "\n".join(map(printable, lines))
