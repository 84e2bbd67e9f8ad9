"""Ask for a service type on the wire, over and over, and print every mDNS answer heard.

Usage (inside a node):
  python3 -m tests.integration.answer_probe STYPE ADDR SECONDS
      from ADDR, multicast a QM question for STYPE's PTR every 0.1 s for SECONDS (bounded), and
      print one JSON line per response packet heard: t (monotonic s), src, and its records as
      [type, name, ttl, target] (target: a PTR's alias, an SRV's host).
It shares port 5353 with the node's avahi-daemon (both set SO_REUSEADDR/SO_REUSEPORT).
"""

from __future__ import annotations

import json
import select
import socket
import sys
import time

from zeroconf import DNSIncoming, DNSOutgoing, DNSPointer, DNSQuestion, DNSService
from zeroconf.const import _CLASS_IN, _FLAGS_QR_QUERY, _TYPE_PTR

MDNS = ("224.0.0.251", 5353)
EVERY = 0.1


def _socket(addr: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("", MDNS[1]))
    group = socket.inet_aton(MDNS[0]) + socket.inet_aton(addr)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(addr))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    return sock


def _describe(data: bytes) -> list[list[object]] | None:
    incoming = DNSIncoming(data)
    if not incoming.valid or not incoming.is_response():
        return None
    records: list[list[object]] = []
    for record in incoming.answers:  # a property in zeroconf 0.47
        target = ""
        if isinstance(record, DNSPointer):
            target = record.alias
        elif isinstance(record, DNSService):
            target = record.server
        records.append([record.type, record.name, record.ttl, target])
    return records


def main(argv: list[str]) -> int:
    stype, addr, seconds = argv[0], argv[1], float(argv[2])
    question = DNSOutgoing(_FLAGS_QR_QUERY)
    question.add_question(DNSQuestion(f"{stype}.local.", _TYPE_PTR, _CLASS_IN))
    query = question.packets()[0]
    sock = _socket(addr)
    print(json.dumps({"kind": "ready"}), flush=True)
    end = time.monotonic() + seconds
    next_ask = 0.0
    while (now := time.monotonic()) < end:
        if now >= next_ask:
            sock.sendto(query, MDNS)
            next_ask = now + EVERY
        readable, _, _ = select.select([sock], [], [], max(0.0, min(next_ask, end) - now))
        if not readable:
            continue
        data, (src, _port) = sock.recvfrom(9000)
        records = _describe(data)
        if records:
            print(json.dumps({"kind": "answer", "t": time.monotonic(), "src": src,
                              "records": records}), flush=True)
    print(json.dumps({"kind": "done"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
