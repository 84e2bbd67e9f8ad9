"""Evidence for the wire proof: the SYN / SYN-ACK of its connection, captured with scapy.

scapy is imported only when a capture runs (it is optional, and heavy); without it, or without
CAP_NET_RAW, the proof goes on and says why there is no evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import os
import socket
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent import const


@dataclass(frozen=True)
class HandshakePacket:
    """A captured TCP segment of the probe's connection: kernel timestamp (s), ports, flags."""

    time: float
    sport: int
    dport: int
    flags: str  # scapy's letters: S, A, R, F, P, ...


# --- capture summary (pure) ---------------------------------------------------------------------


def summarize_handshake(
    packets: Sequence[HandshakePacket], port: int, local_port: int | None
) -> str:
    """One line on the SYN and its answer for a connect to `port` (from `local_port` if known)."""

    def ours(sport: int, dport: int) -> bool:
        return dport == port and (local_port is None or sport == local_port)

    syns = [p for p in packets if ours(p.sport, p.dport) and "S" in p.flags and "A" not in p.flags]
    if not syns:
        return f"tcp/{port}: no SYN seen"
    first = syns[0]
    # A retransmitted SYN is sent >= 1 s later (RFC 6298 §2); a loopback capture sees one copy
    # per direction of the same segment within microseconds, which is not a retransmission.
    sent = 1 + sum(1 for a, b in itertools.pairwise(syns) if b.time - a.time >= 0.5)
    answers = (
        p
        for p in packets
        if ours(p.dport, p.sport) and p.time >= first.time and _is_answer(p.flags)
    )
    answer = next(answers, None)
    said = f"tcp/{port}: SYN sent" + (f" {sent} times" if sent > 1 else "")
    if answer is None:
        return f"{said}; no answer seen"
    what = "RST" if "R" in answer.flags else "SYN-ACK"
    ms = (answer.time - first.time) * 1000
    return f"{said}; {what} after {ms:.3f} ms (flags {answer.flags})"


def _is_answer(flags: str) -> bool:
    """Whether a segment with these scapy flag letters answers a SYN: SYN-ACK or RST."""
    return "R" in flags or {"S", "A"} <= set(flags)


def describe(exc: BaseException) -> str:
    """A short reason for `exc`, without the addresses asyncio puts in its messages."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, socket.gaierror):
        return str(exc.strerror)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def one_line(text: str) -> str:
    """`text` on one printable line of at most PROBE_DETAIL_MAX characters."""
    line = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    cap = const.PROBE_DETAIL_MAX
    return line if len(line) <= cap else line[: cap - 3] + "..."


# --- optional packet capture (scapy, imported lazily) -------------------------------------------


def capture_permitted() -> bool:
    """Whether this process may open a packet socket (root or CAP_NET_RAW): a cheap check."""
    family = getattr(socket, "AF_PACKET", None)
    if family is None:
        return False
    try:
        with socket.socket(family, socket.SOCK_RAW, 0):
            return True
    except OSError:
        return False


class Capture:
    """An AsyncSniffer thread recording the TCP segments between us and one server port."""

    def __init__(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
        self._ip = ip
        self._port = port
        self._loop = asyncio.get_running_loop()
        self._answered = asyncio.Event()
        self._packets: list[HandshakePacket] = []
        self._sniffer: Any = None
        self._socket: Any = None
        self._layers: tuple[Any, Any, Any] | None = None  # scapy's IP, IPv6, TCP
        self._stop_lock = threading.Lock()

    @classmethod
    async def open(
        cls,
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
        port: int,
        interface: str | None,
        timeout: float,
    ) -> tuple[Capture | None, str | None]:
        """(a running capture, None), or (None, `capture unavailable: <why>`); never raises."""
        if not capture_permitted():
            return None, "capture unavailable: not permitted (needs root or CAP_NET_RAW)"
        capture = cls(ip, port)
        lifetime = timeout + const.CAPTURE_OPEN_TIMEOUT + const.CAPTURE_SETTLE
        opening = asyncio.ensure_future(asyncio.to_thread(capture._start, interface, lifetime))
        try:
            async with asyncio.timeout(const.CAPTURE_OPEN_TIMEOUT):
                await asyncio.shield(opening)
        except BaseException as exc:
            # The thread may still open the socket later: stop it whenever it is done.
            opening.add_done_callback(capture._discard)
            if not isinstance(exc, Exception):
                raise  # cancellation above all
            why = "timed out" if isinstance(exc, TimeoutError) else describe(exc)
            if isinstance(exc, ImportError):
                why = "scapy is not installed"
            elif isinstance(exc, PermissionError):
                why = "not permitted (needs root or CAP_NET_RAW)"
            return None, one_line(f"capture unavailable: {why}")
        return capture, None

    def _discard(self, opening: asyncio.Future[None]) -> None:
        """Once an abandoned opening is done: retrieve its outcome, stop what it started."""
        if not opening.cancelled():
            opening.exception()
        self.abandon()

    def _start(self, interface: str | None, lifetime: float) -> None:
        """In a thread: import scapy, open the filtered packet socket, start sniffing."""
        from scapy.config import conf
        from scapy.layers.inet import IP, TCP
        from scapy.layers.inet6 import IPv6
        from scapy.sendrecv import AsyncSniffer

        self._layers = (IP, IPv6, TCP)

        ip = str(self._ip)
        if interface is None:
            routes = conf.route if self._ip.version == 4 else conf.route6
            interface = routes.route(ip)[0]
        # Opened here, not in the sniffer thread, so a failure raises to us instead of dying there.
        self._socket = conf.L2listen(iface=interface, filter=f"tcp port {self._port} and host {ip}")
        started = threading.Event()
        self._sniffer = AsyncSniffer(
            opened_socket=self._socket,
            prn=self._seen,
            store=False,
            started_callback=started.set,
            timeout=lifetime,  # the sniffer ends by itself even if nobody stops it
        )
        self._sniffer.start()
        if not started.wait(const.CAPTURE_OPEN_TIMEOUT):
            raise RuntimeError("the sniffer thread did not start")

    def _seen(self, packet: Any) -> None:
        """In the sniffer thread: keep our connection's TCP segments; wake finish() on an answer."""
        try:
            if self._layers is None:
                return
            IP, IPv6, TCP = self._layers
            layer = packet.getlayer(IP) or packet.getlayer(IPv6)
            tcp = packet.getlayer(TCP)
            if layer is None or tcp is None:
                return
            if self._ip not in {ipaddress.ip_address(layer.src), ipaddress.ip_address(layer.dst)}:
                return  # the BPF filter is skipped (with a scapy log line) without libpcap
            seen = HandshakePacket(
                float(packet.time), int(tcp.sport), int(tcp.dport), str(tcp.flags)
            )
            self._packets.append(seen)
            if seen.sport == self._port and _is_answer(seen.flags):
                self._loop.call_soon_threadsafe(self._answered.set)
        except Exception:  # noqa: S110 -- a bad segment, or a closed loop: never kill the sniffer
            pass

    async def finish(self, local_port: int | None) -> str:
        """Wait briefly for the answer to be dissected, stop the sniffer, and summarize."""
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(const.CAPTURE_SETTLE):
                    await self._answered.wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(const.CAPTURE_STOP_TIMEOUT):
                    await asyncio.shield(asyncio.to_thread(self._stop))
        except BaseException:
            self.abandon()
            raise
        return summarize_handshake(list(self._packets), self._port, local_port)

    def abandon(self) -> None:
        """Stop the sniffer from a thread of its own, without waiting."""
        threading.Thread(target=self._stop, name="capture-stop", daemon=True).start()

    def _stop(self) -> None:
        """Stop and join the sniffer thread, then close the socket; idempotent, never raises."""
        with self._stop_lock:
            sniffer, sock = self._sniffer, self._socket
            self._sniffer = self._socket = None
            if sniffer is not None:
                with contextlib.suppress(Exception):  # "Not running": it already timed out
                    sniffer.stop(join=False)
                sniffer.join(const.CAPTURE_STOP_TIMEOUT)
            if sock is not None:
                with contextlib.suppress(Exception):
                    sock.close()

