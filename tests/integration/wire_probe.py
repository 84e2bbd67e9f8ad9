"""Run live rounds inside a lab node and print each as one JSON line (raw TXT in hex).

Usage (inside a node):
  python3 -m tests.integration.wire_probe STYPE ADDR [--rounds N] [--every S]
      N rounds (default 1), each started S seconds after the previous one started (default 0:
      back to back), each listening --window S (default const.LIVE_ROUND_WINDOW); a line per
      round: started (monotonic s), ms, first_ms, records.
  python3 -m tests.integration.wire_probe STYPE ADDR --cancel-after S
      cancel a round S seconds in; print whether the cancellation propagated and what was left.
  python3 -m tests.integration.wire_probe --junk ADDR STYPE
      multicast a burst of malformed and foreign mDNS packets from ADDR, then exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time

from agent import const
from agent.mdns.wire import LiveRecord, WireError, live_round

MDNS_GROUP = ("224.0.0.251", 5353)


def record_json(record: LiveRecord) -> dict[str, object]:
    return {
        "name": record.name, "stype": record.stype, "host": record.host, "port": record.port,
        "txt": [item.hex() for item in record.txt], "addresses": list(record.addresses),
    }


async def rounds(stype: str, addr: str, count: int, every: float, window: float | None) -> int:
    loop = asyncio.get_running_loop()
    next_start = loop.time()
    for index in range(count):
        await asyncio.sleep(max(0.0, next_start - loop.time()))
        started = time.monotonic()  # CLOCK_MONOTONIC is one clock across network namespaces
        first: list[float] = []

        def heard(_name: str, started: float = started, first: list[float] = first) -> None:
            if not first:
                first.append(time.monotonic() - started)

        try:
            records = await live_round(
                stype, interface_addr=addr, on_heard=heard,
                window=const.LIVE_ROUND_WINDOW if window is None else window,
            )  # fmt: skip
        except WireError as err:
            print(json.dumps({"kind": "error", "round": index, "error": str(err)}), flush=True)
            return 1
        line = {
            "kind": "round", "round": index, "started": started,
            "ms": round((time.monotonic() - started) * 1000, 1),
            "first_ms": round(first[0] * 1000, 1) if first else None,
            "records": [record_json(r) for r in records],
        }
        print(json.dumps(line), flush=True)
        next_start = max(next_start + every, loop.time())
    return 0


async def cancelled_round(stype: str, addr: str, after: float) -> int:
    fds_before = len(os.listdir("/proc/self/fd"))
    task = asyncio.create_task(live_round(stype, interface_addr=addr))
    await asyncio.sleep(after)
    task.cancel()
    started = time.monotonic()
    try:
        await task
        propagated = False
    except asyncio.CancelledError:
        propagated = True
    ms = round((time.monotonic() - started) * 1000, 1)
    await asyncio.sleep(0.05)  # a closed transport releases its socket on the next loop pass
    line = {
        "kind": "cancelled", "propagated": propagated, "ms_to_return": ms,
        "fds_before": fds_before, "fds_after": len(os.listdir("/proc/self/fd")),
        "tasks_left": len(asyncio.all_tasks()) - 1,
    }
    print(json.dumps(line), flush=True)
    return 0


def _name(text: str) -> bytes:
    """A DNS name in wire format, uncompressed."""
    return b"".join(bytes([len(p)]) + p for p in text.encode().split(b".") if p) + b"\0"


def _rr(name: str, rtype: int, rdata: bytes, ttl: int = 120) -> bytes:
    return _name(name) + rtype.to_bytes(2, "big") + b"\x00\x01" + ttl.to_bytes(4, "big") + (
        len(rdata).to_bytes(2, "big") + rdata
    )


def _response(*records: bytes) -> bytes:
    return b"\x00\x00\x84\x00\x00\x00" + len(records).to_bytes(2, "big") + b"\0\0\0\0" + (
        b"".join(records)
    )


def junk_packets(stype: str, addr: str) -> list[bytes]:
    """Packets a round must survive: garbage, cut-short records, foreign types, bad encodings;
    and one well-formed PTR naming the instance "junk-from-ADDR", to tell where packets got."""
    ptr_name = f"{stype}.local"
    good = _response(_rr(ptr_name, 12, _name(f"junk-from-{addr}.{ptr_name}")))
    return [
        b"",
        b"\xff" * 7,
        bytes(range(256)) * 4,
        good[: len(good) - 5],  # PTR rdata cut short
        _response(_rr("_other._tcp.local", 12, _name("x._other._tcp.local"))),
        _response(_rr(ptr_name, 12, _name("not-under-the-type.local"))),
        _response(_rr(f"bad.{ptr_name}", 16, b"\x09k3s=1")),  # TXT string longer than its rdata
        _response(_rr(f"bad.{ptr_name}", 13, b"\x02\xff\xfe\x01a")),  # HINFO, not UTF-8
        _response(_rr("host.local", 1, b"\x01\x02")),  # A record of 2 bytes
        _response(_rr(ptr_name, 12, b"\xc0\xff")),  # compression pointer past the end
        b"\x00\x00\x84\x00\x00\x00\xff\xff\x00\x00\x00\x00",  # 65535 answers announced, none sent
        good,
    ]


def send_junk(addr: str, stype: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((addr, 0))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(addr))
        packets = junk_packets(stype, addr)
        for packet in packets:
            sock.sendto(packet, MDNS_GROUP)
    print(json.dumps({"kind": "junk", "sent": len(packets)}), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--junk", action="store_true")
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--every", type=float, default=0.0)
    parser.add_argument("--window", type=float)
    parser.add_argument("--cancel-after", type=float)
    parser.add_argument("--const", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    for setting in args.const:  # the lab's way to shrink or vary agent.const, as fixtures do
        name, _, value = setting.partition("=")
        setattr(const, name, type(getattr(const, name))(json.loads(value)))
    if args.junk:
        return send_junk(args.first, args.second)
    if args.cancel_after is not None:
        return asyncio.run(cancelled_round(args.first, args.second, args.cancel_after))
    return asyncio.run(rounds(args.first, args.second, args.rounds, args.every, args.window))


if __name__ == "__main__":
    sys.exit(main())
