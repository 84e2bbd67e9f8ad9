"""Live rounds: ask the wire, not a cache, who advertises a service type right now.

A round is a fresh python-zeroconf instance on the running asyncio loop, bound to one interface,
sharing UDP 5353 with the node's avahi-daemon. It registers nothing, announces nothing, and is
closed when the round ends: nothing carries over from one round to the next, so an advert whose
node died without a goodbye (kept in Avahi's cache for up to 75 minutes, RFC 6762 §10) is simply
not heard.

Why QU questions (RFC 6762 §5.4), not QM: Avahi 0.8 (avahi-core/response-sched.c) does not
multicast a record it multicast in the last 500 ms, nor one that a querier at the same *address*
listed as a known answer in the last 700 ms; our own avahi-daemon, browsing the same type, is such
a querier at our address, and back-to-back rounds make the first history. Measured in the lab with
rounds 1 s apart next to a local `avahi-browse`, no packet loss: QM questions were answered only
at the resend in most rounds and not at all in 5 of 75. For a QU question Avahi multicasts when
it may and otherwise answers by unicast at once, to our socket bound to the interface address (the
kernel prefers it to avahi-daemon's wildcard bind): every question gets an answer (60 of 60 rounds
there). A fresh instance with an empty cache is the case §5.4 recommends QU for.

Schedule of one round, from its start (const.LIVE_ROUND_*, scaled with a shorter window):
- 0: the PTR question. Avahi multicasts the shared PTR after 20-120 ms (RFC 6762 §6) or unicasts
  it at once, with SRV, TXT, A and AAAA as additional records.
- RESEND (0.5 s, mid-window): the PTR question again, for loss, with SRV and TXT questions for
  instances heard without them. RFC 6762 §5.2's intervals (1 s, then doubling) bound the traffic
  of a continuous query that runs for as long as a browser does; a round is a one-shot query
  (§5.1) asked twice, three packets at most, and the gate runs only a few rounds.
- FOLLOWUP (0.75 s): SRV, TXT or A questions for whatever is still missing, if anything.
- WINDOW (1 s): the round ends; a late multicast answer (Wi-Fi holds multicast frames to the next
  DTIM beacon, 100-300 ms) to the resend still fits.

zeroconf on the running loop (no thread) costs 0.3 ms of CPU per round to open and close in the
lab; on its own thread through asyncio.to_thread it costs 1.2-2.3 ms, a thread per round, and up
to 2 ms of stall on our loop (GIL), so it runs on the loop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import re
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, TypeVar

from zeroconf import NotRunningException, RecordUpdate, RecordUpdateListener, Zeroconf
from zeroconf._dns import DNSAddress, DNSPointer, DNSQuestion, DNSRecord, DNSService, DNSText
from zeroconf._protocol.outgoing import DNSOutgoing
from zeroconf.asyncio import AsyncZeroconf

from agent import const
from agent.mdns.records import split_txt

# A DNS-SD service type as records.service_type() builds it: "_<name>._tcp" or "._udp".
_STYPE = re.compile(r"_[^.\s]{1,62}\._(tcp|udp)")
# DNS names compare case-insensitively in ASCII only (RFC 4343 §3); str.lower() would also fold
# other letters and can change a string's length ("İ" becomes two characters).
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_V = TypeVar("_V")
_closing: set[asyncio.Task[None]] = set()  # closes outliving a cancelled round, kept referenced


class WireError(Exception):
    """A live round could not ask the wire; it is no evidence either way. One line, safe to log."""


class IncompleteRound(WireError):
    """A round that heard more than it could keep, or instances it could not resolve: what it
    did not hear is no evidence of absence (a flood of forged names must not hide a server)."""


@dataclass(frozen=True)
class LiveRecord:
    """One service instance heard on the wire during a round."""

    name: str  # instance name (unescaped, without the service type suffix)
    stype: str  # e.g. "_k3s-sugar-dev._tcp"
    host: str  # SRV target without the root dot ("" if no SRV came)
    port: int  # 0 if no SRV
    txt: tuple[bytes, ...]  # raw TXT strings in wire order (() if no TXT came)
    addresses: tuple[str, ...]  # A then AAAA of the host seen in the round's responses


def _fold(name: str) -> str:
    """A DNS name as compared: ASCII letters lowercased, length unchanged."""
    return name.translate(_ASCII_LOWER)


def _address_text(record: DNSAddress) -> str | None:
    """An A or AAAA record's address as text (link-local IPv6 with its %scope); None if bad."""
    try:
        address = ipaddress.ip_address(record.address)
    except ValueError:  # not 4 or 16 bytes: a record cut short by the packet's end
        return None
    if (record.type == const.DNS_TYPE_A) != (address.version == 4):
        return None
    scope = record.scope_id
    if address.version == 6 and address.is_link_local and scope:
        return f"{address}%{scope}"
    return str(address)


class RoundCollector:
    """What one round heard about one service type, folded into LiveRecords.

    Pure: records in (as zeroconf parsed them), records and follow-up questions out. add() takes
    any record from any response and never raises; records of other types are ignored.
    """

    def __init__(self, stype: str) -> None:
        self.stype = stype
        self.ptr_name = f"{stype}.local."
        self._ptr_key = _fold(self.ptr_name)
        self._suffix = "." + self._ptr_key
        self._instances: dict[str, str] = {}  # full-name key -> instance name, as first heard
        self._srv: dict[str, tuple[str, int]] = {}  # full-name key -> (target, port)
        self._txt: dict[str, bytes] = {}  # full-name key -> TXT rdata
        self._addresses: dict[str, dict[str, None]] = {}  # host key -> addresses, ordered
        self.capped = False  # something heard was not kept: LIVE_ROUND_MAX_NAMES reached

    def _instance(self, full_name: str) -> tuple[str, str] | None:
        """(key, instance name) when full_name is "<instance>.<stype>.local.", else None."""
        key = _fold(full_name)
        if len(key) <= len(self._suffix) or not key.endswith(self._suffix):
            return None
        return key, full_name[: -len(self._suffix)]

    def _owner(self, record: DNSRecord) -> tuple[str, str] | None:
        """(key, instance name) of the instance a PTR, SRV or TXT record is about, else None."""
        if isinstance(record, DNSPointer):
            if record.type == const.DNS_TYPE_PTR and _fold(record.name) == self._ptr_key:
                return self._instance(record.alias)
            return None
        if isinstance(record, DNSService | DNSText):
            return self._instance(record.name)
        return None

    def add(self, record: DNSRecord) -> str | None:
        """Take one record of a response; the instance name when this made it newly heard."""
        if record.class_ != const.DNS_CLASS_IN:
            return None
        goodbye = record.ttl <= 0  # RFC 6762 §10.1
        if isinstance(record, DNSAddress):
            self._address(record, goodbye)
            return None
        owner = self._owner(record)
        if owner is None:
            return None
        key, name = owner
        if isinstance(record, DNSService):
            self._keep(self._srv, key, (record.server, record.port), goodbye)
        elif isinstance(record, DNSText):
            self._keep(self._txt, key, record.text, goodbye)
        elif goodbye:  # the PTR's goodbye: the instance is leaving
            self._instances.pop(key, None)
        # An SRV or TXT owned by "<instance>.<stype>.local." is as live as the PTR naming it.
        if goodbye or key in self._instances:
            return None
        if len(self._instances) >= const.LIVE_ROUND_MAX_NAMES:
            self.capped = True
            return None
        self._instances[key] = name
        return name

    def _keep(self, table: dict[str, _V], key: str, value: _V, goodbye: bool) -> None:
        """Store (or, for a goodbye, forget) one unique record's data of an instance."""
        if goodbye:
            table.pop(key, None)
        elif key in table or len(table) < const.LIVE_ROUND_MAX_NAMES:
            table[key] = value
        else:
            self.capped = True

    def _address(self, record: DNSAddress, goodbye: bool) -> None:
        text = _address_text(record)
        if text is None:
            return
        host = _fold(record.name)
        if goodbye:
            self._addresses.get(host, {}).pop(text, None)
        elif host in self._addresses or len(self._addresses) < const.LIVE_ROUND_MAX_NAMES:
            self._addresses.setdefault(host, {})[text] = None

    def missing(self) -> list[DNSQuestion]:
        """QM questions for what heard instances still lack: SRV, TXT, the SRV target's address."""
        questions: list[DNSQuestion] = []
        for key, name in list(self._instances.items())[: const.LIVE_ROUND_MAX_FOLLOWUP]:
            full_name = f"{name}.{self.ptr_name}"
            if key not in self._srv:
                questions.append(DNSQuestion(full_name, const.DNS_TYPE_SRV, const.DNS_CLASS_IN))
            elif not self._addresses.get(_fold(self._srv[key][0])):
                target = self._srv[key][0]
                questions.append(DNSQuestion(target, const.DNS_TYPE_A, const.DNS_CLASS_IN))
            if key not in self._txt:
                questions.append(DNSQuestion(full_name, const.DNS_TYPE_TXT, const.DNS_CLASS_IN))
        return questions

    def incomplete(self, dropped: int = 0) -> str | None:
        """Why this round cannot stand as evidence of absence, or None; DROPPED: datagrams the
        kernel dropped on the round's sockets (a burst that filled the receive buffer)."""
        if dropped:
            return f"{dropped} datagram(s) dropped on a full receive buffer: their content unknown"
        if self.capped:
            return f"over {const.LIVE_ROUND_MAX_NAMES} names heard: the round could not keep all"
        unresolved = sum(k not in self._srv or k not in self._txt for k in self._instances)
        if unresolved:
            return f"{unresolved} instance(s) heard without their SRV or TXT record"
        return None

    def records(self) -> list[LiveRecord]:
        """Every instance heard and not said goodbye to, in the order first heard."""
        found = []
        for key, name in self._instances.items():
            target, port = self._srv.get(key, ("", 0))
            addresses = list(self._addresses.get(_fold(target), {})) if target else []
            addresses.sort(key=lambda text: ":" in text)  # A before AAAA, else as heard
            found.append(
                LiveRecord(
                    name=name, stype=self.stype, host=target.removesuffix("."), port=port,
                    txt=split_txt(self._txt[key]) if key in self._txt else (),
                    addresses=tuple(addresses),
                )
            )
        return found



# --- the round on the wire ---------------------------------------------------------------------


class _Listener(RecordUpdateListener):
    """Hands every record zeroconf parsed from a response to the round's collector."""

    def __init__(self, collector: RoundCollector, on_heard: Callable[[str], None] | None) -> None:
        self._collector = collector
        self._on_heard = on_heard

    def async_update_records(self, zc: Zeroconf, now: float, records: list[RecordUpdate]) -> None:
        for update in records:
            name = self._collector.add(update.new)
            if name is not None and self._on_heard is not None:
                self._on_heard(name)


def _query(questions: list[DNSQuestion]) -> DNSOutgoing:
    """A multicast query asking QUESTIONS, with no known answers: every responder answers."""
    out = DNSOutgoing(const.DNS_FLAGS_QUERY, multicast=True)
    for question in questions:
        question.unicast = const.LIVE_ROUND_QU
        out.add_question(question)
    return out


def _receive_only_here(zc: Zeroconf) -> None:
    """Make the shared 5353 socket take only mDNS of the interface it joined the group on.

    Linux delivers a group's datagrams to every socket bound to the port when any socket on the
    host joined the group on the arriving interface (IP_MULTICAST_ALL, default 1), and
    avahi-daemon joins on all of them.
    """
    for transport in zc.engine.readers:
        sock = transport.get_extra_info("socket")
        with suppress(OSError):
            if sock.family == socket.AF_INET and sock.getsockname()[0] == "0.0.0.0":
                sock.setsockopt(socket.IPPROTO_IP, const.IP_MULTICAST_ALL, 0)
            elif sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::":
                sock.setsockopt(socket.IPPROTO_IPV6, const.IPV6_MULTICAST_ALL, 0)


def _drop_unparsable(zc: Zeroconf) -> None:
    """Drop a packet zeroconf fails to parse instead of logging a traceback on our loop.

    zeroconf 0.47.3 decodes HINFO strings as strict UTF-8 and lets UnicodeDecodeError escape from
    its datagram handler to the loop's exception handler: one traceback per junk packet, at a
    rate anyone on the link chooses. Its sockets read from the loop pass before the round takes
    control, so a junk packet in that first instant is still logged; later ones are dropped.
    """
    for protocol in zc.engine.protocols:
        receive = protocol.datagram_received

        def guarded(data: bytes, addrs: Any, receive: Callable[..., None] = receive) -> None:
            with suppress(UnicodeDecodeError):
                receive(data, addrs)

        protocol.datagram_received = guarded  # type: ignore[method-assign]


def _inodes(zc: Zeroconf) -> set[int]:
    """The socket inodes of ZC's readers (on the loop: the sockets are the loop's)."""
    inodes = set()
    for transport in zc.engine.readers:
        with suppress(OSError, AttributeError):
            inodes.add(os.fstat(transport.get_extra_info("socket").fileno()).st_ino)
    return inodes


def _dropped(inodes: set[int]) -> int:
    """Datagrams the kernel dropped on the sockets INODES since they opened: /proc/net/udp's
    `drops` column (blocking reads: run in a thread). A flood that fills the receive buffer
    hides what it pushed out (a server's answer among them); no counter readable counts as none."""
    total = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with suppress(OSError, ValueError), open(table, encoding="ascii") as stream:
            for line in itertools.islice(stream, 1, const.PROC_UDP_LINES_MAX):
                fields = line.split()
                if len(fields) >= 13 and int(fields[9]) in inodes:
                    total += int(fields[12])
    return total


def _check_local(interface_addr: str) -> None:
    """WireError unless interface_addr is an address of this host.

    Checked before zeroconf opens its sockets: when it fails half-way it leaves them unclosed.
    """
    family = socket.AF_INET6 if ":" in interface_addr else socket.AF_INET
    try:
        # getaddrinfo turns a link-local address's %scope into the sockaddr's scope_id.
        ((*_, sockaddr),) = socket.getaddrinfo(
            interface_addr, 0, family, socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST
        )[:1]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind(sockaddr)
    except OSError as err:
        raise WireError(f"{interface_addr} is not an address of this host: {err.strerror}") from err


@asynccontextmanager
async def _fresh_zeroconf(interface_addr: str) -> AsyncIterator[Zeroconf]:
    """A zeroconf instance on this loop, on one interface, closed (bounded) however we leave."""
    _check_local(interface_addr)
    try:
        aiozc = AsyncZeroconf(interfaces=[interface_addr])
    except (OSError, RuntimeError, ValueError) as err:
        raise WireError(f"cannot open mDNS sockets on {interface_addr}: {err}") from err
    try:
        zc = aiozc.zeroconf
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for returns the result and
            # swallows a cancel that lands as the inner await completes (gh-86296), and the
            # daemon cancels rounds whenever the machine no longer needs them.
            async with asyncio.timeout(const.LIVE_ROUND_START_TIMEOUT):
                await zc.async_wait_for_start()
        except (NotRunningException, TimeoutError) as err:
            raise WireError(f"mDNS sockets on {interface_addr} did not start") from err
        if not zc.engine.senders:
            # zeroconf only logs a failed group join; a round that cannot ask must not say "absent".
            raise WireError(f"cannot send mDNS from {interface_addr}: not an address of an up link")
        _receive_only_here(zc)
        _drop_unparsable(zc)
        yield zc
    finally:
        # A task, so that a second cancellation while we wait cannot leave the sockets open.
        closing = asyncio.ensure_future(aiozc.async_close())
        _closing.add(closing)
        closing.add_done_callback(_closing.discard)
        with suppress(TimeoutError):
            async with asyncio.timeout(const.LIVE_ROUND_CLOSE_TIMEOUT):
                await asyncio.shield(closing)


async def live_round(
    stype: str,
    *,
    interface_addr: str,
    window: float = const.LIVE_ROUND_WINDOW,
    on_heard: Callable[[str], None] | None = None,
    complete: bool = False,
) -> list[LiveRecord]:
    """Ask the wire who advertises stype right now; every record seen within window.

    Never consults a cache. on_heard(instance name) is called on the loop as each instance is
    first heard (it must not raise). WireError when the question cannot be sent on
    interface_addr; with `complete` (a round that may count as absence), IncompleteRound when
    the round hit a cap or left an instance unresolved. Cancellation propagates, after the
    sockets are closed.
    """
    if not _STYPE.fullmatch(stype) or len(stype.partition(".")[0].encode()) > const.DNS_LABEL_MAX:
        raise WireError(f"{stype!r} is not a DNS-SD service type like _name._tcp")
    try:
        ipaddress.ip_address(interface_addr)
    except ValueError as err:
        raise WireError(f"{interface_addr!r} is not an IP address") from err
    collector = RoundCollector(stype)
    ptr = DNSQuestion(collector.ptr_name, const.DNS_TYPE_PTR, const.DNS_CLASS_IN)
    scale = window / const.LIVE_ROUND_WINDOW  # the schedule keeps its shape in a shorter window
    loop = asyncio.get_running_loop()
    async with _fresh_zeroconf(interface_addr) as zc:
        zc.async_add_listener(_Listener(collector, on_heard), None)
        start = loop.time()
        zc.async_send(_query([ptr]))
        await asyncio.sleep(start + const.LIVE_ROUND_RESEND * scale - loop.time())
        zc.async_send(_query([ptr, *collector.missing()]))
        await asyncio.sleep(start + const.LIVE_ROUND_FOLLOWUP * scale - loop.time())
        if questions := collector.missing():
            zc.async_send(_query(questions))
        await asyncio.sleep(start + window - loop.time())
        dropped = await asyncio.to_thread(_dropped, _inodes(zc)) if complete else 0
    if complete and (why := collector.incomplete(dropped)):
        raise IncompleteRound(why)
    return collector.records()
