"""What a node's k3s keeps on disk: the cluster CA and token, the etcd member, the agent's files.

k3s writes the CA, the token and server/db/etcd/name within its first seconds, long before it
serves or its etcd joins anything (its Register/setName runs before the datastore starts), so a
server that is refused or killed half-way still holds server/db: agent/cluster/k3s.py's
`membership()` then calls it a SERVER. What a restart does depends on etcd's own directory, as
in k3s's Start: a WAL means "restart this member"; without one the node starts as its config says.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from agent import tokens
from agent.cluster import k3s

from .certs import issue, new_ca
from .const import (
    AGENT_CA,
    AGENT_KEY,
    CA_CERT,
    CA_KEY,
    DIR_MODE,
    ETCD_CA_CERT,
    ETCD_CA_KEY,
    ETCD_CLIENT_CERT,
    ETCD_CLIENT_KEY,
    ETCD_CONFIG,
    ETCD_DIR,
    ETCD_NAME,
    ETCD_SERVING_CERT,
    ETCD_SERVING_KEY,
    ETCD_WAL,
    NODE_TOKEN,
    SERVER_TOKEN,
    SQLITE_DB,
)
from .events import Refused


def write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write PATH atomically with MODE, creating its directories."""
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
    write(root / CA_CERT, ca_pem)
    write(root / CA_KEY, ca_key_pem, 0o600)


def seeded_ca(root: Path) -> tuple[bytes, bytes] | None:
    """The CA and key already on disk (seeded, or left by an earlier start), if both are there."""
    if (root / CA_CERT).is_file() and (root / CA_KEY).is_file():
        return (root / CA_CERT).read_bytes(), (root / CA_KEY).read_bytes()
    return None


class Datastore(StrEnum):
    """What a server's state on disk says it restarts as."""

    NONE = "none"  # nothing that runs: start as the config says
    SQLITE = "sqlite"
    ETCD = "etcd"  # etcd's WAL exists: restart the member, whatever the config says


def datastore(root: Path) -> Datastore:
    """ETCD when etcd's WAL exists, else SQLITE when state.db does, else NONE."""
    if (root / ETCD_WAL).is_dir():
        return Datastore.ETCD
    if (root / SQLITE_DB).is_file():
        return Datastore.SQLITE
    return Datastore.NONE


@dataclass
class Cluster:
    """What every server of a cluster shares: the CA, its key, the token's password, and the
    etcd server CA with its key (k3s's bootstrap data carries both CAs)."""

    ca_pem: bytes
    ca_key_pem: bytes
    password: str
    etcd_ca_pem: bytes = b""
    etcd_ca_key_pem: bytes = b""

    @property
    def ca(self) -> str:
        """sha256 of the CA certificate, as tokens and adverts carry it."""
        return tokens.ca_hash(self.ca_pem)

    def save(self, root: Path) -> None:
        """Write the CA, its key, server/token and the node-token link."""
        write(root / CA_CERT, self.ca_pem)
        write(root / CA_KEY, self.ca_key_pem, 0o600)
        write(root / SERVER_TOKEN, tokens.format_token(self.ca_pem, self.password).encode(), 0o600)
        link = root / NODE_TOKEN
        if not link.is_symlink():
            link.symlink_to("token")
        if self.etcd_ca_pem:
            write(root / ETCD_CA_CERT, self.etcd_ca_pem)
            write(root / ETCD_CA_KEY, self.etcd_ca_key_pem, 0o600)

    @classmethod
    def load(cls, root: Path) -> Cluster:
        """The cluster a restarting server belongs to; Refused when its files are missing."""
        try:
            token = tokens.parse_token((root / SERVER_TOKEN).read_text().strip())
            etcd_ca = (root / ETCD_CA_CERT, root / ETCD_CA_KEY)
            etcd_pems = [p.read_bytes() for p in etcd_ca] if etcd_ca[0].exists() else [b"", b""]
            return cls((root / CA_CERT).read_bytes(), (root / CA_KEY).read_bytes(), token.password,
                       *etcd_pems)
        except (OSError, tokens.TokenError) as exc:
            raise Refused("state_invalid", f"cannot restart from {root}: {exc}") from exc

    @classmethod
    def new(cls, root: Path, token: str | None, ca: tuple[bytes, bytes]) -> Cluster:
        """A new cluster's secrets: CA (seeded or new) and the token's password (else random)."""
        password = secrets.token_hex(16)
        if token is not None:
            parsed = tokens.parse_token(token)
            if parsed.bootstrap:
                raise Refused("bad_token", "a bootstrap token cannot start a cluster")
            if not parsed.accepts_ca(ca[0]):
                raise Refused(
                    "ca_mismatch",
                    "the token's CA hash is not this server's CA; start the first server with a "
                    "short token, or seed the CA it names",
                )
            password = parsed.password
        return cls(ca[0], ca[1], password, *new_ca(name="etcd-server-ca"))


def make_sqlite(root: Path) -> None:
    """server/db/state.db: a single server's datastore (empty: nothing reads it)."""
    write(root / SQLITE_DB, b"")


def member_name(root: Path, hostname: str) -> str:
    """This node's etcd member name, `<hostname>-<8 hex>`, made once and kept (k3s setName)."""
    path = root / ETCD_NAME
    if path.is_file():
        return path.read_text().strip()
    etcd_dir = root / ETCD_DIR
    etcd_dir.mkdir(parents=True, exist_ok=True)
    etcd_dir.chmod(DIR_MODE)
    name = f"{hostname}-{secrets.token_hex(4)}"
    write(path, name.encode(), 0o600)
    return name


def save_etcd_config(root: Path, flags: dict[str, str]) -> None:
    """Remember the flags etcd runs with, so a restart reuses them."""
    write(root / ETCD_CONFIG, json.dumps(flags, indent=1).encode(), 0o600)


def etcd_config(root: Path) -> dict[str, str]:
    """The flags etcd last ran with; Refused when they are missing or unreadable."""
    try:
        flags: dict[str, Any] = json.loads((root / ETCD_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise Refused("state_invalid", f"etcd ran, but {ETCD_CONFIG} is bad: {exc}") from exc
    return {str(key): str(value) for key, value in flags.items()}


def save_agent(root: Path, ca_pem: bytes, client_cert: bytes, client_key: bytes) -> None:
    """The agent's CA and kubelet client certificate; the certificate last: the membership mark."""
    write(root / AGENT_CA, ca_pem)
    write(root / AGENT_KEY, client_key, 0o600)
    write(root / k3s.AGENT_MARKER, client_cert)


def etcd_certs(root: Path, cluster: Cluster, sans: list[str]) -> None:
    """This server's etcd serving certificate (SANS) and k3s's etcd client certificate, signed
    by the cluster's etcd server CA, as k3s writes them before it starts etcd."""
    if not cluster.etcd_ca_pem:
        raise Refused("state_invalid", f"no etcd server CA in {root}: cannot start etcd")
    cert, key = issue(cluster.etcd_ca_pem, cluster.etcd_ca_key_pem, "etcd-server", sans=sans,
                      also_client=True)
    write(root / ETCD_SERVING_CERT, cert)
    write(root / ETCD_SERVING_KEY, key, 0o600)
    cert, key = issue(cluster.etcd_ca_pem, cluster.etcd_ca_key_pem, "etcd-client", client=True)
    write(root / ETCD_CLIENT_CERT, cert)
    write(root / ETCD_CLIENT_KEY, key, 0o600)
