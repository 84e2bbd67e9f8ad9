"""Prometheus metrics (DESIGN.md §A "Observability") and the HTTP endpoint that serves them.

`Metrics` is the facade the daemon calls from the events it already has; nothing polls (the
process collector reads /proc only when scraped). Its registry is its own, never the client's
global one, and the exposition drops every `_created` series: prometheus-client 0.16 (Debian 12)
has no switch for them but an environment variable read at import, so `render()` filters them.

`serve_metrics` is a small HTTP/1.x server on a socket bound here: `http.server` calls getfqdn()
at bind, which hangs on nodes without DNS. One request per connection (`Connection: close`);
the request head's size, the time to read it, the time to write the answer and the number of
open connections are all bounded, and a bad request gets a 4xx, never a traceback. At the
connection cap a newcomer closes the oldest connection that has not sent its request yet, so
idle sockets, however many, never lock a scrape out.
"""

from __future__ import annotations

import asyncio
import copy
import math
import re
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from agent import const
from agent.cluster.election import Phase
from agent.cluster.probe import RefusalReason
from agent.mdns.records import Role
from agent.verify.result import Status

# "wiped" (after `wipe`, until a restart) is the formation runner's, not the machine's.
PHASES = tuple(dict.fromkeys([*(p.value for p in Phase), "wiped"]))
ROLES = tuple(r.value for r in Role)
STATUSES = tuple(s.value for s in Status)
OTHER_REASON = "other"

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 §5.6.2: a method is a token
_VERSION = re.compile(r"HTTP/1\.[0-9]")
_INDEX = b"sugarkube-agent: Prometheus metrics are at /metrics\n"


DEGRADABLE = ("config", "interface", "metrics")  # what fails without holding the gate (local.py)
IGNORED_REASONS = ("unauthenticated", "replayed", "unusable")  # peerwatch.PeerWatch.ignored


class MetricsError(Exception):
    """The endpoint cannot listen; the message says what to change."""


class Metrics:
    """The daemon's metrics; each method records one event, `render()` is the exposition."""

    def __init__(self, version: str, cluster: str, env: str) -> None:
        registry = CollectorRegistry(auto_describe=True)  # catches a name registered twice
        self._discovery = Histogram(
            "sugarkube_mdns_discovery_duration_seconds",
            "Time from starting a browse to the cluster's servers resolved.",
            buckets=const.METRICS_DISCOVERY_BUCKETS, registry=registry,
        )
        self._absence = Histogram(
            "sugarkube_absence_gate_duration_seconds",
            "Time the double-absence gate took to confirm that no server is advertised.",
            buckets=const.METRICS_ABSENCE_BUCKETS, registry=registry,
        )
        self._proof = Histogram(
            "sugarkube_wire_proof_duration_seconds",
            "Time of one port 6443 wire proof (TCP, TLS and /cacerts).",
            buckets=const.METRICS_WIRE_PROOF_BUCKETS, registry=registry,
        )
        self._released = Gauge(
            "sugarkube_gate_released", "1 once the k3s gate is released, else 0.",
            registry=registry,
        )
        self._phase = Gauge(
            "sugarkube_node_phase", "1 for the node's current formation phase, 0 for the others.",
            ["phase"], registry=registry,
        )
        self._peers = Gauge(
            "sugarkube_mdns_peers", "Other nodes of this cluster seen over mDNS, by role.",
            ["role"], registry=registry,
        )
        self._avahi = Gauge(
            "sugarkube_avahi_up", "1 while avahi-daemon answers on D-Bus, else 0.",
            registry=registry,
        )
        self._link = Gauge(
            "sugarkube_link_up", "1 while the mDNS interface's link carries traffic, else 0.",
            registry=registry,
        )
        self._check = Gauge(
            "sugarkube_verifier_check",
            "1 for each verifier check's status in the last run, 0 for its other statuses.",
            ["check", "status"], registry=registry,
        )
        self._stalled = Gauge(
            "sugarkube_join_stalled",
            "1 while the node has waited longer than the warning threshold for a server or "
            "bootstrap node to serve, else 0.",
            registry=registry,
        )
        self._degraded = Gauge(
            "sugarkube_degraded",
            "1 while a part the gate does not wait on fails (config, interface, metrics), else 0.",
            ["what"], registry=registry,
        )
        self._refused = Counter(
            "sugarkube_join_refused", "Servers refused at the wire proof, by reason.",
            ["reason"], registry=registry,
        )
        self._ignored = Counter(
            "sugarkube_adverts_ignored",
            "Adverts of this cluster that never count, by reason: unauthenticated (no valid MAC), "
            "replayed (from an older start of their node), unusable (TXT that cannot be read).",
            ["reason"], registry=registry,
        )
        self._cas = Gauge(
            "sugarkube_cluster_cas",
            "Cluster CAs that authenticated adverts of this cluster/env name: above 1 is a split "
            "brain (two clusters formed under one token).",
            registry=registry,
        )
        self._cas.set(1)
        info = Info("sugarkube_agent", "The agent's version and cluster.", registry=registry)
        info.info({"version": version, "cluster": cluster, "env": env})
        ProcessCollector(registry=registry)  # RSS and CPU: /proc reads at scrape time only
        for phase in PHASES:
            self._phase.labels(phase).set(0)
        for role in ROLES:
            self._peers.labels(role).set(0)
        for what in DEGRADABLE:
            self._degraded.labels(what).set(0)
        # Present at 0 from the start, so that increase() sees the first refusal.
        for reason in RefusalReason:
            self._refused.labels(reason.value)
        self._reasons = {r.value for r in RefusalReason}
        for ignored in IGNORED_REASONS:
            self._ignored.labels(ignored)
        self._checks: set[str] = set()
        self._exposed = CollectorRegistry()
        self._exposed.register(_WithoutCreated(registry))
        self._rendered: bytes | None = None
        self._rendered_at = 0.0

    def discovery(self, seconds: float) -> None:
        """Record one discovery's duration."""
        self._discovery.observe(_duration(seconds))
        self._rendered = None

    def absence_gate(self, seconds: float) -> None:
        """Record how long the double-absence gate took."""
        self._absence.observe(_duration(seconds))
        self._rendered = None

    def wire_proof(self, seconds: float) -> None:
        """Record one wire proof's duration, passed or refused."""
        self._proof.observe(_duration(seconds))
        self._rendered = None

    def gate_released(self, released: bool) -> None:
        """Set the k3s gate's state."""
        self._released.set(1 if released else 0)
        self._rendered = None

    def phase(self, phase: str) -> None:
        """Make `phase` (one of PHASES) the current one; ValueError for another name."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
        for name in PHASES:
            self._phase.labels(name).set(1 if name == phase else 0)
        self._rendered = None

    def peers(self, counts: Mapping[str, int]) -> None:
        """Set the peer count of every role; roles missing from `counts` are 0."""
        for role, count in counts.items():
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
            if count < 0:
                raise ValueError(f"peer count of {role} is negative: {count}")
        for role in ROLES:
            self._peers.labels(role).set(counts.get(role, 0))
        self._rendered = None

    def avahi_up(self, up: bool) -> None:
        """Set whether avahi-daemon answers."""
        self._avahi.set(1 if up else 0)
        self._rendered = None

    def link_up(self, up: bool) -> None:
        """Set whether the mDNS interface's link is up."""
        self._link.set(1 if up else 0)
        self._rendered = None

    def verifier(self, results: Sequence[tuple[str, str]]) -> None:
        """Replace the checks with one verifier run's (check, status) pairs.

        Checks of an earlier run that are not in this one lose their series; only the first
        METRICS_CHECKS_MAX distinct checks are exported. ValueError for a status outside
        STATUSES, and then nothing changes.
        """
        latest: dict[str, str] = {}
        for check, status in results:
            if status not in STATUSES:
                raise ValueError(f"check {check!r} has unknown status {status!r}")
            if check in latest or len(latest) < const.METRICS_CHECKS_MAX:
                latest[check] = status
        for check in self._checks - latest.keys():
            for status in STATUSES:
                self._check.remove(check, status)
        for check, current in latest.items():
            for status in STATUSES:
                self._check.labels(check, status).set(1 if status == current else 0)
        self._checks = set(latest)
        self._rendered = None

    def join_stalled(self, stalled: bool) -> None:
        """Whether joining waits on a node that has not served for minutes."""
        self._stalled.set(1 if stalled else 0)
        self._rendered = None

    def degraded(self, what: str, failing: bool) -> None:
        """Whether `what` (config, interface, metrics) fails while the daemon goes on without it."""
        self._degraded.labels(what).set(1 if failing else 0)
        self._rendered = None

    def join_refused(self, reason: str) -> None:
        """Count one refused server; past METRICS_REASONS_MAX reasons, new ones count as other."""
        if reason not in self._reasons:
            if len(self._reasons) >= const.METRICS_REASONS_MAX:
                reason = OTHER_REASON
            self._reasons.add(reason)
        self._refused.labels(reason).inc()
        self._rendered = None

    def cluster_cas(self, count: int) -> None:
        """How many cluster CAs authenticated adverts name (1 when all agree, or none yet)."""
        self._cas.set(count)
        self._rendered = None

    def advert_ignored(self, reason: str) -> None:
        """Count one advert that must not count (one of IGNORED_REASONS)."""
        self._ignored.labels(reason).inc()
        self._rendered = None

    def render(self) -> bytes:
        """The text exposition (format 0.0.4), without `_created` series.

        Reused until the next event or for METRICS_RENDER_REUSE: a burst of scrapes costs one
        render, not one each, on the daemon's loop.
        """
        now = time.monotonic()
        if self._rendered is None or now - self._rendered_at >= const.METRICS_RENDER_REUSE:
            self._rendered, self._rendered_at = generate_latest(self._exposed), now
        return self._rendered


class _WithoutCreated(Collector):
    """Another registry's metrics minus their `_created` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        """Each metric of the registry, copied without `<name>_created` samples."""
        for metric in self._registry.collect():
            created = metric.name + "_created"
            kept = copy.copy(metric)
            kept.samples = [s for s in metric.samples if s.name != created]
            yield kept


def _duration(seconds: float) -> float:
    """`seconds` if it is a finite, non-negative duration; else ValueError."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a duration must be finite and not negative, not {seconds!r}")
    return seconds


class _BadRequest(Exception):
    """A request we answer with an error status and close."""

    def __init__(self, status: HTTPStatus) -> None:
        super().__init__(status.phrase)
        self.status = status


class MetricsServer:
    """The running endpoint; `port` is the bound port (the one chosen, when asked for 0)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._connections: set[asyncio.Task[Any]] = set()
        # Connections whose request head has not arrived, oldest first: the ones given up for a
        # newcomer at the cap, so idle sockets cannot lock scrapes out.
        self._idle: dict[asyncio.Task[Any], asyncio.StreamWriter] = {}
        self._server: asyncio.Server | None = None
        self.port = 0

    async def _listen(self, sock: socket.socket) -> None:
        # asyncio accepts up to `backlog` connections per wake-up, all in one loop iteration,
        # and passes the same number to listen(): keep its batch small, then let the kernel
        # queue hold a whole burst (a full queue drops SYNs: a 1 s retransmit for the client).
        self._server = await asyncio.start_server(
            self._handle, sock=sock, limit=const.METRICS_REQUEST_MAX,
            backlog=const.METRICS_ACCEPT_BATCH,
        )
        sock.listen(const.METRICS_CONNECTIONS_MAX)
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        """Stop listening, end open connections, and return within METRICS_CLOSE_TIMEOUT."""
        if self._server is None:
            return
        self._server.close()
        pending = list(self._connections)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=const.METRICS_CLOSE_TIMEOUT)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # a stream callback always runs in a task
        self._connections.add(task)
        try:
            if len(self._connections) > const.METRICS_CONNECTIONS_MAX:
                if not self._idle:
                    writer.transport.abort()  # a reset costs less than reading a request
                    return
                oldest = next(iter(self._idle))
                self._idle.pop(oldest).transport.abort()  # its reader ends at once
            self._idle[task] = writer
            await self._answer(task, reader, writer)
        finally:
            self._connections.discard(task)
            self._idle.pop(task, None)
            await _close(writer)

    async def _answer(
        self, task: asyncio.Task[Any], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            async with asyncio.timeout(const.METRICS_READ_TIMEOUT):
                method, target = await _read_head(reader)
            self._idle.pop(task, None)  # a scrape under way: never given up for a newcomer
            response = self._route(method, target)
        except _BadRequest as bad:
            response = _response(bad.status, f"{bad.status.phrase}\n".encode())
        except TimeoutError:
            response = _response(HTTPStatus.REQUEST_TIMEOUT, b"request head not received in time\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return  # the client went away: nobody to answer
        writer.write(response)
        try:
            async with asyncio.timeout(const.METRICS_WRITE_TIMEOUT):
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()  # a client that does not read keeps no buffer of ours
        except ConnectionError:
            pass  # it went away before reading the answer

    def _route(self, method: str, target: str) -> bytes:
        if method not in ("GET", "HEAD"):
            return _response(
                HTTPStatus.METHOD_NOT_ALLOWED, b"only GET and HEAD\n", allow="GET, HEAD"
            )
        path = target.partition("?")[0]
        if path == "/metrics":
            try:
                body = self._metrics.render()
            except Exception as exc:  # a bug: answer 500, report it, keep serving
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "rendering the metrics failed", "exception": exc}
                )
                return _response(HTTPStatus.INTERNAL_SERVER_ERROR, b"rendering failed\n")
            status, content_type = HTTPStatus.OK, CONTENT_TYPE_LATEST
        elif path == "/":
            status, body, content_type = HTTPStatus.OK, _INDEX, "text/plain; charset=utf-8"
        else:
            status, body = HTTPStatus.NOT_FOUND, b"not found; metrics are at /metrics\n"
            content_type = "text/plain; charset=utf-8"
        return _response(status, body, content_type=content_type, head=method == "HEAD")


async def serve_metrics(metrics: Metrics, host: str, port: int) -> MetricsServer:
    """Serve `metrics` at http://host:port/metrics until closed; MetricsError if it cannot bind.

    `host` is an address (`::` takes IPv4 too); a name is resolved within
    METRICS_RESOLVE_TIMEOUT.
    """
    family, address = await _resolve(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    endpoint = MetricsServer(metrics)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.setblocking(False)
        await endpoint._listen(sock)
    except OSError as exc:
        sock.close()
        raise MetricsError(
            f"cannot serve metrics on {_show(host, port)}: {exc.strerror or exc}; set "
            "metrics.listen (SUGARKUBE_METRICS_ADDR) to a free port on an address of this node"
        ) from exc
    except BaseException:
        sock.close()
        raise
    return endpoint


async def _resolve(host: str, port: int) -> tuple[socket.AddressFamily, tuple[Any, ...]]:
    """The family and bind address for host:port; an address literal never touches DNS."""
    kind, passive = socket.SOCK_STREAM, socket.AI_PASSIVE | socket.AI_NUMERICSERV
    try:
        infos = socket.getaddrinfo(host, port, type=kind, flags=passive | socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError):
        try:
            async with asyncio.timeout(const.METRICS_RESOLVE_TIMEOUT):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=kind, flags=passive
                )
        except (TimeoutError, OSError, UnicodeError) as exc:
            raise MetricsError(
                f"cannot resolve {host!r} in metrics.listen: {exc or 'timed out'}; "
                "use an address such as 0.0.0.0 or [::]"
            ) from exc
    family, _, _, _, address = infos[0]
    return family, address


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The request line's method and target, after reading the headers; _BadRequest if bad."""
    budget = const.METRICS_REQUEST_MAX
    lines: list[bytes] = []
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            too_long = HTTPStatus.REQUEST_URI_TOO_LONG if not lines else _HEADERS_TOO_LARGE
            raise _BadRequest(too_long) from exc
        budget -= len(line)
        if budget < 0:
            raise _BadRequest(_HEADERS_TOO_LARGE)
        if line.rstrip(b"\r\n"):
            lines.append(line)
        elif lines:
            break  # the empty line that ends the head
        # else an empty line before the request line, which RFC 9112 §2.2 says to ignore
        if len(lines) > const.METRICS_HEADERS_MAX + 1:
            raise _BadRequest(_HEADERS_TOO_LARGE)
    try:
        method, target, version = lines[0].rstrip(b"\r\n").decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError) as exc:
        raise _BadRequest(HTTPStatus.BAD_REQUEST) from exc
    if not (_TOKEN.fullmatch(method) and target.isprintable() and _VERSION.fullmatch(version)):
        raise _BadRequest(HTTPStatus.BAD_REQUEST)
    return method, target


_HEADERS_TOO_LARGE = HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE


def _response(
    status: HTTPStatus,
    body: bytes,
    *,
    content_type: str = "text/plain; charset=utf-8",
    allow: str = "",
    head: bool = False,
) -> bytes:
    """A whole HTTP/1.1 response that closes the connection; `head` leaves the body out."""
    lines = [
        f"HTTP/1.1 {status.value} {status.phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if allow:
        lines.append(f"Allow: {allow}")
    return "\r\n".join([*lines, "", ""]).encode("ascii") + (b"" if head else body)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close the connection, resetting it if the client does not let it end in time."""
    writer.close()
    try:
        async with asyncio.timeout(const.METRICS_CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        writer.transport.abort()


def _show(host: str, port: int) -> str:
    """host:port, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
