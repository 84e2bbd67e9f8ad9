"""Port 6443 wire proof: a discovered server counts only once it proves it serves our cluster's CA.

The proof is the one a k3s agent makes before it sends its token (k3s pkg/clientaccess/token.go,
getCACerts): fetch `/cacerts` over TLS without verification, hash it with k3s' hashCA rule
(`agent.tokens.ca_hash`), compare with the hash a secure `K10<sha256>::` token carries, then
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
import re
import socket
import ssl
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from agent import const
from agent.cluster.capture import Capture, describe, one_line
from agent.cluster.httpresponse import HttpResponse, ResponseError, ResponseReader
from agent.tokens import CABundleError, ca_hash

_T = TypeVar("_T")
_USER_AGENT = "sugarkube-agent"
_DEV_NAME = re.compile(rf"[!-~]{{1,{const.IFNAME_MAX}}}")  # printable ASCII, no space


class RefusalReason(StrEnum):
    """Why a server failed the wire proof (the `reason=` of event=join_refused)."""

    UNREACHABLE = "unreachable"
    TLS = "tls_error"
    CA_MISMATCH = "ca_mismatch"
    BAD_CACERTS = "bad_cacerts"
    VERIFY_FAILED = "verify_failed"
    UNAUTHENTICATED = "unauthenticated"  # nothing pins the CA: a short token, an advert without ca=


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


# What an operator reads in STATUS for a failed proof, first match wins: (a reason or None for
# any, words of the detail or "" for any, the cause and where to look).
_CAUSES: tuple[tuple[RefusalReason | None, str, str], ...] = (
    (None, "certificate is not yet valid", "certificate not yet valid: this node's clock is "
     "behind (a Pi has no RTC battery: check timedatectl and NTP)"),
    (None, "certificate has expired", "certificate expired: this node's clock is ahead, or the "
     "server's certificate is old"),
    (RefusalReason.CA_MISMATCH, "", "CA mismatch: it serves another CA than the join token names"),
    (RefusalReason.UNREACHABLE, "timed out", "timeout: no answer on 6443"),
    (RefusalReason.UNREACHABLE, "refused", "refused: nothing listens on 6443 yet"),
    (RefusalReason.UNREACHABLE, "", "unreachable: {detail}"),
    (None, "timed out", "timeout: 6443 accepted the connection but did not finish the proof"),
    (RefusalReason.BAD_CACERTS, "", "bad /cacerts: {detail}"),
    (RefusalReason.VERIFY_FAILED, "", "its certificate does not verify against its own CA: "
     "{detail}"),
    (None, "", "TLS failed: {detail}"),
)  # fmt: skip


def explain(reason: RefusalReason | None, detail: str) -> str:
    """The cause of a failed proof, as STATUS says it ("passed" when it did not fail)."""
    if reason is None:
        return "passed"
    lowered = detail.lower()
    for when, words, cause in _CAUSES:
        if when in (None, reason) and words in lowered:
            return cause.format(detail=detail)
    raise AssertionError("the last cause matches everything")


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


NO_ADDRESS = "no address to dial in its advert"  # why prove_advert found nothing to prove
# Why a server is not proven at all: the token goes only to a CA pinned by it or by the advert.
NO_CA = "its advert names no cluster CA (ca=), and a short token pins none: not joined"


async def prove_advert(
    address: str, ip6: str, *, interface: str, expected_ca_sha256: str | None, capture: bool
) -> ProofResult | None:
    """Prove what an advert offers, best first (its TXT ip4, else the resolved `address`; its TXT
    `ip6`; the resolved one) until one passes or serves another CA; None: nothing dialable."""
    result = None
    for candidate in choose_address(address, ip6, address, interface):
        result = await wire_proof(
            candidate, const.K3S_API_PORT, expected_ca_sha256=expected_ca_sha256,
            timeout=const.WIRE_PROOF_TIMEOUT, capture=capture, interface=interface,
        )
        if result.ok or result.reason == RefusalReason.CA_MISMATCH:
            break
    return result


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
        reason, detail = RefusalReason.VERIFY_FAILED, f"internal error: {describe(exc)}"
    return ProofResult(
        ok=reason is None,
        address=address,
        port=port,
        reason=reason,
        detail=one_line(detail),
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
    sniffer: Capture | None = None
    if capture:
        on = interface or host.partition("%")[2] or None
        sniffer, run.evidence = await Capture.open(ip, port, on, timeout)
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
                RefusalReason.BAD_CACERTS, f"/cacerts cannot be loaded as a CA: {describe(exc)}"
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
        raise _Refused(reason, f"{what}: {describe(exc)}") from exc


async def _get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str
) -> HttpResponse:
    """GET /cacerts written by hand (urllib may resolve names, and lab nodes have no DNS)."""
    writer.write(
        f"GET /cacerts HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: {_USER_AGENT}\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n".encode("ascii")
    )
    await writer.drain()
    response = ResponseReader()
    while True:
        chunk = await reader.read(const.PROBE_READ_CHUNK)
        whole = response.feed(chunk, eof=not chunk)
        if whole is not None:
            return whole
        if not chunk:  # feed raises at EOF; this only guards the loop's end
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
