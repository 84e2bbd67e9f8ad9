"""Port 6443 wire proof: a discovered server counts only once it proves it serves our cluster's CA.

The proof is the one a k3s agent makes before it sends its token (k3s pkg/clientaccess/token.go,
getCACerts): fetch `/cacerts` over TLS without verification, hash it with k3s' hashCA rule
(`agent.cluster.k3s.ca_hash`), compare with the hash a secure `K10<sha256>::` token carries, then
reconnect over TLS trusting only that bundle. Unlike k3s we never try the OS trust store first: a
server whose certificate a public CA signed must still serve the CA the token names.

Hostname checking is off in the verified reconnect, and this is deliberate. The CA is pinned by
the token, so a verified chain proves the peer holds a key the cluster CA certified: any server of
the cluster is a valid join target, whichever address it answers on. The address we dial (TXT
ip4/ip6, a link-local IPv6, a second NIC) need not be one of the IP SANs k3s put in its
certificate; requiring it would refuse real servers without stopping any impostor.

Every step is bounded by one deadline and `wire_proof` never raises: failures are refusals with a
reason. The optional packet capture imports scapy lazily; this module never imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import itertools
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

from agent import const
from agent.cluster.k3s import CABundleError, ca_hash

_T = TypeVar("_T")
_USER_AGENT = "sugarkube-agent"
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2: a header field name
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,8})[ \t]*(?:;[^\r\n]*)?")  # RFC 9112 §7.1
_CHUNK_LINE_MAX = 1024  # bytes; a chunk-size line with extensions, far more than any server sends
_DEV_NAME = re.compile(rf"[!-~]{{1,{const.IFNAME_MAX}}}")  # printable ASCII, no space


class RefusalReason(StrEnum):
    """Why a server failed the wire proof (the `reason=` of event=join_refused)."""

    UNREACHABLE = "unreachable"
    TLS = "tls_error"
    CA_MISMATCH = "ca_mismatch"
    BAD_CACERTS = "bad_cacerts"
    VERIFY_FAILED = "verify_failed"


@dataclass(frozen=True)
class ProofResult:
    """One wire proof's outcome; `detail` is one line and never holds a token."""

    ok: bool
    address: str
    port: int
    reason: RefusalReason | None
    detail: str
    ca_sha256: str | None  # hashCA of the /cacerts served, once one was fetched
    ms_elapsed: float
    evidence: str | None  # the handshake capture's summary, when capture was asked for


@dataclass(frozen=True)
class HttpResponse:
    """A complete HTTP/1.x response: its status code and decoded body."""

    status: int
    body: bytes


class ResponseError(ValueError):
    """An HTTP response we cannot use: malformed, truncated, or larger than its cap."""


@dataclass(frozen=True)
class HandshakePacket:
    """A captured TCP segment of the probe's connection: kernel timestamp (s), ports, flags."""

    time: float
    sport: int
    dport: int
    flags: str  # scapy's letters: S, A, R, F, P, ...


# --- address choice (pure) ----------------------------------------------------------------------


def choose_address(ip4: str, ip6: str, resolved: str, interface: str | None = None) -> list[str]:
    """Addresses to dial, best first: TXT ip4, TXT ip6, then the resolved one; bad ones dropped.

    Loopback, unspecified and multicast addresses are dropped: an advert pointing there would
    make a node prove (and join) itself. A link-local IPv6 address is dialled through
    `interface`; its own scope is kept only when no interface is given; with neither, dropped.
    """
    chosen: list[str] = []
    for text, version in ((ip4, 4), (ip6, 6), (resolved, None)):
        address = _dialable(text, version, interface)
        if address is not None and address not in chosen:
            chosen.append(address)
    return chosen


def _dialable(text: str, version: int | None, interface: str | None) -> str | None:
    """`text` as an address string we can connect to, or None."""
    try:
        ip = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if version is not None and ip.version != version:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or str(ip) == "255.255.255.255":
        return None
    return _scoped(ip, interface, prefer_interface=True)


def _scoped(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    interface: str | None,
    *,
    prefer_interface: bool,
) -> str | None:
    """The address as text, a link-local IPv6 one with its `%scope` (None when it has none)."""
    bare = _bare(ip)
    if not (isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local):
        return bare
    own = ip.scope_id
    scope = (interface or own) if prefer_interface else (own or interface)
    if not scope or not _valid_scope(scope):
        return None
    return f"{bare}%{scope}"


def _bare(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address without any `%scope`."""
    return str(type(ip)(ip.packed))


def _valid_scope(scope: str) -> bool:
    """Whether `scope` can name an interface (Linux dev_valid_name, IFNAMSIZ) or an index."""
    return (
        _DEV_NAME.fullmatch(scope) is not None
        and not any(c in scope for c in "/:%")
        and scope not in {".", ".."}
    )


# --- HTTP/1.x response parsing (pure) -----------------------------------------------------------


def parse_response(
    data: bytes,
    *,
    eof: bool,
    body_max: int = const.PROBE_BODY_MAX,
    header_max: int = const.PROBE_HEADER_MAX,
) -> HttpResponse | None:
    """The response in `data`, None while more bytes are needed; ResponseError if it is unusable.

    `eof` says the peer has closed: the answer is then a response or an error, never None. No
    input makes this read more than header_max + 2 * body_max bytes, or raise anything else.
    """
    if len(data) > header_max + 2 * body_max:
        raise ResponseError(f"response larger than {header_max + 2 * body_max} bytes")
    end = data.find(b"\r\n\r\n", 0, header_max)
    if end < 0:
        if len(data) >= header_max:
            raise ResponseError(f"response headers longer than {header_max} bytes")
        _closed_inside(eof, "the response headers")
        return None
    status, headers = _head(data[:end])
    rest = data[end + 4 :]
    if status in (204, 304):
        return HttpResponse(status, b"")
    if b"transfer-encoding" in headers:
        codings = [c.strip().lower() for v in headers[b"transfer-encoding"] for c in v.split(b",")]
        if codings != [b"chunked"]:
            raise ResponseError("unsupported transfer-encoding")
        body = _dechunk(rest, eof, body_max, header_max)
        return None if body is None else HttpResponse(status, body)
    if b"content-length" in headers:
        length = _content_length(headers[b"content-length"])
        if length > body_max:
            raise ResponseError(f"body of {length} bytes exceeds the {body_max}-byte cap")
        if len(rest) >= length:
            return HttpResponse(status, rest[:length])
        _closed_inside(eof, "the body")
        return None
    # Neither length nor chunking: the body runs to the close (RFC 9112 §6.3, rule 8).
    if len(rest) > body_max:
        raise ResponseError(f"body exceeds the {body_max}-byte cap")
    return HttpResponse(status, rest) if eof else None


def _head(block: bytes) -> tuple[int, dict[bytes, list[bytes]]]:
    """The status code and the header fields (lowercase names) of a response's head."""
    lines = block.split(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        raise ResponseError("not an HTTP/1.x status line")
    status = int(status_line[1])
    if status < 200:
        raise ResponseError(f"unexpected interim status {status}")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise ResponseError("malformed header line")
        headers.setdefault(name.lower(), []).append(value.strip(b" \t"))
    return status, headers


def _content_length(fields: list[bytes]) -> int:
    """The one length that Content-Length fields agree on (RFC 9110 §8.6)."""
    values = {v.strip() for field in fields for v in field.split(b",")}
    if len(values) != 1:
        raise ResponseError("conflicting content-length")
    value = values.pop()
    if re.fullmatch(rb"[0-9]{1,12}", value) is None:
        raise ResponseError("invalid content-length")
    return int(value)


def _dechunk(data: bytes, eof: bool, body_max: int, trailer_max: int) -> bytes | None:
    """The body of a chunked message (RFC 9112 §7.1), None while incomplete."""
    body = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\r\n", pos, pos + _CHUNK_LINE_MAX)
        if eol < 0:
            if len(data) - pos >= _CHUNK_LINE_MAX:
                raise ResponseError("chunk-size line too long")
            _closed_inside(eof, "a chunk-size line")
            return None
        size_line = _CHUNK_SIZE.fullmatch(data, pos, eol)
        if size_line is None:
            raise ResponseError("malformed chunk-size line")
        size = int(size_line[1], 16)
        start = eol + 2
        if size == 0:  # last chunk, then optional trailer fields and an empty line
            if data.startswith(b"\r\n", start):
                return bytes(body)
            if data.find(b"\r\n\r\n", start, start + trailer_max) >= 0:
                return bytes(body)
            if len(data) - start >= trailer_max:
                raise ResponseError("chunked trailer too long")
            _closed_inside(eof, "the chunked trailer")
            return None
        if len(body) + size > body_max:
            raise ResponseError(f"body exceeds the {body_max}-byte cap")
        if len(data) < start + size + 2:
            _closed_inside(eof, "a chunk")
            return None
        if data[start + size : start + size + 2] != b"\r\n":
            raise ResponseError("chunk not followed by CRLF")
        body += data[start : start + size]
        pos = start + size + 2


def _closed_inside(eof: bool, what: str) -> None:
    """ResponseError when the peer closed (`eof`) before `what` ended."""
    if eof:
        raise ResponseError(f"connection closed inside {what}")


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


# --- the proof ----------------------------------------------------------------------------------


class _Refused(Exception):
    """A step failed; the proof stops with this reason."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Run:
    """What a proof learnt so far, kept for the result even when it is refused."""

    ca_sha256: str | None = None
    evidence: str | None = None


async def wire_proof(
    address: str,
    port: int = const.K3S_API_PORT,
    *,
    expected_ca_sha256: str | None,
    timeout: float,
    capture: bool = False,
    interface: str | None = None,
) -> ProofResult:
    """Prove `address`:`port` serves the CA the token names: TCP, /cacerts hash, verified TLS.

    Without `expected_ca_sha256` (a short token) the server must still serve a CA its own
    certificate verifies against, as k3s requires. `timeout` (s) bounds the proof; `capture`
    adds at most its bounded setup and teardown. Never raises, except CancelledError.
    """
    started = time.monotonic()
    run = _Run()
    reason: RefusalReason | None = None
    detail = "tcp connected, /cacerts served, and the server's certificate verifies against it"
    try:
        await _prove(
            run,
            address,
            port,
            expected=expected_ca_sha256,
            timeout=timeout,
            capture=capture,
            interface=interface,
        )
    except _Refused as refused:
        reason, detail = refused.reason, refused.detail
    except Exception as exc:  # a bug must refuse the join, never crash the daemon
        reason, detail = RefusalReason.VERIFY_FAILED, f"internal error: {_describe(exc)}"
    return ProofResult(
        ok=reason is None,
        address=address,
        port=port,
        reason=reason,
        detail=_one_line(detail),
        ca_sha256=run.ca_sha256,
        ms_elapsed=(time.monotonic() - started) * 1000,
        evidence=run.evidence,
    )


async def _prove(
    run: _Run,
    address: str,
    port: int,
    *,
    expected: str | None,
    timeout: float,
    capture: bool,
    interface: str | None,
) -> None:
    """The steps of wire_proof; each failure raises _Refused."""
    target = _target(address, interface)
    if target is None:
        raise _Refused(
            RefusalReason.UNREACHABLE,
            "not a dialable IP address (a link-local IPv6 one needs an existing interface)",
        )
    host, ip = target
    sni = str(ip)  # CPython sends no SNI for an IP literal; never the `%scope` form
    authority = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    sniffer: _Capture | None = None
    if capture:
        on = interface or host.partition("%")[2] or None
        sniffer, run.evidence = await _Capture.open(ip, port, on, timeout)
    deadline = asyncio.get_running_loop().time() + timeout
    async with contextlib.AsyncExitStack() as stack:
        try:
            reader, writer = await _step(
                deadline,
                "tcp connect",
                asyncio.open_connection(host, port),
                reason=RefusalReason.UNREACHABLE,
            )
        except _Refused:
            if sniffer is not None:
                run.evidence = await sniffer.finish(None)
            raise
        except BaseException:
            if sniffer is not None:
                sniffer.abandon()
            raise
        stack.push_async_callback(_close, writer)
        if sniffer is not None:
            run.evidence = await sniffer.finish(writer.get_extra_info("sockname")[1])

        await _step(
            deadline,
            "tls handshake",
            writer.start_tls(_insecure_context(), server_hostname=sni),
            reason=RefusalReason.TLS,
        )
        served = await _step(
            deadline,
            "GET /cacerts",
            _get(reader, writer, authority),
            reason=RefusalReason.TLS,
            bad=RefusalReason.BAD_CACERTS,
        )
        _require_2xx(served, RefusalReason.BAD_CACERTS, "GET /cacerts")
        await _close(writer)

        try:
            run.ca_sha256 = ca_hash(served.body)
        except CABundleError as exc:
            raise _Refused(RefusalReason.BAD_CACERTS, f"/cacerts: {exc}") from exc
        # Exact comparison, as k3s validateCACerts: hashCA's hex is lowercase.
        if expected is not None and not hmac.compare_digest(
            expected.encode(), run.ca_sha256.encode()
        ):
            raise _Refused(RefusalReason.CA_MISMATCH, "/cacerts does not hash to the token's CA")
        try:
            pinned = _pinned_context(served.body)
        except (ssl.SSLError, ValueError) as exc:
            raise _Refused(
                RefusalReason.BAD_CACERTS, f"/cacerts cannot be loaded as a CA: {_describe(exc)}"
            ) from exc

        reader, writer = await _step(
            deadline,
            "verified tls handshake",
            asyncio.open_connection(host, port, ssl=pinned, server_hostname=sni),
            reason=RefusalReason.VERIFY_FAILED,
        )
        stack.push_async_callback(_close, writer)
        again = await _step(
            deadline,
            "verified GET /cacerts",
            _get(reader, writer, authority),
            reason=RefusalReason.VERIFY_FAILED,
        )
        _require_2xx(again, RefusalReason.VERIFY_FAILED, "verified GET /cacerts")


def _target(
    address: str, interface: str | None
) -> tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address] | None:
    """(the host to dial, the bare IP) for `address`; a link-local IPv6 needs a scope."""
    try:
        ip = ipaddress.ip_address(address.strip())
    except ValueError:
        return None
    if ip.is_unspecified or ip.is_multicast:
        return None  # connect(0.0.0.0) reaches this very host on Linux
    host = _scoped(ip, interface, prefer_interface=False)
    if host is None:
        return None
    scope = host.partition("%")[2]
    if scope and not scope.isdigit():
        # A scope naming no interface would send getaddrinfo() to DNS, which lab nodes lack.
        try:
            socket.if_nametoindex(scope)
        except OSError:
            return None
    return host, ipaddress.ip_address(_bare(ip))


async def _step(
    deadline: float,
    what: str,
    action: Awaitable[_T],
    *,
    reason: RefusalReason,
    bad: RefusalReason | None = None,
) -> _T:
    """`action` awaited before `deadline`; a failure becomes a refusal naming the step."""
    try:
        async with asyncio.timeout_at(deadline):
            return await action
    except ResponseError as exc:
        raise _Refused(bad or reason, f"{what}: {exc}") from exc
    except Exception as exc:
        raise _Refused(reason, f"{what}: {_describe(exc)}") from exc


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str
) -> HttpResponse:
    """GET /cacerts written by hand (urllib may resolve names, and lab nodes have no DNS)."""
    writer.write(
        f"GET /cacerts HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {_USER_AGENT}\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n".encode("ascii")
    )
    await writer.drain()
    data = b""
    while True:
        chunk = await reader.read(const.PROBE_READ_CHUNK)
        data += chunk
        response = parse_response(data, eof=not chunk)
        if response is not None:
            return response
        if not chunk:  # parse_response raises at EOF; this only guards the loop's end
            raise ResponseError("connection closed before the response ended")


def _require_2xx(response: HttpResponse, reason: RefusalReason, what: str) -> None:
    """Refuse unless the status is 2xx, as k3s' get() does."""
    if not 200 <= response.status <= 299:
        raise _Refused(reason, f"{what}: HTTP status {response.status}")


async def _close(writer: asyncio.StreamWriter) -> None:
    """Drop the connection now, with no wait for a TLS close_notify; idempotent."""
    writer.transport.abort()
    # abort() closes the socket from a loop callback: yield once so it has run when we return.
    # Not wait_closed(): after a TLS handshake cut short it never resolves.
    await asyncio.sleep(0)


def _insecure_context() -> ssl.SSLContext:
    """TLS that accepts any certificate: only to fetch the CA we then pin (token.go)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _pinned_context(cacerts: bytes) -> ssl.SSLContext:
    """TLS that trusts only `cacerts` and verifies the chain (hostnames: see the module doc)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    # Chains must end at a self-signed CA of the bundle, never at any certificate in it.
    context.verify_flags &= ~ssl.VERIFY_X509_PARTIAL_CHAIN
    # cadata must be ASCII; PEM is, and OpenSSL skips the text around the PEM blocks anyway.
    context.load_verify_locations(cadata=cacerts.decode("ascii", errors="ignore"))
    return context


def _describe(exc: BaseException) -> str:
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


def _one_line(text: str) -> str:
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


class _Capture:
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
    ) -> tuple[_Capture | None, str | None]:
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
            why = "timed out" if isinstance(exc, TimeoutError) else _describe(exc)
            if isinstance(exc, ImportError):
                why = "scapy is not installed"
            elif isinstance(exc, PermissionError):
                why = "not permitted (needs root or CAP_NET_RAW)"
            return None, _one_line(f"capture unavailable: {why}")
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
