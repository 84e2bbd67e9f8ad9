"""Choose or watch an interface inside a lab node and print what the agent sees as JSON lines.

Usage (inside a node):
  python3 -m tests.integration.netlink_probe watch IFNAME
      one line per InterfaceEvent: the first (the state now) with kind "ready", then kind "event";
      each with mono (CLOCK_MONOTONIC) and wall (CLOCK_REALTIME) times of its arrival, in s.
      On InterfaceError: a kind "error" line, exit 1.
  python3 -m tests.integration.netlink_probe choose [IFNAME]
      choose_interface(IFNAME or None): a kind "chose" line, or a kind "error" line and exit 1.
  python3 -m tests.integration.netlink_probe cancel IFNAME
      start a watch, cancel it after its first event: whether the cancellation propagated, and
      the open descriptors and netlink sockets before and after.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

from agent.daemon.netlink import Interface, InterfaceError, choose_interface, watch_interface


def emit(kind: str, **fields: Any) -> None:
    print(json.dumps({"kind": kind, **fields}), flush=True)


def iface_json(iface: Interface) -> dict[str, Any]:
    return {"name": iface.name, "index": iface.index, "ip4": iface.ip4, "ip6": iface.ip6}


async def watch(name: str) -> int:
    try:
        iface = choose_interface(name)
        kind = "ready"
        async for event in watch_interface(iface.name, iface.index):
            emit(
                kind, **iface_json(event.iface), link_up=event.link_up,
                mono=time.monotonic(), wall=time.time(),
            )  # fmt: skip
            kind = "event"
    except InterfaceError as err:
        emit("error", error=str(err), mono=time.monotonic(), wall=time.time())
        return 1
    return 0


def netlink_sockets() -> int:
    """Netlink sockets this process holds (rtnetlink sockets are listed in /proc/net/netlink)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor listdir itself used
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    with open("/proc/net/netlink") as table:
        return sum(1 for line in table.read().splitlines()[1:] if line.split()[-1] in inodes)


async def cancel(name: str) -> int:
    iface = choose_interface(name)
    fds_before, netlink_before = len(os.listdir("/proc/self/fd")), netlink_sockets()
    first = asyncio.Event()

    async def consume() -> None:
        async for _event in watch_interface(iface.name, iface.index):
            first.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first.wait(), 10)
    during = netlink_sockets()
    task.cancel()
    try:
        await task
        propagated = False
    except asyncio.CancelledError:
        propagated = True
    emit(
        "cancelled", propagated=propagated, fds_before=fds_before,
        fds_after=len(os.listdir("/proc/self/fd")), netlink_before=netlink_before,
        netlink_during=during, netlink_after=netlink_sockets(),
        tasks_left=len(asyncio.all_tasks()) - 1,
    )  # fmt: skip
    return 0


def choose(name: str | None) -> int:
    try:
        iface = choose_interface(name)
    except InterfaceError as err:
        emit("error", error=str(err))
        return 1
    emit("chose", **iface_json(iface))
    return 0


def main() -> int:
    command, *rest = sys.argv[1:] or ["help"]
    if command == "watch" and len(rest) == 1:
        return asyncio.run(watch(rest[0]))
    if command == "cancel" and len(rest) == 1:
        return asyncio.run(cancel(rest[0]))
    if command == "choose" and len(rest) <= 1:
        return choose(rest[0] if rest else None)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
