"""The live table of this cluster's nodes, fed by browse events. Pure: records in, changes out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent import const
from agent.bounded import Bounded
from agent.mdns.records import Advert, RecordError, ServiceRecord, parse_advert

ChangeKind = Literal["added", "updated", "removed", "ignored"]


@dataclass(frozen=True)
class Peer:
    """A node of this cluster/env as its advert describes it."""

    name: str
    host: str
    address: str
    advert: Advert
    local: bool


@dataclass(frozen=True)
class Change:
    """What one browse event did to the table; `reason` only for ignored records."""

    kind: ChangeKind
    name: str
    peer: Peer | None = None
    reason: str = ""


class PeerTable:
    """Peers by instance name. Records of another cluster/env or unparsable TXT are ignored."""

    def __init__(self, cluster: str, env: str) -> None:
        self._cluster = cluster.lower()
        self._env = env.lower()
        self._peers: dict[str, Peer] = {}
        # name -> reason, so each is reported once (a flood of names: once per PEER_TABLE_MAX)
        self._ignored: dict[str, str] = Bounded(const.PEER_TABLE_MAX)

    @property
    def peers(self) -> list[Peer]:
        """Every known peer, ordered by instance name."""
        return [self._peers[name] for name in sorted(self._peers)]

    def seen(self, record: ServiceRecord) -> Change | None:
        """Apply an added or updated record; None when nothing changed worth saying."""
        try:
            advert = parse_advert(record.txt)
            if (advert.cluster, advert.env) != (self._cluster, self._env):
                raise RecordError(f"advert for {advert.cluster}/{advert.env}")
        except RecordError as err:
            return self._ignore(record.name, str(err))
        self._ignored.pop(record.name, None)
        peer = Peer(record.name, record.host, record.address, advert, record.local)
        previous = self._peers.get(record.name)
        self._peers[record.name] = peer
        if previous is not None and (previous.advert, previous.host) == (advert, record.host):
            return None  # only the address: the browser switched to the preferred protocol
        return Change("added" if previous is None else "updated", record.name, peer)

    def gone(self, record: ServiceRecord) -> Change | None:
        """Apply a removal; None when the record was never a peer."""
        self._ignored.pop(record.name, None)
        peer = self._peers.pop(record.name, None)
        return Change("removed", record.name, peer) if peer is not None else None

    def _ignore(self, name: str, reason: str) -> Change | None:
        if self._peers.pop(name, None) is not None:
            # A peer whose advert turned unusable is no longer one; say why once.
            self._ignored[name] = reason
            return Change("removed", name, reason=reason)
        if self._ignored.get(name) == reason:
            return None
        self._ignored[name] = reason
        return Change("ignored", name, reason=reason)
