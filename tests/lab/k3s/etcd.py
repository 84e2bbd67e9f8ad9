"""A real etcd per server, as k3s embeds one, and the calls k3s makes to it.

The process: Debian's etcd 3.4 as a child of the stand-in, in its process group (a SIGKILL of the
group, the lab's power cut, takes both; `setpriv --pdeathsig KILL` also takes etcd down if the
stand-in alone dies, as an embedded etcd would), with k3s's flags: heartbeat 500 ms, election
5000 ms, client URLs https://127.0.0.1:2379 and https://<address>:2379 with client certificates
required (k3s's server/tls/etcd/: the etcd server CA, this server's server-client.crt, and the
client.crt every etcd client of k3s, and etcdctl, presents), peers on http://<address>:2380 (k3s
uses TLS there too; nothing of ours talks to the peer port).

The calls go through etcd's JSON gateway on the client URL (`/v3/cluster/member/...`), the same
RPCs k3s's Go client makes: MemberList, MemberAddAsLearner, MemberPromote, MemberRemove, Status;
with k3s's etcd client certificate, as agent/cluster/etcd.py (wipe) calls them on a real node.
Measured with etcd 3.4.23 here: a second `MemberAdd(IsLearner)` while one learner exists fails
with "etcdserver: too many learner members in cluster" (etcd 3.4 allows one learner and has no
flag to raise it); a learner that started and caught up can be promoted ~0.6 s after its etcd
starts; the cluster ID hashes the initial peer URLs and cluster token only, never member names.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .addresses import url_host
from .const import (
    ETCD,
    ETCD_CA_CERT,
    ETCD_CLIENT_CERT,
    ETCD_CLIENT_KEY,
    ETCD_CLIENT_PORT,
    ETCD_DIR,
    ETCD_ELECTION,
    ETCD_HEARTBEAT,
    ETCD_LOG,
    ETCD_PEER_PORT,
    ETCD_SERVING_CERT,
    ETCD_SERVING_KEY,
    ETCD_SNAPSHOT_COUNT,
    ETCD_STOP_TIMEOUT,
    ETCD_TIMEOUT,
)

LOCAL = f"https://127.0.0.1:{ETCD_CLIENT_PORT}"


class EtcdError(Exception):
    """An etcd call failed; the message is etcd's own (`etcdserver: ...`) when it answered."""


@dataclass(frozen=True)
class Member:
    """One etcd member as MemberList shows it; an added member that never started has no name."""

    id: int
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]
    learner: bool

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> Member:
        return cls(
            int(raw["ID"]), str(raw.get("name", "")), tuple(raw.get("peerURLs", ())),
            tuple(raw.get("clientURLs", ())), bool(raw.get("isLearner", False)),
        )  # fmt: skip

    def has_host(self, address: str) -> bool:
        """Whether one of its peer URLs points at ADDRESS."""
        return any(urlsplit(url).hostname == address for url in self.peer_urls)


@dataclass(frozen=True)
class Status:
    """One member's own view (maintenance Status): its cluster, its leader, learner or not."""

    cluster_id: int
    member_id: int
    leader: int  # 0 while it knows of no leader
    learner: bool
    applied: int  # raftAppliedIndex: how far it has caught up


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def client_tls(root: Path) -> ssl.SSLContext:
    """k3s's etcd client TLS: trust the etcd server CA, present client.crt."""
    context = ssl.create_default_context(cafile=str(root / ETCD_CA_CERT))
    context.load_cert_chain(root / ETCD_CLIENT_CERT, root / ETCD_CLIENT_KEY)
    return context


class Gateway:
    """etcd's v3 JSON gateway at one client URL; every call is bounded by TIMEOUT s."""

    def __init__(
        self, url: str = LOCAL, timeout: float = ETCD_TIMEOUT, tls: ssl.SSLContext | None = None
    ) -> None:
        parts = urlsplit(url)
        self.url, self.host, self.port = url, parts.hostname or "", parts.port or ETCD_CLIENT_PORT
        self.timeout = timeout
        self.tls = tls

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        connection = http.client.HTTPSConnection(
            self.host, self.port, timeout=self.timeout, context=self.tls
        )
        try:
            connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer: dict[str, Any] = json.loads(response.read() or b"{}")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise EtcdError(f"{self.url}{path}: {exc}") from exc
        finally:
            connection.close()
        if response.status != 200 or "error" in answer:
            raise EtcdError(str(answer.get("error") or answer.get("message") or response.status))
        return answer

    def members(self) -> tuple[int, list[Member]]:
        """(cluster ID, members) as this member sees them."""
        answer = self._post("/v3/cluster/member/list", {})
        members = [Member.parse(m) for m in answer.get("members", [])]
        return int(answer["header"]["cluster_id"]), members

    def add_learner(self, peer_url: str) -> tuple[int, list[Member]]:
        """MemberAdd(IsLearner); (cluster ID, members with the new one); EtcdError if refused."""
        answer = self._post("/v3/cluster/member/add", {"peerURLs": [peer_url], "isLearner": True})
        members = [Member.parse(m) for m in answer.get("members", [])]
        return int(answer["header"]["cluster_id"]), members

    def promote(self, member_id: int) -> None:
        """MemberPromote; EtcdError while the learner has not caught up."""
        self._post("/v3/cluster/member/promote", {"ID": str(member_id)})

    def put(self, key: str, value: str) -> None:
        """Write KEY=VALUE (the gateway takes both base64-encoded)."""
        self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})

    def remove(self, member_id: int) -> None:
        self._post("/v3/cluster/member/remove", {"ID": str(member_id)})

    def status(self) -> Status:
        answer = self._post("/v3/maintenance/status", {})
        header = answer["header"]
        return Status(
            int(header["cluster_id"]), int(header["member_id"]), int(answer.get("leader", 0)),
            bool(answer.get("isLearner", False)), int(answer.get("raftAppliedIndex", 0)),
        )  # fmt: skip


def peer_url(address: str) -> str:
    return f"http://{url_host(address)}:{ETCD_PEER_PORT}"


def client_url(address: str) -> str:
    return f"https://{url_host(address)}:{ETCD_CLIENT_PORT}"


def initial_cluster(members: Sequence[Member], name: str, address: str) -> str:
    """`name=peerURL,...` for a joining member, as k3s's join builds it.

    A member that never started has no name: if it has our address it is us (k3s's rule).
    """
    pairs = []
    for member in members:
        if not member.peer_urls:
            continue
        own = member.name or (name if member.has_host(address) else "")
        pairs.append(f"{own}={member.peer_urls[0]}")
    return ",".join(pairs)


def flags(root: Path, name: str, address: str, cluster: str, state: str) -> dict[str, str]:
    """etcd's flags for this member: k3s's timings, TLS clients on 2379, http peers on 2380."""
    listen = list(dict.fromkeys([LOCAL, client_url(address)]))
    return {
        "name": name,
        "data-dir": str(root / ETCD_DIR),
        "listen-client-urls": ",".join(listen),
        "advertise-client-urls": client_url(address),
        "listen-peer-urls": peer_url(address),
        "initial-advertise-peer-urls": peer_url(address),
        "initial-cluster": cluster,
        "initial-cluster-state": state,
        "heartbeat-interval": str(ETCD_HEARTBEAT),
        "election-timeout": str(ETCD_ELECTION),
        "snapshot-count": str(ETCD_SNAPSHOT_COUNT),
        "cert-file": str(root / ETCD_SERVING_CERT),
        "key-file": str(root / ETCD_SERVING_KEY),
        "trusted-ca-file": str(root / ETCD_CA_CERT),
        "client-cert-auth": "true",
        "logger": "zap",
        "log-outputs": "stderr",
    }


class EtcdProcess:
    """The etcd child: started from the event loop's thread, stopped with a bounded grace."""

    def __init__(self, root: Path, options: dict[str, str]) -> None:
        self.root = root
        self.argv = [
            "setpriv", "--pdeathsig", "KILL", "--", ETCD,
            *(f"--{key}={value}" for key, value in options.items()),  # Go: booleans need =
        ]  # fmt: skip
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> int:
        """Start etcd (its log in server/logs/etcd.log); its PID."""
        log_path = self.root / ETCD_LOG
        log_path.parent.mkdir(parents=True, exist_ok=True)
        # etcd reads ETCD_* variables as flags: a stray one must not change what we run.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with log_path.open("ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                env=env,
            )  # fmt: skip
        return self.proc.pid

    async def exited(self) -> int:
        """Wait for etcd to exit; its exit status."""
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, timeout: float = ETCD_STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL after TIMEOUT s; returns once etcd is gone."""
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
