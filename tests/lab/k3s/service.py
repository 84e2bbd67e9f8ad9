"""What `k3s server` and `k3s agent` do from start to stop, as far as the network can tell.

A server, in k3s's order (pkg/etcd/etcd.go Start): with etcd's WAL on disk it restarts that
member whatever its config says; else `server:` joins (bootstrap data, then MemberAdd as a
learner through the server, then etcd with initial-cluster-state=existing); else `cluster-init`
starts a new etcd cluster (state=new); else it is a single server on sqlite. The CA, the token
and server/db/etcd/name land on disk first, before etcd runs or anything is served.

It listens on 6443 only once both hold: its start-to-serve delay, counted from process start,
has passed, and its datastore can answer (sqlite at once; etcd: the local member is a voter and
knows a leader, so a joiner serves only after its promotion and a restarted member only with a
quorum). k3s before v1.26.5 exited when etcd refused the learner ("ETCD join failed", fatal);
the stand-in does the same (exit 1) and leaves the retry to the unit's Restart=always.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent import tokens
from agent.cluster import k3s

from . import disk, etcd
from .addresses import node_address
from .certs import new_ca
from .client import Trusted, trust
from .const import (
    ETCD_JOIN_TIMEOUT,
    ETCD_POLL,
    JOIN_RETRY,
    LEARNER_MAX_STALL,
    LEASE_KEY,
    LEASE_RENEW,
)
from .events import Refused, log
from .learners import LearnerManager
from .server import Api, listeners, serve, serving_context

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """One start of the stand-in: where, who, and its timings (s)."""

    root: Path
    name: str  # the node name (hostname)
    bind: str
    port: int
    join_timeout: float
    serve_delay: float
    learner_tick: float
    started: float  # monotonic s when the process started

    @property
    def voter_timeout(self) -> float:
        """How long a member may wait to become a voter: k3s removes a learner stalled 5 min."""
        return LEARNER_MAX_STALL + 2 * self.learner_tick


def flag(value: object) -> bool:
    """A k3s boolean flag's value (Go's strconv.ParseBool on convert.ToString)."""
    return str(value).lower() in ("1", "t", "true")


def token_of(config: Mapping[str, object]) -> str | None:
    """The token k3s would use: `token`, else the trimmed contents of `token-file`."""
    if config.get("token") not in (None, ""):
        return str(config["token"])
    if config.get("token-file"):
        return Path(str(config["token-file"])).read_text().strip() or None
    return None


async def trusted_server(url: str, token: str | None, timeout: float) -> Trusted:
    """k3s's CA pinning against URL, retried until it answers; each try in a thread."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncio.to_thread(trust, url, token)
        except Refused as exc:
            if exc.reason != "unreachable" or time.monotonic() > deadline:
                raise
        await asyncio.sleep(JOIN_RETRY)


async def unless_exited(member: etcd.EtcdProcess, work: Awaitable[T]) -> T:
    """WORK's result, or Refused if etcd exits first (k3s dies with its embedded etcd)."""
    task = asyncio.ensure_future(work)
    exited = asyncio.ensure_future(member.exited())
    try:
        await asyncio.wait({task, exited}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, exited):
            pending.cancel()
    if not task.done():
        raise Refused("etcd_exited", f"etcd exited with status {exited.result()}")
    return task.result()


async def wait_voter(gateway: etcd.Gateway, timeout: float, started: float) -> etcd.Status:
    """Poll the local member until it is a voter that knows a leader; Refused after TIMEOUT s."""
    deadline = time.monotonic() + timeout
    logged_learner = False
    while True:
        with contextlib.suppress(etcd.EtcdError):
            status = await asyncio.to_thread(gateway.status)
            if status.leader and not status.learner:
                return status
            if status.leader and not logged_learner:
                logged_learner = True
                log("learner", cluster_id=f"{status.cluster_id:x}",
                    ms_elapsed=round((time.monotonic() - started) * 1000))  # fmt: skip
        if time.monotonic() > deadline:
            raise Refused("etcd_not_ready", f"etcd is no voter with a leader after {timeout:g} s")
        await asyncio.sleep(ETCD_POLL)


async def renew_leases(gateway: etcd.Gateway, name: str) -> None:
    """Write to etcd every LEASE_RENEW s, as a k3s server's controllers do; a write etcd cannot
    take now (no leader yet, a quorum lost) is skipped, as a lease renewal that times out is."""
    while True:
        with contextlib.suppress(etcd.EtcdError):
            await asyncio.to_thread(gateway.put, LEASE_KEY + name, f"{time.time():.3f}")
        await asyncio.sleep(LEASE_RENEW)


class Server:
    """`k3s server`: its datastore, its API once ready, its learner manager."""

    def __init__(self, settings: Settings, config: Mapping[str, object]) -> None:
        self.s = settings
        self.config = config
        self.member: etcd.EtcdProcess | None = None
        self.gateway: etcd.Gateway | None = None

    async def run(self) -> None:
        """Start, serve once ready, and run until cancelled or etcd fails (Refused)."""
        cluster = await self.start()
        await asyncio.sleep(max(0.0, self.s.started + self.s.serve_delay - time.monotonic()))
        root = self.s.root
        context = serving_context(root, cluster, self.s.name, self.config, self.s.bind)
        servers = await serve(Api(cluster, self.s.name, self.gateway), listeners(self.s.bind,
                              self.s.port), context)  # fmt: skip
        try:
            if self.member is None or self.gateway is None:
                await asyncio.Future()  # sqlite: serve until cancelled
            else:
                manager = LearnerManager(self.gateway, self.s.learner_tick)
                work = asyncio.gather(manager.run(), renew_leases(self.gateway, self.s.name))
                await unless_exited(self.member, work)
        finally:
            for listener in servers:
                listener.close()

    async def stop(self) -> None:
        if self.member is not None:
            await self.member.stop()

    async def start(self) -> disk.Cluster:
        """Bring the datastore up the way k3s decides it; the cluster's secrets."""
        root, config = self.s.root, self.config
        state = disk.datastore(root)
        if state is disk.Datastore.ETCD:
            cluster = disk.Cluster.load(root)
            log("restarted", name=self.s.name, role="server", datastore="etcd", ca=cluster.ca)
            await self._etcd(cluster, disk.etcd_config(root), "restarted")
            return cluster
        if state is disk.Datastore.SQLITE:
            cluster = disk.Cluster.load(root)
            log("restarted", name=self.s.name, role="server", datastore="sqlite", ca=cluster.ca)
            return cluster
        token = token_of(config)
        if config.get("server"):
            return await self._join(str(config["server"]), token)
        cluster = disk.Cluster.new(root, token, disk.seeded_ca(root) or new_ca())
        cluster.save(root)
        if not flag(config.get("cluster-init", False)):
            disk.make_sqlite(root)
            log("bootstrapped", name=self.s.name, datastore="sqlite", ca=cluster.ca)
            return cluster
        name = disk.member_name(root, self.s.name)
        address = node_address(config, self.s.bind)
        options = etcd.flags(root, name, address, f"{name}={etcd.peer_url(address)}", "new")
        disk.save_etcd_config(root, options)
        log("bootstrapped", name=self.s.name, datastore="etcd", ca=cluster.ca, member=name)
        await self._etcd(cluster, options, "bootstrapped")
        return cluster

    async def _join(self, url: str, token: str | None) -> disk.Cluster:
        """Bootstrap data from URL, then etcd membership as a learner, then wait for promotion."""
        root = self.s.root
        name = disk.member_name(root, self.s.name)  # k3s: setName, before anything else
        trusted = await trusted_server(url, token, self.s.join_timeout)
        log("join_request", server=url, role="server", ca=tokens.ca_hash(trusted.cacerts))
        boot = await asyncio.to_thread(
            trusted.call, "/v1-sugarkube/server-bootstrap", {"name": name}, "server"
        )
        cluster = disk.Cluster(trusted.cacerts, boot["ca_key"].encode(), trusted.token.password,
                               boot["etcd_ca"].encode(), boot["etcd_ca_key"].encode())
        cluster.save(root)
        address = node_address(self.config, self.s.bind)
        added = await asyncio.to_thread(
            trusted.call, "/v1-sugarkube/etcd-join",
            {"name": name, "peer_url": etcd.peer_url(address)}, "server", ETCD_JOIN_TIMEOUT,
        )  # fmt: skip
        options = etcd.flags(root, name, address, str(added["initial_cluster"]), "existing")
        disk.save_etcd_config(root, options)
        log("etcd_joining", member=name, cluster_id=added["cluster_id"],
            initial_cluster=added["initial_cluster"])  # fmt: skip
        status = await self._etcd(cluster, options, "joined")
        log("joined", name=self.s.name, role="server", ca=cluster.ca, member=name,
            cluster_id=f"{status.cluster_id:x}")  # fmt: skip
        return cluster

    async def _etcd(
        self, cluster: disk.Cluster, options: dict[str, str], why: str
    ) -> etcd.Status:
        """Start etcd with OPTIONS and wait until the local member is a voter with a leader."""
        root = self.s.root
        address = node_address(self.config, self.s.bind)
        sans = list(dict.fromkeys(["127.0.0.1", "localhost", self.s.name, address]))
        disk.etcd_certs(root, cluster, sans)  # as k3s writes them at every start
        self.member = etcd.EtcdProcess(root, options)
        self.gateway = etcd.Gateway(tls=etcd.client_tls(root))
        begun = time.monotonic()
        pid = await self.member.start()
        log("etcd_started", member=options["name"], pid=pid,
            cluster_state=options["initial-cluster-state"], why=why)  # fmt: skip
        status = await unless_exited(
            self.member, wait_voter(self.gateway, self.s.voter_timeout, begun)
        )
        log("etcd_voter", member=options["name"], cluster_id=f"{status.cluster_id:x}",
            ms_elapsed=round((time.monotonic() - begun) * 1000))  # fmt: skip
        return status


class Agent:
    """`k3s agent`: join once (a kubelet client certificate), then idle; no etcd, no 6443."""

    def __init__(self, settings: Settings, config: Mapping[str, object]) -> None:
        self.s = settings
        self.config = config

    async def run(self) -> None:
        root = self.s.root
        if k3s.membership(root) is k3s.Membership.AGENT:
            log("restarted", name=self.s.name, role="agent")
        else:
            url = self.config.get("server")
            if not url:
                raise Refused("no_server", "an agent needs `server:` in its config (k3s: --server)")
            trusted = await trusted_server(str(url), token_of(self.config), self.s.join_timeout)
            log("join_request", server=url, role="agent", ca=tokens.ca_hash(trusted.cacerts))
            reply: dict[str, Any] = await asyncio.to_thread(
                trusted.call, "/v1-sugarkube/join", {"name": self.s.name, "role": "agent"}, "node"
            )
            disk.save_agent(root, trusted.cacerts, reply["client_cert"].encode(),
                            reply["client_key"].encode())  # fmt: skip
            log("joined", name=self.s.name, role="agent", ca=tokens.ca_hash(trusted.cacerts))
        await asyncio.Future()

    async def stop(self) -> None:
        return None


async def supervise(node: Server | Agent, install: Callable[[asyncio.Event], None]) -> int:
    """Run NODE until it fails (1) or a signal sets the stop event (0); etcd always stopped."""
    stop = asyncio.Event()
    install(stop)
    work = asyncio.ensure_future(node.run())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Refused):
                await work
            log("stopped")
            return 0
        try:
            work.result()
        except Refused as exc:
            log("refused", reason=exc.reason, detail=str(exc))
        except Exception as exc:  # the daemon's last word: one line, never a traceback
            log("failed", reason=type(exc).__name__, detail=str(exc)[:300])
        return 1
    finally:
        stopping.cancel()
        await node.stop()
