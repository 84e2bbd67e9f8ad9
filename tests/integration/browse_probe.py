"""Run our Browser inside a lab node and print each event as one JSON line (raw TXT in hex).

Usage (inside a node): python3 -m tests.integration.browse_probe STYPE SECONDS [--legacy]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from agent.avahi.browser import Browser
from agent.avahi.bus import AvahiBus
from agent.log import EventLog


async def probe(stype: str, seconds: float, legacy: bool) -> None:
    log = EventLog(stream=sys.stderr)
    bus = AvahiBus(asyncio.get_running_loop())
    await bus.open()
    deadline = time.monotonic() + seconds
    print(json.dumps({"kind": "ready"}), flush=True)
    async with Browser(bus, stype, log, legacy=legacy) as browser:
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                event = await asyncio.wait_for(anext(browser), remaining)
            except TimeoutError:
                break
            line: dict[str, object] = {
                "kind": event.kind,
                "ms": round(event.ms_elapsed, 1),
                "t": time.monotonic(),  # CLOCK_MONOTONIC is one clock across network namespaces
            }
            if event.record is not None:
                r = event.record
                line |= {
                    "name": r.name, "stype": r.stype, "host": r.host, "address": r.address,
                    "port": r.port, "txt": [t.hex() for t in r.txt], "local": r.local,
                    "protocol": r.protocol,
                }
            print(json.dumps(line), flush=True)
    await bus.close()


if __name__ == "__main__":
    asyncio.run(probe(sys.argv[1], float(sys.argv[2]), "--legacy" in sys.argv[3:]))
