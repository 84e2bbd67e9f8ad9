"""What the formation machine asks the I/O side to do: plain values, carried out in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent.cluster.view import NodeAdvert
from agent.mdns.records import Role

ReleaseMode = Literal["member", "cluster-init", "single", "join-server", "join-agent"]


@dataclass(frozen=True)
class Advertise:
    role: Role
    phase: str
    leader: str = ""
    ca: str = ""
    vote: str = ""
    admit: str = ""
    members: int = 0  # etcd's members, 0 unknown


@dataclass(frozen=True)
class Bind:
    """Persist, before the next action shows it, that this node supports `key` for good."""

    key: str
    host: str


@dataclass(frozen=True)
class RunRound:
    """Ask the wire, live, who advertises this cluster; answer with round_done()."""


@dataclass(frozen=True)
class Prove:
    """Run the wire proof against a server; answer with proof_done()."""

    advert: NodeAdvert


@dataclass(frozen=True)
class Release:
    """Write the k3s drop-in and release the gate."""

    mode: ReleaseMode
    leader: NodeAdvert | None = None


@dataclass(frozen=True)
class Event:
    """A log line (and metric) worth emitting."""

    name: str
    fields: tuple[tuple[str, object], ...] = ()


Action = Advertise | Bind | RunRound | Prove | Release | Event


