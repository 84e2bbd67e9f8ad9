"""A stand-in for k3s in the lab: what a node's k3s shows the network, without Kubernetes.

It reads k3s's merged config (config.yaml, then config.yaml.d/*.yaml: our gate's drop-in among
them) and, like `k3s server`, either bootstraps a cluster CA (`cluster-init: true`: etcd; neither
that nor `server:`: a single sqlite server) or joins `server:` the way a k3s node does: fetch
/cacerts unverified, compare its sha256 with a secure token's hash (refusing before any
credential is sent), check the server certificate against that CA, then present the password.
A server that joins receives the cluster CA and key (k3s shares them through its bootstrap data)
and serves too; an agent (`--agent`, as `k3s agent`) receives a kubelet client certificate and
does not serve. State lands where k3s keeps it, so `membership()` and `wipe` see a real layout.

Run inside a node, after `sugarkube-agent gate` returned 0, as k3s would be:
    /usr/bin/python3 -m tests.lab.k3s_standin [--root /] [--bind 0.0.0.0] [--port 6443]
        [--agent] [--name HOST] [--join-timeout 60]
    /usr/bin/python3 -m tests.lab.k3s_standin --query {ca,members,ping,cacerts} URL
Serves GET /cacerts, /ping, /v1-sugarkube/ca (sha256 of its CA), /v1-sugarkube/members, and
POST /v1-sugarkube/join (HTTP Basic, password checked: 401). One `k3s-standin event=...` line
per event on stderr; exit 0 on SIGTERM, 1 when refused or failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import hmac
import http.client
import ipaddress
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import unquote, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.cluster import k3s

if TYPE_CHECKING:
    from tests.lab.node import Node

REPO = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"
CLIENT_TIMEOUT = 10.0  # s per request, k3s's defaultClientTimeout (pkg/clientaccess/token.go)
SYNC_TIMEOUT = 3.0  # s to push the member list to another server; best effort
REQUEST_TIMEOUT = 5.0  # s for a client to send its request once connected
HANDSHAKE_TIMEOUT = 5.0  # s for a TLS handshake
JOIN_RETRY = 0.5  # s between attempts while the server does not answer yet
BODY_MAX = 64 * 1024  # bytes of a request or response body
CA_DAYS = 3650  # k3s's self-signed CA lives 10 years
LEAF_DAYS = 365  # k3s's leaf certificates live one year
EXIT_OK, EXIT_FAIL = 0, 1

TLS = k3s.K3S_STATE + "/server/tls"
CA_CERT, CA_KEY = TLS + "/server-ca.crt", TLS + "/server-ca.key"
SERVING_CERT, SERVING_KEY = TLS + "/serving-kube-apiserver.crt", TLS + "/serving-kube-apiserver.key"
SERVER_TOKEN = k3s.K3S_STATE + "/server/token"
MEMBERS = k3s.SERVER_DB + "/members.json"
AGENT_CA = k3s.AGENT_DIR + "/server-ca.crt"
AGENT_KEY = k3s.AGENT_DIR + "/client-kubelet.key"


class Refused(Exception):
    """The stand-in will not start; `reason` is a log token, the message one line for people."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def log(event: str, **fields: object) -> None:
    """One `k3s-standin event=NAME key=value ...` line on stderr."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        text = str(value)
        parts.append(f"{key}={json.dumps(text) if not text or ' ' in text else text}")
    print("k3s-standin", *parts, file=sys.stderr, flush=True)


# --- certificates -----------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)


def new_ca(now: float | None = None) -> tuple[bytes, bytes]:
    """A self-signed EC P-256 cluster CA as k3s makes one: (certificate PEM, key PEM)."""
    stamp = int(time.time() if now is None else now)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"k3s-server-ca@{stamp}")])
    start = datetime.datetime.fromtimestamp(stamp, datetime.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - datetime.timedelta(minutes=5))
        .not_valid_after(start + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(CA_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def issue(
    ca_pem: bytes,
    ca_key_pem: bytes,
    common_name: str,
    *,
    sans: Sequence[str] = (),
    client: bool = False,
    organization: str | None = None,
) -> tuple[bytes, bytes]:
    """A leaf certificate signed by the CA: server auth for SANS, or client auth."""
    ca = x509.load_pem_x509_certificate(ca_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise Refused("ca_invalid", "the cluster CA key is not an EC key")
    key = ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
    if organization:
        attributes.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attributes))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san(s) for s in sans), False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value.partition("%")[0]))
    except ValueError:
        return x509.DNSName(value)


def local_addresses() -> list[str]:
    """This network namespace's addresses (`ip -j addr`), loopback included."""
    found = ["127.0.0.1", "::1"]
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        out = subprocess.run(
            ["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=5, check=True
        ).stdout
        for link in json.loads(out):
            found += [info["local"] for info in link.get("addr_info", []) if "local" in info]
    return list(dict.fromkeys(found))


# --- files --------------------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write path atomically with mode, creating its directories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def seed_ca(root: Path, ca_pem: bytes, ca_key_pem: bytes) -> None:
    """Place a cluster CA before the first start, as k3s's custom-CA procedure does."""
    _write(root / CA_CERT, ca_pem)
    _write(root / CA_KEY, ca_key_pem, 0o600)


def _flag(value: object) -> bool:
    """A k3s boolean flag's value (Go's strconv.ParseBool on convert.ToString)."""
    return str(value).lower() in ("1", "t", "true")


def _config_list(config: dict[str, object], key: str) -> list[str]:
    value = config.get(key)
    items = value if isinstance(value, list) else [] if value is None else [value]
    return [str(v) for item in items for v in str(item).split(",") if v]


@dataclass
class Cluster:
    """What a server holds: the CA, its key, the password, the datastore and the members."""

    root: Path
    ca_pem: bytes
    ca_key_pem: bytes
    password: str
    datastore: str
    members: dict[str, dict[str, Any]]

    @property
    def ca(self) -> str:
        return k3s.ca_hash(self.ca_pem)

    def save_members(self) -> None:
        body = json.dumps({"datastore": self.datastore, "members": self.members}, indent=1)
        _write(self.root / MEMBERS, body.encode())

    def commit(self) -> None:
        """Write tokens, members and, last, the db marker that makes this node a member."""
        _write(self.root / CA_CERT, self.ca_pem)
        _write(self.root / CA_KEY, self.ca_key_pem, 0o600)
        token = k3s.format_token(self.ca_pem, self.password).encode()
        _write(self.root / SERVER_TOKEN, token, 0o600)
        node_token = self.root / k3s.K3S_STATE / "server/node-token"
        if not node_token.is_symlink():
            node_token.symlink_to("token")
        self.save_members()
        db = self.root / k3s.SERVER_DB
        if self.datastore == "etcd":
            (db / "etcd").mkdir(parents=True, exist_ok=True)
        else:
            _write(db / "state.db", b"")

    @classmethod
    def load(cls, root: Path) -> Cluster:
        """The cluster a restarted server already belongs to."""
        token = k3s.parse_token((root / SERVER_TOKEN).read_text().strip())
        state = json.loads((root / MEMBERS).read_text())
        return cls(
            root, (root / CA_CERT).read_bytes(), (root / CA_KEY).read_bytes(),
            token.password, state["datastore"], state["members"],
        )  # fmt: skip


def bootstrap(root: Path, name: str, config: dict[str, object], token: str | None) -> Cluster:
    """A new cluster: the seeded CA if one was placed, else a new one; etcd or sqlite."""
    if (root / CA_CERT).exists() and (root / CA_KEY).exists():
        ca_pem, ca_key_pem = (root / CA_CERT).read_bytes(), (root / CA_KEY).read_bytes()
    else:
        ca_pem, ca_key_pem = new_ca()
    password = secrets.token_hex(16)
    if token is not None:
        parsed = k3s.parse_token(token)
        if parsed.bootstrap:
            raise Refused("bad_token", "a bootstrap token cannot start a cluster")
        if not parsed.accepts_ca(ca_pem):
            raise Refused(
                "ca_mismatch",
                "the token's CA hash is not this server's CA; start the first server with a "
                "short token, or seed the CA it names",
            )
        password = parsed.password
    datastore = "etcd" if _flag(config.get("cluster-init", False)) else "sqlite"
    member = {"role": "server", "bootstrap": True, "datastore": datastore}
    cluster = Cluster(root, ca_pem, ca_key_pem, password, datastore, {name: member})
    cluster.commit()
    log("bootstrapped", name=name, datastore=datastore, ca=cluster.ca)
    return cluster


# --- the client side: k3s's TLS bootstrap ------------------------------------------------------


def _unverified() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _verified(ca_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca_pem.decode("ascii"))
    return context


def request(
    url: str,
    method: str,
    path: str,
    context: ssl.SSLContext,
    *,
    body: bytes | None = None,
    password: str | None = None,
    user: str = "server",
    timeout: float = CLIENT_TIMEOUT,
) -> tuple[int, bytes]:
    """One HTTPS request to URL's host and port; (status, body). OSError when unreachable."""
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise Refused("bad_url", f"only https:// server URLs are supported, not {url!r}")
    headers = {"Connection": "close"}
    if password is not None:
        headers["Authorization"] = (
            "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        )
    if body is not None:
        headers["Content-Type"] = "application/json"
    host = unquote(parts.hostname)
    connection = http.client.HTTPSConnection(
        host, parts.port or 6443, context=context, timeout=timeout
    )
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(BODY_MAX)
    except (http.client.HTTPException, ssl.SSLError) as exc:
        raise OSError(f"{type(exc).__name__}: {exc}") from exc
    finally:
        connection.close()


def join(
    url: str, token_text: str | None, *, name: str, role: str, port: int, deadline: float
) -> dict[str, Any]:
    """k3s's join: CA fetched unverified and pinned by the token's hash, then the password."""
    if token_text is None:
        raise Refused("no_token", "a token is required to join a server (k3s: --token)")
    token = k3s.parse_token(token_text)
    while True:
        try:
            status, cacerts = request(url, "GET", "/cacerts", _unverified())
            break
        except OSError as exc:
            if time.monotonic() > deadline:
                raise Refused("unreachable", f"{url} did not answer: {exc}") from exc
            time.sleep(JOIN_RETRY)
    if status != 200:
        raise Refused("no_cacerts", f"{url}/cacerts answered {status}")
    if not token.accepts_ca(cacerts):
        raise Refused("ca_mismatch", f"{url} serves a CA whose hash is not the token's")
    try:
        request(url, "GET", "/cacerts", _verified(cacerts))
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise Refused("ca_invalid", f"{url}'s certificate does not verify with its CA") from exc
    log("join_request", server=url, role=role, ca=k3s.ca_hash(cacerts))
    body = json.dumps({"name": name, "role": role, "port": port}).encode()
    try:
        status, answer = request(
            url, "POST", "/v1-sugarkube/join", _verified(cacerts), body=body,
            password=token.password, user=token.user or ("server" if role == "server" else "node"),
        )  # fmt: skip
    except OSError as exc:
        raise Refused("unreachable", f"{url} failed during the join: {exc}") from exc
    if status == 401:
        raise Refused("unauthorized", f"{url} refused the token's password")
    if status != 200:
        raise Refused(
            "join_failed", f"{url} answered {status}: {answer[:200].decode(errors='replace')}"
        )
    reply: dict[str, Any] = json.loads(answer)
    if reply.get("ca_cert", "").encode() != cacerts:
        raise Refused("ca_invalid", f"{url} handed over another CA than it serves")
    reply["password"] = token.password
    return reply


def join_as_server(root: Path, reply: dict[str, Any], name: str, url: str) -> Cluster:
    """Become a server of the cluster that accepted us; remember where that server answers."""
    members = reply["members"]
    parts = urlsplit(url)
    members[reply["server"]] |= {
        "address": unquote(parts.hostname or ""),
        "port": parts.port or 6443,
    }
    cluster = Cluster(
        root, reply["ca_cert"].encode(), reply["ca_key"].encode(), reply["password"],
        "etcd", members,
    )  # fmt: skip
    cluster.commit()
    log("joined", name=name, role="server", ca=cluster.ca, members=len(members))
    return cluster


def join_as_agent(root: Path, reply: dict[str, Any], name: str) -> None:
    _write(root / AGENT_CA, reply["ca_cert"].encode())
    _write(root / AGENT_KEY, reply["client_key"].encode(), 0o600)
    _write(root / k3s.AGENT_MARKER, reply["client_cert"].encode())  # last: the membership mark
    log("joined", name=name, role="agent", ca=k3s.ca_hash(reply["ca_cert"].encode()))


# --- the server side ----------------------------------------------------------------------------


def _response(status: int, body: bytes, content_type: str = "text/plain") -> bytes:
    reason = http.client.responses.get(status, "Status")
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def _password_of(headers: dict[str, str]) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        with contextlib.suppress(ValueError):
            return base64.b64decode(value, validate=True).decode().partition(":")[2]
    if scheme.lower() == "bearer":
        return value
    return None


class Server:
    """The TLS endpoint on 6443: answers requests, accepts joins, shares the member list."""

    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self._pushes: set[asyncio.Task[None]] = set()

    def authorized(self, headers: dict[str, str]) -> bool:
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
            answer = self.route(method, path.split("?", 1)[0], headers, body, str(peer[0]))
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

    def route(
        self, method: str, path: str, headers: dict[str, str], body: bytes, peer: str
    ) -> bytes:
        """The answer to one request, from the tables of GET and POST handlers."""
        if method == "GET" and path in self.GETS:
            return self.GETS[path](self)
        if method != "POST" or path not in self.POSTS:
            return _response(404, b"not found")
        if not self.authorized(headers):
            log("join_rejected", peer=peer, reason="unauthorized")
            return _response(401, b"unauthorized")
        try:
            return self.POSTS[path](self, json.loads(body), peer)
        except (KeyError, TypeError, AttributeError, ValueError):
            return _response(400, b"bad request")

    def cacerts(self) -> bytes:
        return _response(200, self.cluster.ca_pem, "application/x-pem-file")

    def ping(self) -> bytes:
        return _response(200, b"pong")

    def ca(self) -> bytes:
        return _response(200, self.cluster.ca.encode() + b"\n")

    def member_list(self) -> bytes:
        state = {"datastore": self.cluster.datastore, "members": self.cluster.members}
        return _response(200, json.dumps(state).encode(), "application/json")

    def accept(self, request: dict[str, Any], peer: str) -> bytes:
        name, role = str(request["name"]), str(request["role"])
        if role == "server" and self.cluster.datastore != "etcd":
            log("join_rejected", name=name, peer=peer, reason="sqlite")
            return _response(409, b"this server runs sqlite (single server): join it as an agent")
        reply: dict[str, Any] = {"ca_cert": self.cluster.ca_pem.decode()}
        if role == "server":
            reply["ca_key"] = self.cluster.ca_key_pem.decode()
        else:
            cert, key = issue(
                self.cluster.ca_pem, self.cluster.ca_key_pem, f"system:node:{name}",
                client=True, organization="system:nodes",
            )  # fmt: skip
            reply |= {"client_cert": cert.decode(), "client_key": key.decode()}
        self.cluster.members[name] = {"role": role, "address": peer, "port": request.get("port")}
        self.cluster.save_members()
        reply |= {"members": self.cluster.members, "server": self.name}
        log("join_accepted", name=name, role=role, peer=peer, members=len(self.cluster.members))
        self._push_members(exclude={name})
        return _response(200, json.dumps(reply).encode(), "application/json")

    def sync(self, request: dict[str, Any], peer: str) -> bytes:
        added = {k: v for k, v in request["members"].items() if k not in self.cluster.members}
        if added:
            self.cluster.members |= added
            self.cluster.save_members()
            log("members_synced", added=",".join(sorted(added)), members=len(self.cluster.members))
        return _response(200, b"ok")

    def _push_members(self, exclude: set[str]) -> None:
        """Share the member list with every other server, so any of them can be asked."""
        body = json.dumps({"members": self.cluster.members}).encode()
        for name, member in self.cluster.members.items():
            if name in exclude or name == self.name or member.get("role") != "server":
                continue
            if not member.get("address") or not member.get("port"):
                continue
            url = k3s.api_url(member["address"], int(member["port"]))
            task = asyncio.create_task(asyncio.to_thread(self._push, url, body, name))
            self._pushes.add(task)
            task.add_done_callback(self._pushes.discard)

    def _push(self, url: str, body: bytes, name: str) -> None:
        try:
            status, _ = request(
                url, "POST", "/v1-sugarkube/sync", _verified(self.cluster.ca_pem), body=body,
                password=self.cluster.password, timeout=SYNC_TIMEOUT,
            )  # fmt: skip
        except (OSError, Refused) as exc:
            log("members_push_failed", to=name, reason=str(exc).replace(" ", "_")[:80])
            return
        if status != 200:
            log("members_push_failed", to=name, status=status)

    GETS: ClassVar[dict[str, Callable[[Server], bytes]]] = {
        "/cacerts": cacerts,
        "/ping": ping,
        "/v1-sugarkube/ca": ca,
        "/v1-sugarkube/members": member_list,
    }
    POSTS: ClassVar[dict[str, Callable[[Server, dict[str, Any], str], bytes]]] = {
        "/v1-sugarkube/join": accept,
        "/v1-sugarkube/sync": sync,
    }


def _listeners(bind: str, port: int) -> list[socket.socket]:
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
    cluster: Cluster, name: str, config: dict[str, object], bind: str
) -> ssl.SSLContext:
    """A fresh serving certificate for this node's names and addresses, signed by the cluster CA."""
    sans = ["localhost", name, f"{name}.local", *local_addresses()]
    if bind not in ("0.0.0.0", "::"):
        sans.append(bind)
    for option in ("tls-san", "node-ip", "advertise-address", "node-external-ip"):
        sans += _config_list(config, option)
    cert, key = issue(cluster.ca_pem, cluster.ca_key_pem, "k3s", sans=list(dict.fromkeys(sans)))
    _write(cluster.root / SERVING_CERT, cert)
    _write(cluster.root / SERVING_KEY, key, 0o600)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cluster.root / SERVING_CERT, cluster.root / SERVING_KEY)
    return context


async def run(
    server: Server | None, sockets: list[socket.socket], context: ssl.SSLContext | None
) -> None:
    """Serve (a server) or idle (an agent) until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # A client that rejects our certificate fails the handshake: one line, not a traceback.
    loop.set_exception_handler(
        lambda _, context: log("connection_error", detail=str(context.get("exception", "?"))[:120])
    )
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    listeners = []
    if server is not None:
        for sock in sockets:
            listeners.append(
                await asyncio.start_server(
                    server.handle, sock=sock, ssl=context, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
                )
            )
        addrs = ",".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in sockets)
        log("serving", name=server.name, addr=addrs, port=sockets[0].getsockname()[1],
            ca=server.cluster.ca, datastore=server.cluster.datastore)  # fmt: skip
    await stop.wait()
    for listener in listeners:
        listener.close()
    log("stopped")


# --- command line -------------------------------------------------------------------------------


def _token(config: dict[str, object]) -> str | None:
    """The token k3s would use: `token`, else the trimmed contents of `token-file`."""
    if config.get("token") not in (None, ""):
        return str(config["token"])
    if config.get("token-file"):
        return Path(str(config["token-file"])).read_text().strip() or None
    return None


def start(args: argparse.Namespace) -> int:
    root, name = Path(args.root), args.name or socket.gethostname()
    deadline = time.monotonic() + args.join_timeout
    config = k3s.merged_config(root)
    token = _token(config)
    server_url = str(config["server"]) if config.get("server") else None
    # Bound only once there is something to serve, so a probe never reaches a silent port;
    # except with --port 0 (tests), where the joiner must tell its server the port it got.
    sockets = _listeners(args.bind, 0) if args.port == 0 and not args.agent else []
    port = sockets[0].getsockname()[1] if sockets else args.port
    member = k3s.membership(root)
    if args.agent:
        if member is k3s.Membership.NONE:
            if server_url is None:
                raise Refused("no_server", "an agent needs `server:` in its config (k3s: --server)")
            join_as_agent(
                root,
                join(server_url, token, name=name, role="agent", port=0, deadline=deadline),
                name,
            )
        else:
            log("restarted", name=name, role="agent")
        asyncio.run(run(None, [], None))
        return EXIT_OK
    if member is k3s.Membership.SERVER:
        cluster = Cluster.load(root)
        log("restarted", name=name, role="server", ca=cluster.ca)
    elif server_url is not None:
        cluster = join_as_server(
            root,
            join(server_url, token, name=name, role="server", port=port, deadline=deadline),
            name,
            server_url,
        )
    else:
        cluster = bootstrap(root, name, config, token)
    context = serving_context(cluster, name, config, args.bind)
    sockets = sockets or _listeners(args.bind, args.port)
    asyncio.run(run(Server(cluster, name), sockets, context))
    return EXIT_OK


QUERIES = {
    "ca": "/v1-sugarkube/ca",
    "members": "/v1-sugarkube/members",
    "ping": "/ping",
    "cacerts": "/cacerts",
}


def query(what: str, url: str) -> int:
    """Print what a stand-in at URL answers (unverified: the question is which CA it claims)."""
    if what not in QUERIES:
        print(
            f"k3s-standin: --query takes one of {', '.join(QUERIES)}, not {what!r}", file=sys.stderr
        )
        return 2
    try:
        status, body = request(url, "GET", QUERIES[what], _unverified())
    except (OSError, Refused) as exc:
        print(f"k3s-standin: {url} did not answer: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if status != 200:
        print(f"k3s-standin: {url}{QUERIES[what]} answered {status}", file=sys.stderr)
        return EXIT_FAIL
    sys.stdout.write(body.decode(errors="replace"))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.lab.k3s_standin", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--root", default="/", help="the node's root (default /)")
    parser.add_argument("--bind", default="0.0.0.0", help="address to serve on (0.0.0.0 adds [::])")
    parser.add_argument("--port", type=int, default=6443, help="TCP port (0: any free one)")
    parser.add_argument(
        "--agent", action="store_true", help="run as `k3s agent`: join, never serve"
    )
    parser.add_argument("--name", help="node name (default: the hostname)")
    parser.add_argument("--join-timeout", type=float, default=60.0, help="s to wait for the server")
    parser.add_argument(
        "--query", nargs=2, metavar=("WHAT", "URL"), help="ca, members, ping or cacerts"
    )
    return parser


def _stop_early(signum: int, frame: object) -> None:
    """A SIGTERM while joining ends as cleanly as one while serving."""
    log("stopped", during="start")
    sys.exit(EXIT_OK)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.query:
        return query(*args.query)
    signal.signal(signal.SIGTERM, _stop_early)
    try:
        return start(args)
    except Refused as exc:
        log("refused", reason=exc.reason, detail=str(exc))
    except (k3s.K3sError, OSError) as exc:
        log("failed", reason=type(exc).__name__, detail=str(exc))
    return EXIT_FAIL


# --- helpers for lab tests ----------------------------------------------------------------------


def node_query(node: Node, what: str, url: str = "https://127.0.0.1:6443") -> str | None:
    """What the stand-in in NODE answers to a query; None when it does not answer."""
    done = node.run(
        PYTHON, "-m", "tests.lab.k3s_standin", "--query", what, url,
        env={"PYTHONPATH": str(REPO)}, timeout=CLIENT_TIMEOUT + 5,
    )  # fmt: skip
    return done.stdout if done.returncode == 0 else None


def ca_of(node: Node) -> str | None:
    """The CA hash NODE's k3s state belongs to (server or agent); None when it holds none."""
    if node.path("/" + k3s.SERVER_DB).is_dir():
        return k3s.ca_hash(node.path("/" + CA_CERT).read_bytes())
    if node.path("/" + k3s.AGENT_MARKER).is_file():
        return k3s.ca_hash(node.path("/" + AGENT_CA).read_bytes())
    return None


def served_ca_of(node: Node) -> str | None:
    """The CA hash NODE's stand-in serves on 6443; None when nothing answers."""
    answer = node_query(node, "ca")
    return answer.strip() if answer else None


def members_of(node: Node) -> dict[str, dict[str, Any]]:
    """The members NODE's stand-in knows (name -> role, bootstrap, address); {} when silent."""
    answer = node_query(node, "members")
    return dict(json.loads(answer)["members"]) if answer else {}


if __name__ == "__main__":
    sys.exit(main())
