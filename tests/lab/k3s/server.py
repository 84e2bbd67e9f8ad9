"""The TLS endpoint on 6443: what a k3s server answers joiners, read from one table of routes.

GET /cacerts, /ping, /v1-sugarkube/ca (sha256 of the CA), /v1-sugarkube/members (etcd's view),
/db/info (k3s's: etcd's MemberList, for local requests or with a server's token);
token-authenticated POSTs (401 on a wrong password): /v1-sugarkube/join (an agent gets a kubelet
client certificate), /v1-sugarkube/server-bootstrap (a joining server gets the CA and its key, as
k3s's /v1-k3s/server-bootstrap hands over its bootstrap data) and /v1-sugarkube/etcd-join (the
server adds the joiner to etcd as a learner and answers the initial-cluster string; 409 with
{"reason": "too_many_learners"} when etcd refuses a second learner).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import http.client
import json
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from .addresses import config_list, local_addresses
from .certs import issue
from .const import (
    BODY_MAX,
    HANDSHAKE_TIMEOUT,
    REQUEST_TIMEOUT,
    SERVING_CERT,
    SERVING_KEY,
    TOO_MANY_LEARNERS,
)
from .disk import Cluster, write
from .etcd import EtcdError, Gateway, initial_cluster
from .events import Refused, log

Handler = Callable[["Api", dict[str, Any], str], Awaitable[bytes]]


def _response(status: int, body: bytes, content_type: str = "text/plain") -> bytes:
    reason = http.client.responses.get(status, "Status")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _json(status: int, value: object) -> bytes:
    return _response(status, json.dumps(value).encode(), "application/json")


def _password_of(headers: Mapping[str, str]) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        with contextlib.suppress(ValueError):
            return base64.b64decode(value, validate=True).decode().partition(":")[2]
    if scheme.lower() == "bearer":
        return value
    return None


def node_of(member_name: str) -> str:
    """The node name in an etcd member name `<node>-<8 hex>` (k3s: up to the last hyphen)."""
    head, hyphen, _ = member_name.rpartition("-")
    return head if hyphen and len(head) > 1 else member_name


def refusal_reason(error: EtcdError) -> str:
    """A log token for etcd's refusal of a MemberAdd."""
    text = str(error)
    if TOO_MANY_LEARNERS in text:
        return "too_many_learners"
    if "unhealthy cluster" in text or "not enough started members" in text:
        return "etcd_unhealthy"
    return "etcd_refused"


class Api:
    """Answers requests for one server; joins go to etcd through GATEWAY (None: sqlite)."""

    def __init__(self, cluster: Cluster, name: str, gateway: Gateway | None) -> None:
        self.cluster = cluster
        self.name = name
        self.gateway = gateway

    @property
    def datastore(self) -> str:
        return "sqlite" if self.gateway is None else "etcd"

    def authorized(self, headers: Mapping[str, str]) -> bool:
        given = _password_of(headers)
        expected = self.cluster.password.encode()
        return given is not None and hmac.compare_digest(given.encode(), expected)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                key, sep, value = line.partition(":")
                if sep:
                    headers[key.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if not 0 <= length <= BODY_MAX:
                raise ValueError("body too large")
            body = await asyncio.wait_for(reader.readexactly(length), REQUEST_TIMEOUT)
            answer = await self.route(method, path.split("?", 1)[0], headers, body, str(peer[0]))
            writer.write(answer)
            await writer.drain()
        except (
            OSError,
            ValueError,
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass  # a client that went away or spoke something else: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()

    async def route(
        self, method: str, path: str, headers: Mapping[str, str], body: bytes, peer: str
    ) -> bytes:
        """The answer to one request, from the tables of GET and POST handlers."""
        if method == "GET" and path in self.GETS:
            # k3s's /db/info: IsLocalOrHasRole(k3s:server)
            local = peer in ("127.0.0.1", "::1")
            if path in self.LOCAL_OR_SERVER and not (local or self.authorized(headers)):
                return _response(401, b"unauthorized")
            return await self.GETS[path](self, {}, peer)
        if method != "POST" or path not in self.POSTS:
            return _response(404, b"not found")
        if not self.authorized(headers):
            log("join_rejected", peer=peer, path=path, reason="unauthorized")
            return _response(401, b"unauthorized")
        try:
            request = json.loads(body)
            if not isinstance(request, dict):
                raise TypeError("not an object")
            return await self.POSTS[path](self, request, peer)
        except (KeyError, TypeError, AttributeError, ValueError):
            return _response(400, b"bad request")

    async def cacerts(self, _: dict[str, Any], peer: str) -> bytes:
        return _response(200, self.cluster.ca_pem, "application/x-pem-file")

    async def ping(self, _: dict[str, Any], peer: str) -> bytes:
        return _response(200, b"pong")

    async def ca(self, _: dict[str, Any], peer: str) -> bytes:
        return _response(200, self.cluster.ca.encode() + b"\n")

    async def members(self, _: dict[str, Any], peer: str) -> bytes:
        if self.gateway is None:
            return _json(200, {"datastore": "sqlite", "members": {self.name: {"learner": False}}})
        try:
            cluster_id, members = await asyncio.to_thread(self.gateway.members)
        except EtcdError as exc:
            return _json(503, {"reason": "etcd_unavailable", "error": str(exc)})
        listed = {m.name or f"unstarted-{m.id:x}": {"learner": m.learner} for m in members}
        return _json(200, {"datastore": "etcd", "cluster_id": f"{cluster_id:x}", "members": listed})

    async def db_info(self, _: dict[str, Any], peer: str) -> bytes:
        """k3s's /db/info: etcd's MemberList as Go encodes etcdserverpb.Member (omitempty);
        404 without etcd (sqlite), 500 when etcd does not answer."""
        if self.gateway is None:
            return _response(404, b"not found")
        try:
            _, members = await asyncio.to_thread(self.gateway.members)
        except EtcdError as exc:
            return _response(500, f"failed to get etcd MemberList: {exc}".encode())
        listed = []
        for m in members:
            entry: dict[str, Any] = {"ID": m.id, "name": m.name, "peerURLs": list(m.peer_urls),
                                     "clientURLs": list(m.client_urls), "isLearner": m.learner}
            listed.append({k: v for k, v in entry.items() if v})
        return _json(200, {"members": listed})

    async def join_agent(self, request: dict[str, Any], peer: str) -> bytes:
        name = str(request["name"])
        cert, key = issue(
            self.cluster.ca_pem, self.cluster.ca_key_pem, f"system:node:{name}",
            client=True, organization="system:nodes",
        )  # fmt: skip
        log("join_accepted", name=name, role="agent", peer=peer)
        return _json(200, {
            "ca_cert": self.cluster.ca_pem.decode(), "client_cert": cert.decode(),
            "client_key": key.decode(),
        })  # fmt: skip

    async def server_bootstrap(self, request: dict[str, Any], peer: str) -> bytes:
        name = str(request["name"])
        if self.gateway is None:
            log("join_rejected", name=name, peer=peer, reason="sqlite")
            return _json(409, {"reason": "sqlite", "error": "this server runs sqlite (a single "
                               "server): join it as an agent"})  # fmt: skip
        log("bootstrap_sent", name=name, peer=peer)
        return _json(200, {
            "ca_cert": self.cluster.ca_pem.decode(), "ca_key": self.cluster.ca_key_pem.decode(),
            "etcd_ca": self.cluster.etcd_ca_pem.decode(),
            "etcd_ca_key": self.cluster.etcd_ca_key_pem.decode(),
        })  # fmt: skip

    async def etcd_join(self, request: dict[str, Any], peer: str) -> bytes:
        name, peer_url = str(request["name"]), str(request["peer_url"])
        if self.gateway is None:
            return _json(409, {"reason": "sqlite", "error": "this server runs no etcd"})
        try:
            answer = await asyncio.to_thread(self._add_learner, self.gateway, name, peer_url)
        except EtcdError as exc:
            reason = refusal_reason(exc)
            log("join_rejected", name=name, peer=peer, reason=reason, detail=str(exc))
            return _json(409 if reason == "too_many_learners" else 503,
                         {"reason": reason, "error": str(exc)})  # fmt: skip
        except Refused as exc:
            log("join_rejected", name=name, peer=peer, reason=exc.reason)
            return _json(409, {"reason": exc.reason, "error": str(exc)})
        log("learner_added" if answer["added"] else "member_known", name=name, peer=peer)
        return _json(200, answer)

    @staticmethod
    def _add_learner(gateway: Gateway, name: str, peer_url: str) -> dict[str, Any]:
        """k3s's join: add NAME at PEER_URL as a learner unless etcd already lists it."""
        address = urlsplit(peer_url).hostname or ""
        cluster_id, members = gateway.members()
        ours = [m for m in members if m.has_host(address) and m.name in ("", name)]
        for member in members:
            if member not in ours and node_of(member.name) == node_of(name):
                raise Refused("duplicate_name", f"etcd already has a member for node "
                              f"{node_of(name)!r} ({member.name}): node names must be unique")
        added = not ours
        if added:
            cluster_id, members = gateway.add_learner(peer_url)
        return {
            "initial_cluster": initial_cluster(members, name, address),
            "cluster_id": f"{cluster_id:x}",
            "added": added,
        }

    GETS: ClassVar[dict[str, Handler]] = {
        "/cacerts": cacerts,
        "/ping": ping,
        "/v1-sugarkube/ca": ca,
        "/v1-sugarkube/members": members,
        "/db/info": db_info,
    }
    LOCAL_OR_SERVER: ClassVar[frozenset[str]] = frozenset({"/db/info"})
    POSTS: ClassVar[dict[str, Handler]] = {
        "/v1-sugarkube/join": join_agent,
        "/v1-sugarkube/server-bootstrap": server_bootstrap,
        "/v1-sugarkube/etcd-join": etcd_join,
    }


def listeners(bind: str, port: int) -> list[socket.socket]:
    """Bound, listening sockets: BIND (0.0.0.0 also gets [::], IPv6-only); no name lookups."""
    hosts = [bind, "::"] if bind == "0.0.0.0" else [bind]
    sockets: list[socket.socket] = []
    for host in hosts:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            if sockets:  # the extra [::] socket: a node without IPv6 still serves IPv4
                log("bind_skipped", addr=host, reason=exc.strerror)
                continue
            raise
        port = port or sock.getsockname()[1]
        sockets.append(sock)
    return sockets


def serving_context(
    root: Path, cluster: Cluster, name: str, config: Mapping[str, object], bind: str
) -> ssl.SSLContext:
    """A fresh serving certificate for this node's names and addresses, signed by the cluster CA."""
    sans = ["localhost", name, f"{name}.local", *local_addresses()]
    if bind not in ("0.0.0.0", "::"):
        sans.append(bind)
    for option in ("tls-san", "node-ip", "advertise-address", "node-external-ip"):
        sans += config_list(config, option)
    cert, key = issue(cluster.ca_pem, cluster.ca_key_pem, "k3s", sans=list(dict.fromkeys(sans)))
    write(root / SERVING_CERT, cert)
    write(root / SERVING_KEY, key, 0o600)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(root / SERVING_CERT, root / SERVING_KEY)
    return context


async def serve(api: Api, sockets: list[socket.socket], context: ssl.SSLContext) -> list[Any]:
    """Start answering on SOCKETS; the asyncio servers (close them to stop)."""
    servers = [
        await asyncio.start_server(
            api.handle, sock=sock, ssl=context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
        )
        for sock in sockets
    ]
    addrs = ",".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in sockets)
    log("serving", name=api.name, addr=addrs, port=sockets[0].getsockname()[1], ca=api.cluster.ca,
        datastore=api.datastore)  # fmt: skip
    return servers
