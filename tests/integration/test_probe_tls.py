"""The port 6443 wire proof against real TLS servers on loopback, with CAs made by `openssl`."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.cluster import capture
from agent.cluster.probe import ProofResult, RefusalReason, wire_proof

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

TIMEOUT = 3.0  # s; every proof here that can finish does so in milliseconds


@dataclass(frozen=True)
class Pki:
    """Two unrelated CAs (`a` is the cluster's, `b` an impostor's) and a server key pair of each."""

    a_pem: bytes
    b_pem: bytes
    a_server: tuple[Path, Path]  # cert, key: IP SAN 127.0.0.1 and ::1, signed by CA a
    b_server: tuple[Path, Path]  # same, signed by CA b

    @property
    def a_sha256(self) -> str:
        return hashlib.sha256(self.a_pem).hexdigest()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN=k3s-server-ca-{name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def _make_server(directory: Path, name: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    cert, key, csr = (directory / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        "subjectAltName=IP:127.0.0.1,IP:::1,DNS:kubernetes\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", str(key), "-out", str(csr), "-subj", "/CN=k3s",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
        "-CAcreateserial", "-days", "2", "-extfile", str(extensions), "-out", str(cert),
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_a, ca_b = _make_ca(directory, "a"), _make_ca(directory, "b")
    return Pki(
        a_pem=ca_a[0].read_bytes(),
        b_pem=ca_b[0].read_bytes(),
        a_server=_make_server(directory, "server-a", ca_a),
        b_server=_make_server(directory, "server-b", ca_b),
    )


def _server_context(cert_key: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*map(str, cert_key))
    return context


def http_ok(body: bytes) -> bytes:
    """What Go's net/http sends for k3s' /cacerts handler."""
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


Respond = Callable[[asyncio.StreamWriter], Awaitable[None]]


def replies(data: bytes) -> Respond:
    async def respond(writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return respond


@dataclass
class Server:
    port: int
    requests: list[bytes]


@asynccontextmanager
async def serving(
    respond: Respond | None, *, tls: ssl.SSLContext | None, host: str = "127.0.0.1"
) -> AsyncIterator[Server]:
    """A server on an ephemeral loopback port; `respond` None accepts and never answers."""
    requests: list[bytes] = []
    handlers: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            if respond is None:
                await asyncio.sleep(3600)  # cancelled at the end of the test
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            requests.append(request)
            await respond(writer)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the probe hung up first: that is the behaviour under test
        finally:
            writer.transport.abort()

    server = await asyncio.start_server(handle, host, 0, ssl=tls)
    try:
        yield Server(server.sockets[0].getsockname()[1], requests)
    finally:
        server.close()
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


def run(coroutine: Awaitable[ProofResult]) -> ProofResult:
    async def main() -> ProofResult:
        return await coroutine

    return asyncio.run(main())


def assert_refused(result: ProofResult, reason: RefusalReason) -> None:
    assert not result.ok, result
    assert result.reason is reason, result
    assert result.detail and "\n" not in result.detail
    assert "127.0.0.1" not in result.detail


def test_the_cluster_server_passes_with_the_token_hash(pki: Pki) -> None:
    async def scenario() -> ProofResult:
        async with serving(replies(http_ok(pki.a_pem)), tls=_server_context(pki.a_server)) as srv:
            result = await wire_proof(
                "127.0.0.1", srv.port, expected_ca_sha256=pki.a_sha256, timeout=TIMEOUT
            )
            assert len(srv.requests) == 2  # the unverified fetch, then the verified one
            assert all(r.startswith(b"GET /cacerts HTTP/1.1\r\n") for r in srv.requests)
            return result

    result = run(scenario())
    assert result.ok, result
    assert result.reason is None
    assert result.ca_sha256 == pki.a_sha256
    assert result.evidence is None
    assert 0 < result.ms_elapsed < TIMEOUT * 1000


def test_a_short_token_still_needs_a_self_consistent_server_and_reports_its_hash(
    pki: Pki,
) -> None:
    async def scenario() -> ProofResult:
        async with serving(replies(http_ok(pki.a_pem)), tls=_server_context(pki.a_server)) as srv:
            return await wire_proof("127.0.0.1", srv.port, expected_ca_sha256=None, timeout=TIMEOUT)

    result = run(scenario())
    assert result.ok, result
    assert result.ca_sha256 == pki.a_sha256


def test_ipv6_loopback_with_a_chunked_body(pki: Pki) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    half = len(pki.a_pem) // 2
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{half:x}\r\n".encode()
        + pki.a_pem[:half]
        + f"\r\n{len(pki.a_pem) - half:x};ext=1\r\n".encode()
        + pki.a_pem[half:]
        + b"\r\n0\r\n\r\n"
    )

    async def scenario() -> ProofResult:
        tls = _server_context(pki.a_server)
        async with serving(replies(chunked), tls=tls, host="::1") as srv:
            return await wire_proof(
                "::1", srv.port, expected_ca_sha256=pki.a_sha256, timeout=TIMEOUT
            )

    result = run(scenario())
    assert result.ok, result


def test_an_impostor_with_its_own_ca_is_refused_as_a_ca_mismatch(pki: Pki) -> None:
    async def scenario() -> ProofResult:
        async with serving(replies(http_ok(pki.b_pem)), tls=_server_context(pki.b_server)) as srv:
            result = await wire_proof(
                "127.0.0.1", srv.port, expected_ca_sha256=pki.a_sha256, timeout=TIMEOUT
            )
            assert len(srv.requests) == 1  # never a second, verified request
            return result

    result = run(scenario())
    assert_refused(result, RefusalReason.CA_MISMATCH)
    assert result.ca_sha256 == hashlib.sha256(pki.b_pem).hexdigest()


def test_serving_the_right_ca_with_another_cas_certificate_fails_verification(pki: Pki) -> None:
    async def scenario() -> ProofResult:
        async with serving(replies(http_ok(pki.a_pem)), tls=_server_context(pki.b_server)) as srv:
            return await wire_proof(
                "127.0.0.1", srv.port, expected_ca_sha256=pki.a_sha256, timeout=TIMEOUT
            )

    result = run(scenario())
    assert_refused(result, RefusalReason.VERIFY_FAILED)
    assert "certificate verify failed" in result.detail
    assert result.ca_sha256 == pki.a_sha256


def test_nothing_listening_is_unreachable_at_once() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed below: nothing listens there any more
    result = run(wire_proof("127.0.0.1", port, expected_ca_sha256=None, timeout=TIMEOUT))
    assert_refused(result, RefusalReason.UNREACHABLE)
    assert result.detail == "tcp connect: Connection refused"
    assert result.ms_elapsed < 500


def test_a_server_that_never_answers_is_bounded_by_the_timeout() -> None:
    async def scenario() -> ProofResult:
        async with serving(None, tls=None) as srv:
            return await wire_proof("127.0.0.1", srv.port, expected_ca_sha256=None, timeout=0.5)

    started = time.monotonic()
    result = run(scenario())
    assert_refused(result, RefusalReason.TLS)
    assert result.detail == "tls handshake: timed out"
    assert 450 <= result.ms_elapsed < 1500
    assert time.monotonic() - started < 3


def test_junk_instead_of_http_is_bad_cacerts(pki: Pki) -> None:
    async def scenario() -> ProofResult:
        junk = replies(b"SSH-2.0-OpenSSH_9.2\r\n\x00\xff\r\n\r\n")
        async with serving(junk, tls=_server_context(pki.a_server)) as srv:
            return await wire_proof("127.0.0.1", srv.port, expected_ca_sha256=None, timeout=TIMEOUT)

    result = run(scenario())
    assert_refused(result, RefusalReason.BAD_CACERTS)
    assert result.detail == "GET /cacerts: not an HTTP/1.x status line"


def test_an_error_status_is_bad_cacerts(pki: Pki) -> None:
    async def scenario() -> ProofResult:
        answer = replies(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        async with serving(answer, tls=_server_context(pki.a_server)) as srv:
            return await wire_proof("127.0.0.1", srv.port, expected_ca_sha256=None, timeout=TIMEOUT)

    result = run(scenario())
    assert_refused(result, RefusalReason.BAD_CACERTS)
    assert result.detail == "GET /cacerts: HTTP status 404"


def test_a_body_that_is_no_certificate_is_bad_cacerts(pki: Pki) -> None:
    async def scenario() -> ProofResult:
        answer = replies(http_ok(b"hello, I am not a CA\n"))
        async with serving(answer, tls=_server_context(pki.a_server)) as srv:
            return await wire_proof(
                "127.0.0.1", srv.port, expected_ca_sha256=pki.a_sha256, timeout=TIMEOUT
            )

    result = run(scenario())
    assert_refused(result, RefusalReason.BAD_CACERTS)
    assert result.ca_sha256 is None


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "until-close"])
def test_a_huge_body_is_capped_not_read(pki: Pki, declared: bool) -> None:
    size = 256 * 1024 * 1024  # far more than the cap, and more than the timeout lets it send

    async def endless(writer: asyncio.StreamWriter) -> None:
        head = f"Content-Length: {size}\r\n" if declared else ""
        writer.write(f"HTTP/1.1 200 OK\r\n{head}\r\n".encode())
        block = b"A" * 65536
        for _ in range(size // len(block)):
            writer.write(block)
            await writer.drain()

    async def scenario() -> ProofResult:
        async with serving(endless, tls=_server_context(pki.a_server)) as srv:
            return await wire_proof("127.0.0.1", srv.port, expected_ca_sha256=None, timeout=TIMEOUT)

    result = run(scenario())
    assert_refused(result, RefusalReason.BAD_CACERTS)
    assert "cap" in result.detail
    assert result.ms_elapsed < 2000


def test_a_scoped_link_local_address_without_such_an_interface_is_refused_at_once() -> None:
    result = run(
        wire_proof("fe80::1", 6443, expected_ca_sha256=None, timeout=TIMEOUT, interface="nosuch0")
    )
    assert_refused(result, RefusalReason.UNREACHABLE)
    assert result.ms_elapsed < 100


@pytest.mark.parametrize("capture", [False, True], ids=["plain", "capturing"])
def test_cancellation_is_not_swallowed(capture: bool) -> None:
    async def scenario() -> None:
        async with serving(None, tls=None) as srv:
            task = asyncio.create_task(
                wire_proof(
                    "127.0.0.1", srv.port, expected_ca_sha256=None, timeout=30, capture=capture
                )
            )
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 3
    assert no_sniffer_left()


def no_sniffer_left() -> bool:
    """Whether every capture thread has ended (they are stopped, not left to time out)."""
    deadline = time.monotonic() + 2
    while any(t.name == "AsyncSniffer" for t in threading.enumerate()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


# --- packet capture -----------------------------------------------------------------------------


def test_capture_on_loopback_records_the_syn_and_syn_ack(pki: Pki) -> None:
    if not capture.capture_permitted():
        pytest.skip("packet capture needs root or CAP_NET_RAW")
    pytest.importorskip("scapy")

    async def scenario() -> ProofResult:
        async with serving(replies(http_ok(pki.a_pem)), tls=_server_context(pki.a_server)) as srv:
            return await wire_proof(
                "127.0.0.1",
                srv.port,
                expected_ca_sha256=pki.a_sha256,
                timeout=TIMEOUT,
                capture=True,
                interface="lo",
            )

    result = run(scenario())
    assert result.ok, result
    assert result.evidence is not None
    assert result.evidence.startswith("tcp/") and "SYN sent; SYN-ACK after" in result.evidence
    assert "(flags SA" in result.evidence
    assert "127.0.0.1" not in result.evidence
    assert no_sniffer_left()


def test_capture_of_a_refused_connect_records_the_rst() -> None:
    if not capture.capture_permitted():
        pytest.skip("packet capture needs root or CAP_NET_RAW")
    pytest.importorskip("scapy")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = run(
        wire_proof("127.0.0.1", port, expected_ca_sha256=None, timeout=TIMEOUT, capture=True)
    )  # no interface: the route to 127.0.0.1 picks lo
    assert_refused(result, RefusalReason.UNREACHABLE)
    assert result.evidence is not None and "SYN sent; RST after" in result.evidence


@contextmanager
def full_accept_queue() -> Iterator[int]:
    """A loopback port whose accept queue is full: Linux drops further SYNs, connects hang."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            time.sleep(0.1)
            yield port
        finally:
            for filler in fillers:
                filler.close()


def test_capture_of_a_connect_nobody_answers_shows_the_retransmitted_syns() -> None:
    if not capture.capture_permitted():
        pytest.skip("packet capture needs root or CAP_NET_RAW")
    pytest.importorskip("scapy")
    with full_accept_queue() as port:
        result = run(
            wire_proof("127.0.0.1", port, expected_ca_sha256=None, timeout=1.5, capture=True)
        )
    assert_refused(result, RefusalReason.UNREACHABLE)
    assert result.detail == "tcp connect: timed out"
    assert result.evidence == f"tcp/{port}: SYN sent 2 times; no answer seen"  # at 0 s and 1 s
    assert no_sniffer_left()


def test_cancelling_during_a_captured_connect_stops_the_sniffer() -> None:
    if not capture.capture_permitted():
        pytest.skip("packet capture needs root or CAP_NET_RAW")
    pytest.importorskip("scapy")

    async def scenario(port: int) -> None:
        task = asyncio.create_task(
            wire_proof("127.0.0.1", port, expected_ca_sha256=None, timeout=30, capture=True)
        )
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with full_accept_queue() as port:
        asyncio.run(scenario(port))
    assert no_sniffer_left()


def test_capture_without_scapy_is_reported_and_the_proof_goes_on(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not capture.capture_permitted():
        pytest.skip("this path is reached only when capture is permitted")
    for name in [n for n in sys.modules if n == "scapy" or n.startswith("scapy.")] + ["scapy"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import scapy...` now fails

    async def scenario() -> ProofResult:
        async with serving(replies(http_ok(pki.a_pem)), tls=_server_context(pki.a_server)) as srv:
            return await wire_proof(
                "127.0.0.1", srv.port, expected_ca_sha256=pki.a_sha256, timeout=TIMEOUT,
                capture=True, interface="lo",
            )  # fmt: skip

    result = run(scenario())
    assert result.ok, result
    assert result.evidence == "capture unavailable: scapy is not installed"


def test_capture_not_permitted_is_reported_and_the_proof_goes_on(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(capture, "capture_permitted", lambda: False)

    async def scenario() -> ProofResult:
        async with serving(replies(http_ok(pki.a_pem)), tls=_server_context(pki.a_server)) as srv:
            return await wire_proof(
                "127.0.0.1", srv.port, expected_ca_sha256=pki.a_sha256, timeout=TIMEOUT,
                capture=True,
            )  # fmt: skip

    result = run(scenario())
    assert result.ok, result
    assert result.evidence == "capture unavailable: not permitted (needs root or CAP_NET_RAW)"


def test_capture_on_a_missing_interface_is_reported_and_the_proof_goes_on(pki: Pki) -> None:
    if not capture.capture_permitted():
        pytest.skip("this path is reached only when capture is permitted")
    pytest.importorskip("scapy")

    async def scenario() -> ProofResult:
        async with serving(replies(http_ok(pki.a_pem)), tls=_server_context(pki.a_server)) as srv:
            return await wire_proof(
                "127.0.0.1", srv.port, expected_ca_sha256=pki.a_sha256, timeout=TIMEOUT,
                capture=True, interface="nosuch0",
            )  # fmt: skip

    result = run(scenario())
    assert result.ok, result
    assert result.evidence is not None
    assert result.evidence.startswith("capture unavailable: ")
