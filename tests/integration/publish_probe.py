"""Drive our Publisher inside a lab node from a script of steps read on stdin, one JSON per line.

Each line: {"name": ..., "txt": ["k=v", ...]} to publish (or update) that advert, or
{"withdraw": true}. After each step the probe prints {"done": n, "name": <name in use>}.
Usage (inside a node): python3 -m tests.integration.publish_probe STYPE [STYPE...]
"""

from __future__ import annotations

import asyncio
import json
import sys

from agent import const
from agent.avahi.bus import AvahiBus
from agent.avahi.publisher import Publisher
from agent.log import EventLog
from agent.mdns.records import Advertisement


async def probe(stypes: tuple[str, ...]) -> None:
    log = EventLog(stream=sys.stderr)
    bus = AvahiBus(asyncio.get_running_loop())
    await bus.open()
    publisher = Publisher(bus, log)
    runner = asyncio.create_task(publisher.run())
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": True}), flush=True)
    step = 0
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        wish = json.loads(line)
        step += 1
        if wish.get("withdraw"):
            await publisher.withdraw()
        else:
            publisher.set(
                Advertisement(
                    wish["name"], stypes, const.K3S_API_PORT,
                    tuple(t.encode() for t in wish["txt"]),
                )
            )
            await publisher.settled(10)
            await asyncio.wait_for(publisher.established.wait(), 10)
        print(json.dumps({"done": step, "name": publisher.name}), flush=True)
    runner.cancel()
    await bus.close()


if __name__ == "__main__":
    asyncio.run(probe(tuple(sys.argv[1:])))
