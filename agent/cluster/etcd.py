"""Leaving the cluster's etcd: this server's member removed, as k3s removes a deleted node's.

k3s runs an embedded etcd on every server with client URLs `https://127.0.0.1:2379` and
`https://<node-ip>:2379`, client certificates required and signed by the etcd server CA every
server shares: `server/tls/etcd/server-ca.crt`, `client.crt`, `client.key` (the files k3s's docs
hand `etcdctl`). etcd's JSON gateway answers on the same port (etcd's embed.NewConfig turns it
on and k3s leaves it so): MemberList and MemberRemove, the calls k3s's own etcd controller makes
(pkg/etcd RemovePeer) when a server's Node is deleted. This node's member is the one named in
`server/db/etcd/name` (`<hostname>-<8 hex>`, k3s's nameFile).

Why before anything else: a wiped server whose member stays listed is a voter that never
answers. Of three voters one is gone for good and the next loss costs the quorum; and a new
etcd member for the same node name is refused ("duplicate node name"). So `leave()` runs while
k3s still runs, asks a member for the list, and has another voter remove ours and confirm it
is gone (the member removed stops its own etcd and could confirm nothing). With no other voter
there is nothing to leave: the cluster ends with this node. What it will not do: remove a member
etcd refuses to remove. etcd's strict reconfiguration check refuses ("unhealthy cluster") while
any voter has been connected to the leader for less than 5 s, a member promoted or restarted
just now (measured in the lab: a wipe right after the third server's promotion); that is retried
for 15 s. It refuses for good when the removal would leave too few started members; that
refusal is reported as it is.
"""

from __future__ import annotations

import http.client
import json
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from agent import const
from agent.cluster import k3s

ETCD_DIR = k3s.SERVER_DB + "/etcd"
NAME_FILE = ETCD_DIR + "/name"  # k3s's nameFile: this server's member name
CONFIG_FILE = ETCD_DIR + "/config"  # the options k3s last started etcd with (YAML)
TLS_DIR = k3s.K3S_STATE + "/server/tls/etcd"
SERVER_CA = TLS_DIR + "/server-ca.crt"
CLIENT_CERT = TLS_DIR + "/client.crt"
CLIENT_KEY = TLS_DIR + "/client.key"
LOCAL = f"https://127.0.0.1:{const.ETCD_CLIENT_PORT}"


class EtcdError(Exception):
    """etcd could not be asked, or refused; one line, etcd's own words when it answered."""


@dataclass(frozen=True)
class Member:
    """One member as MemberList shows it (a member added but never started has no name)."""

    id: int
    name: str
    peer_urls: tuple[str, ...] = ()
    client_urls: tuple[str, ...] = ()
    learner: bool = False


@dataclass(frozen=True)
class Plan:
    """What leaving means for this list: `absent`, `last` (no other voter) or `remove`."""

    action: str
    own: Member | None = None
    voters: tuple[Member, ...] = ()  # the other voters: who removes ours and confirms


def plan_leave(members: Sequence[Member], own_name: str) -> Plan:
    """Decide from a member list: is this node listed, and is any other voter left?"""
    own = next((m for m in members if m.name == own_name), None)
    if own is None:
        return Plan("absent")
    voters = tuple(m for m in members if m.id != own.id and not m.learner)
    return Plan("remove" if voters else "last", own, voters)


def client_context(root: Path) -> ssl.SSLContext:
    """TLS as k3s's etcd clients speak it: the etcd server CA, k3s's etcd client certificate."""
    try:
        context = ssl.create_default_context(cafile=str(root / SERVER_CA))
        context.load_cert_chain(root / CLIENT_CERT, root / CLIENT_KEY)
    except (OSError, ssl.SSLError) as exc:
        raise EtcdError(
            f"cannot load k3s's etcd client certificate from {root / TLS_DIR}: "
            f"{getattr(exc, 'strerror', None) or exc}"
        ) from exc
    return context


class Client:
    """etcd's JSON gateway at one client URL; each call bounded by timeout s."""

    def __init__(
        self, url: str, context: ssl.SSLContext, timeout: float = const.ETCD_TIMEOUT
    ) -> None:
        parts = urlsplit(url)
        self.url = url
        self._host, self._port = parts.hostname or "", parts.port or const.ETCD_CLIENT_PORT
        self._context = context
        self._timeout = timeout

    def _post(self, path: str, body: dict[str, object]) -> dict[str, object]:
        connection = http.client.HTTPSConnection(
            self._host, self._port, timeout=self._timeout, context=self._context
        )
        try:
            connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read(const.ETCD_ANSWER_MAX + 1)
        except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
            raise EtcdError(f"{self.url} does not answer ({exc})") from exc
        finally:
            connection.close()
        try:
            answer = json.loads(data or b"{}")
        except ValueError as exc:
            raise EtcdError(f"{self.url}{path} answered {response.status}, not JSON") from exc
        if not isinstance(answer, dict):
            raise EtcdError(f"{self.url}{path} answered {response.status}, not a JSON object")
        if response.status != 200 or "error" in answer:
            detail = answer.get("error") or answer.get("message") or response.status
            raise EtcdError(f"{self.url} refused: {detail}")
        return answer

    def members(self) -> list[Member]:
        """MemberList."""
        raw = self._post("/v3/cluster/member/list", {}).get("members", [])
        try:
            return [_member(m) for m in raw] if isinstance(raw, list) else []
        except (KeyError, TypeError, ValueError) as exc:
            raise EtcdError(f"{self.url}: a member list etcd would not send ({exc})") from exc

    def remove(self, member_id: int) -> None:
        """MemberRemove."""
        self._post("/v3/cluster/member/remove", {"ID": str(member_id)})


def _member(raw: dict[str, object]) -> Member:
    def urls(key: str) -> tuple[str, ...]:
        value = raw.get(key) or []
        return tuple(str(u) for u in value) if isinstance(value, list) else ()

    return Member(
        int(str(raw["ID"])), str(raw.get("name") or ""), urls("peerURLs"), urls("clientURLs"),
        bool(raw.get("isLearner", False)),
    )  # fmt: skip


def known_endpoints(root: Path) -> list[str]:
    """Client URLs to ask when the local etcd does not answer: the other members' addresses as
    `initial-cluster` in the options k3s last started etcd with names them (peer port 2380)."""
    try:
        options = yaml.safe_load((root / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return []
    text = str(options.get("initial-cluster", "")) if isinstance(options, dict) else ""
    own = _own_name(root)
    urls = []
    for pair in text.split(","):
        name, _, peer = pair.partition("=")
        host = urlsplit(peer.strip()).hostname
        if host and name.strip() != own:
            host = f"[{host}]" if ":" in host else host
            urls.append(f"https://{host}:{const.ETCD_CLIENT_PORT}")
    return urls


def _own_name(root: Path) -> str:
    try:
        return (root / NAME_FILE).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def leave(root: Path, timeout: float = const.ETCD_TIMEOUT) -> str:
    """Remove this server's etcd member through another voter; what was done, one line.

    EtcdError (one line) when it is not done: nothing answered, etcd refused, or the member
    is still listed afterwards.
    """
    if not k3s.etcd_initialized(root):
        return "etcd: no embedded etcd here (an agent, sqlite, or a server that never joined)"
    own_name = _own_name(root)
    if not own_name:
        raise EtcdError(f"{root / NAME_FILE} is missing: cannot tell which etcd member is ours")
    context = client_context(root)
    members, errors = None, []
    for url in [LOCAL, *known_endpoints(root)]:
        try:
            members = Client(url, context, timeout).members()
            break
        except EtcdError as exc:
            errors.append(str(exc))
    if members is None:
        raise EtcdError(
            "no etcd member answers (" + "; ".join(errors) + "); "
            "start k3s here or power on another server, then wipe again"
        )
    plan = plan_leave(members, own_name)
    if plan.action == "absent":
        return f"etcd: member {own_name} is not listed (already removed)"
    if plan.action == "last":
        return f"etcd: {own_name} is the last voting member: no other server to leave"
    assert plan.own is not None
    for voter in plan.voters:
        for url in voter.client_urls:
            client = Client(url, context, timeout)
            try:
                _remove(client, plan.own.id)
                after = client.members()
            except EtcdError as exc:
                if "refused" in str(exc):
                    raise EtcdError(f"etcd refused to remove {own_name}: {exc}") from exc
                errors.append(str(exc))
                continue
            if any(m.id == plan.own.id for m in after):
                raise EtcdError(f"{url} still lists {own_name} after removing it")
            remain = sum(not m.learner for m in after)
            return (
                f"etcd: left the cluster: member {own_name} removed by {voter.name or url} "
                f"({remain} voting member{'s remain' if remain != 1 else ' remains'})"
            )
    raise EtcdError(
        f"no other voting member answers to remove {own_name} (" + "; ".join(errors) + ")"
    )


def _remove(client: Client, member_id: int) -> None:
    """MemberRemove; a member already gone (k3s's controller was quicker) is removed too.

    Retried while etcd answers "unhealthy cluster" (a voter connected less than 5 s ago), for
    ETCD_UNHEALTHY_RETRY s; then that refusal is the answer.
    """
    deadline = time.monotonic() + const.ETCD_UNHEALTHY_RETRY
    while True:
        try:
            client.remove(member_id)
        except EtcdError as exc:
            if "member not found" in str(exc):
                return
            if "unhealthy cluster" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(const.ETCD_RETRY_EVERY)
        else:
            return
