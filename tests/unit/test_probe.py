"""The wire proof's pure parts: address choice, HTTP response parsing, the capture summary."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.cluster import probe
from agent.cluster.capture import HandshakePacket, summarize_handshake
from agent.cluster.httpresponse import HttpResponse, ResponseError, ResponseReader, parse_response
from agent.cluster.probe import RefusalReason, choose_address, explain, wire_proof

# --- choose_address -----------------------------------------------------------------------------


def test_txt_ip4_then_ip6_then_the_resolved_address() -> None:
    assert choose_address("192.168.1.10", "fd00::10", "192.168.1.11") == [
        "192.168.1.10",
        "fd00::10",
        "192.168.1.11",
    ]


def test_duplicates_are_dialled_once_in_first_place() -> None:
    assert choose_address("10.0.0.5", "fd00::5", "10.0.0.5") == ["10.0.0.5", "fd00::5"]
    # the same IPv6 address written two ways, and an IPv4-mapped form of the ip4
    assert choose_address("10.0.0.5", "FD00:0:0::5", "::ffff:10.0.0.5") == ["10.0.0.5", "fd00::5"]
    assert choose_address("", "fd00::5", " fd00::0005 ") == ["fd00::5"]


@pytest.mark.parametrize(
    ("ip4", "ip6", "resolved"),
    [
        ("", "", ""),
        ("pi-1.local", "not-an-address", "10.0.0.300"),
        ("fd00::1", "10.0.0.1", ""),  # each TXT key holds its own family only
        ("127.0.0.1", "::1", "127.0.1.1"),  # loopback: we would prove ourselves
        ("0.0.0.0", "::", "255.255.255.255"),
        ("224.0.0.251", "ff02::fb", ""),  # the mDNS groups
        ("10.0.0.1%eth0", "fd00::1/64", "[fd00::1]"),
    ],
)
def test_unusable_addresses_are_dropped(ip4: str, ip6: str, resolved: str) -> None:
    assert choose_address(ip4, ip6, resolved, "eth0") == []


def test_the_resolved_address_may_be_of_either_family() -> None:
    assert choose_address("", "", "fd00::7") == ["fd00::7"]
    assert choose_address("", "", "10.1.2.3") == ["10.1.2.3"]


def test_link_local_ipv6_is_dialled_through_the_given_interface() -> None:
    assert choose_address("", "fe80::1", "", "eth0") == ["fe80::1%eth0"]
    # the advertiser's own scope names one of *its* interfaces: ours wins
    assert choose_address("", "fe80::1%wlan0", "fe80::1", "eth0") == ["fe80::1%eth0"]
    assert choose_address("", "fe80::1%eth0", "", None) == ["fe80::1%eth0"]
    assert choose_address("10.0.0.9", "fe80::1", "", None) == ["10.0.0.9"]  # no scope at all


@pytest.mark.parametrize("interface", ["", "a/b", "eth:0", "x" * 16, "eth 0", ".."])
def test_an_interface_that_cannot_be_a_scope_drops_link_local(interface: str) -> None:
    assert choose_address("10.0.0.9", "fe80::1", "", interface) == ["10.0.0.9"]


def test_global_ipv6_loses_a_meaningless_scope_and_ipv4_link_local_stays() -> None:
    assert choose_address("169.254.3.4", "fd00::1%eth9", "", "eth0") == ["169.254.3.4", "fd00::1"]


@given(st.text(max_size=60), st.text(max_size=60), st.text(max_size=60), st.none() | st.text())
@example("10.0.0.1", "fe80::1%1", "fe80::1", "1")
def test_choose_address_never_raises_and_returns_distinct_dialable_addresses(
    ip4: str, ip6: str, resolved: str, interface: str | None
) -> None:
    chosen = choose_address(ip4, ip6, resolved, interface)
    assert len(chosen) == len(set(chosen)) <= 3
    for address in chosen:
        ip = ipaddress.ip_address(address)
        assert not (ip.is_loopback or ip.is_unspecified or ip.is_multicast)
        if ip.version == 6 and ip.is_link_local:
            assert ip.scope_id


# --- parse_response -----------------------------------------------------------------------------

CA = b"-----BEGIN CERTIFICATE-----\nMIIB...\n-----END CERTIFICATE-----\n"
GO_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
    b"Content-Length: " + str(len(CA)).encode() + b"\r\n\r\n" + CA
)


def chunked(body: bytes, sizes: list[int], *, trailer: bytes = b"") -> bytes:
    """`body` in chunks of the given sizes (the rest in one last chunk), then the last-chunk."""
    parts, pos = [], 0
    for size in [*sizes, len(body)]:
        piece = body[pos : pos + size]
        pos += len(piece)
        if piece:
            parts.append(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"".join(parts) + b"0\r\n" + trailer + b"\r\n"


def test_a_go_style_response_with_content_length() -> None:
    assert parse_response(GO_RESPONSE, eof=False) == HttpResponse(200, CA)
    # bytes after the declared body (a pipelined or buggy server) are not the body
    assert parse_response(GO_RESPONSE + b"junk", eof=True) == HttpResponse(200, CA)


@pytest.mark.parametrize(
    "response",
    [GO_RESPONSE, chunked(CA, [7, 1, 30]), chunked(CA, [], trailer=b"X-Trailer: 1\r\n")],
    ids=["content-length", "chunked", "chunked-with-trailer"],
)
def test_every_strict_prefix_asks_for_more_then_fails_at_eof(response: bytes) -> None:
    for cut in range(len(response)):
        assert parse_response(response[:cut], eof=False) is None, cut
        with pytest.raises(ResponseError):
            parse_response(response[:cut], eof=True)
    assert parse_response(response, eof=False) == HttpResponse(200, CA)


def test_a_body_without_length_runs_to_the_close() -> None:
    response = b"HTTP/1.0 200 OK\r\n\r\n" + CA
    assert parse_response(response, eof=False) is None
    assert parse_response(response, eof=True) == HttpResponse(200, CA)


def test_status_codes_are_reported_and_bodiless_ones_are_empty() -> None:
    assert parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nno!", eof=False) == (
        HttpResponse(404, b"no!")
    )
    assert parse_response(b"HTTP/1.1 204 No Content\r\n\r\n", eof=False) == HttpResponse(204, b"")
    assert parse_response(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", eof=False) == (
        HttpResponse(200, b"")
    )


def test_repeated_equal_content_lengths_are_one_length() -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\ncontent-length: 2\r\n\r\nok"
    assert parse_response(response, eof=False) == HttpResponse(200, b"ok")


def test_chunk_extensions_are_ignored() -> None:
    response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n2;name=v\r\nok\r\n0\r\n\r\n"
    assert parse_response(response, eof=False) == HttpResponse(200, b"ok")


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/2 200\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 100 Continue\r\n\r\n", "interim"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\n folded: value\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc", "conflicting"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1e3\r\n\r\n", "invalid content-length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "transfer-encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk-size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX", "CRLF"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "cap"),
    ],
)
def test_unusable_responses_are_a_response_error(response: bytes, message: str) -> None:
    with pytest.raises(ResponseError, match=message):
        parse_response(response, eof=False)


def test_caps_are_enforced_before_the_bytes_arrive() -> None:
    head = b"HTTP/1.1 200 OK\r\n"
    with pytest.raises(ResponseError, match="headers longer than 64 bytes"):
        parse_response(head + b"X: " + b"a" * 100, eof=False, header_max=64)
    with pytest.raises(ResponseError, match="cap"):
        parse_response(head + b"Content-Length: 11\r\n\r\n", eof=False, body_max=10)
    with pytest.raises(ResponseError, match="cap"):
        parse_response(head + b"\r\n" + b"a" * 11, eof=False, body_max=10)
    with pytest.raises(ResponseError, match="cap"):
        parse_response(chunked(b"a" * 11, [5]), eof=False, body_max=10)
    with pytest.raises(ResponseError, match="chunk-size line too long"):
        parse_response(head + b"Transfer-Encoding: chunked\r\n\r\n" + b"1" * 2000, eof=False)
    with pytest.raises(ResponseError, match="response larger"):
        parse_response(b"x" * 200, eof=False, header_max=64, body_max=10)


@settings(max_examples=300)
@given(st.binary(max_size=2000), st.booleans())
@example(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n", True)
@example(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n\xff", True)
def test_junk_bytes_give_a_response_none_or_a_response_error(data: bytes, eof: bool) -> None:
    try:
        response = parse_response(data, eof=eof, body_max=100, header_max=100)
    except ResponseError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    if eof:
        assert response is not None
    if response is not None:
        assert 200 <= response.status <= 999 and len(response.body) <= 100


_HEADER_LINES = st.lists(
    st.sampled_from(
        [
            b"Content-Length: 5",
            b"Content-Length: 99999",
            b"content-length:0",
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: identity",
            b"Connection: close",
            b"X-Junk: \x00\xff",
            b"Bad Header: 1",
            b"",
        ]
    ),
    max_size=4,
)


@settings(max_examples=300)
@given(
    st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 301 Moved", b"HTTP/1.1 999", b"HTTP/1.1 20"]),
    _HEADER_LINES,
    st.binary(max_size=300),
    st.booleans(),
)
def test_plausible_junk_is_bounded_too(
    status: bytes, headers: list[bytes], rest: bytes, eof: bool
) -> None:
    data = b"\r\n".join([status, *headers]) + b"\r\n\r\n" + rest
    try:
        response = parse_response(data, eof=eof, body_max=64)
    except ResponseError:
        return
    assert response is None or len(response.body) <= 64


@given(st.binary(max_size=3000), st.lists(st.integers(1, 700), max_size=8), st.data())
def test_chunked_bodies_survive_any_chunking_and_any_split(
    body: bytes, sizes: list[int], data: st.DataObject
) -> None:
    response = chunked(body, sizes)
    cut = data.draw(st.integers(0, len(response)))
    partial = parse_response(response[:cut], eof=False)
    assert partial is None or cut == len(response)
    assert parse_response(response, eof=False) == HttpResponse(200, body)


def _outcome(parse: Callable[..., HttpResponse | None], data: bytes, **kw: Any) -> object:
    """What a parse of `data` gave: the response, None, or the ResponseError's message."""
    try:
        return parse(data, **kw)
    except ResponseError as exc:
        return f"error: {exc}"


_RESPONSES = st.one_of(
    st.builds(lambda s, h, rest: b"\r\n".join([s, *h]) + b"\r\n\r\n" + rest,
              st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.1 204 No Content", b"HTTP/1.1 2"]),
              _HEADER_LINES, st.binary(max_size=300)),
    st.builds(lambda body, sizes, trailer: chunked(body, sizes, trailer=trailer),
              st.binary(max_size=300), st.lists(st.integers(1, 90), max_size=6),
              st.sampled_from([b"", b"X-Trailer: 1\r\n", b"bad trailer"])),
    st.binary(max_size=300),
)


@settings(max_examples=300)
@given(_RESPONSES, st.lists(st.integers(0, 400), max_size=8), st.booleans())
def test_fed_in_pieces_a_response_reads_as_parse_response_reads_each_prefix(
    response: bytes, cuts: list[int], eof: bool
) -> None:
    reader = ResponseReader(body_max=128, header_max=128)
    done = 0
    for cut in [*sorted(c for c in cuts if c <= len(response)), len(response)]:
        last = cut == len(response) and eof
        got = _outcome(reader.feed, response[done:cut], eof=last)
        done = cut
        assert got == _outcome(
            parse_response, response[:cut], eof=last, body_max=128, header_max=128
        )
        if got is not None:
            return  # a response or an error ends the reading


class Trickle:
    """A connection that hands `data` over one byte per read, as asyncio's reader does when a
    server sends one TLS record per byte; what is written to it is dropped."""

    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    async def read(self, _: int) -> bytes:
        await asyncio.sleep(0)
        self._pos += 1
        return self._data[self._pos - 1 : self._pos]

    def write(self, _: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


def test_cacerts_sent_a_byte_at_a_time_is_read_in_linear_time() -> None:
    # The largest body the cap allows, in 1-byte chunks: re-parsing all that came at every
    # read took minutes (measured on x86: > 60 s); read once, it takes a fraction of a second.
    response = chunked(b"A" * 20000, [1] * 20000)
    server = Trickle(response)

    async def read() -> HttpResponse:
        return await asyncio.wait_for(probe._get(server, server, "x"), 10)  # type: ignore[arg-type]

    started = time.monotonic()
    assert asyncio.run(read()) == HttpResponse(200, b"A" * 20000)
    assert time.monotonic() - started < 5  # measured on x86: 0.3 s


# --- summarize_handshake ------------------------------------------------------------------------

PORT, LOCAL = 6443, 50000


def out(t: float, flags: str, sport: int = LOCAL) -> HandshakePacket:
    return HandshakePacket(t, sport, PORT, flags)


def back(t: float, flags: str, dport: int = LOCAL) -> HandshakePacket:
    return HandshakePacket(t, PORT, dport, flags)


def test_a_completed_handshake() -> None:
    packets = [out(10.0, "S"), back(10.000412, "SA"), out(10.0005, "A")]
    assert summarize_handshake(packets, PORT, LOCAL) == (
        "tcp/6443: SYN sent; SYN-ACK after 0.412 ms (flags SA)"
    )


def test_a_refused_connect_and_a_silent_one() -> None:
    assert summarize_handshake([out(1.0, "S"), back(1.00005, "RA")], PORT, None) == (
        "tcp/6443: SYN sent; RST after 0.050 ms (flags RA)"
    )
    syns = [out(1.0, "S"), out(2.0, "S"), out(4.0, "S")]
    assert summarize_handshake(syns, PORT, None) == "tcp/6443: SYN sent 3 times; no answer seen"
    assert summarize_handshake([], PORT, None) == "tcp/6443: no SYN seen"


def test_loopback_copies_are_not_retransmissions_and_other_connections_are_ignored() -> None:
    packets = [
        out(0.9, "S", sport=40000),  # another connection to the same server
        back(0.9001, "SA", dport=40000),
        out(1.0, "S"),
        out(1.000001, "S"),  # the same segment seen once more on lo
        back(1.0002, "SAE"),
    ]
    assert summarize_handshake(packets, PORT, LOCAL) == (
        "tcp/6443: SYN sent; SYN-ACK after 0.200 ms (flags SAE)"
    )


# --- wire_proof without a network ---------------------------------------------------------------


@pytest.mark.parametrize("address", ["pi-1.local", "", "0.0.0.0", "ff02::fb", "fe80::1"])
def test_an_address_that_cannot_be_dialled_is_refused_without_io(address: str) -> None:
    result = asyncio.run(wire_proof(address, expected_ca_sha256=None, timeout=5))
    assert not result.ok
    assert result.reason is RefusalReason.UNREACHABLE
    assert result.address == address and result.port == 6443
    assert result.ms_elapsed < 50
    assert result.ca_sha256 is None and result.evidence is None


@pytest.mark.parametrize(("reason", "detail", "cause"), [
    (RefusalReason.VERIFY_FAILED, "verified tls handshake: certificate verify failed: "
     "certificate is not yet valid", "certificate not yet valid: this node's clock is behind"),
    (RefusalReason.VERIFY_FAILED, "verified tls handshake: certificate verify failed: "
     "certificate has expired", "certificate expired: this node's clock is ahead"),
    (RefusalReason.CA_MISMATCH, "/cacerts does not hash to the token's CA", "CA mismatch"),
    (RefusalReason.UNREACHABLE, "tcp connect: Connection refused", "refused: nothing listens"),
    (RefusalReason.UNREACHABLE, "tcp connect: timed out", "timeout: no answer on 6443"),
    (RefusalReason.UNREACHABLE, "tcp connect: No route to host", "unreachable: tcp connect: No"),
    (RefusalReason.TLS, "tls handshake: timed out", "timeout: 6443 accepted the connection"),
    (RefusalReason.TLS, "tls handshake: WRONG_VERSION_NUMBER", "TLS failed: tls handshake"),
    (RefusalReason.BAD_CACERTS, "GET /cacerts: HTTP status 404", "bad /cacerts: GET /cacerts"),
    (RefusalReason.VERIFY_FAILED, "verified tls handshake: certificate verify failed: "
     "unable to get local issuer certificate", "its certificate does not verify against its"),
])  # fmt: skip
def test_a_failed_proof_is_explained_by_its_cause(
    reason: RefusalReason, detail: str, cause: str
) -> None:
    assert explain(reason, detail).startswith(cause)
    assert explain(None, "") == "passed"
