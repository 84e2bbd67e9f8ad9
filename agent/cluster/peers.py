"""The live table of this cluster's nodes, fed by browse events. Pure: records in, changes out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from agent import const
from agent.bounded import Bounded
from agent.mdns.auth import AdvertKey, boot_order
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
    """Peers by instance name. Records of another cluster/env, unparsable TXT, and with AUTH
    those without a valid MAC or replayed from an older start of their node, are ignored."""

    def __init__(self, cluster: str, env: str, auth: AdvertKey | None = None) -> None:
        self._cluster = cluster.lower()
        self._env = env.lower()
        self._auth = auth
        self._peers: dict[str, Peer] = {}
        # name -> reason, so each is reported once (a flood of names: once per PEER_TABLE_MAX)
        self._ignored: dict[str, str] = Bounded(const.PEER_TABLE_MAX)
        # election key -> the latest start its adverts showed (authenticated adverts only)
        self._starts: dict[str, int] = Bounded(const.PEER_TABLE_MAX)

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
            if why := self.judge(record.name, record.port, record.txt, advert):
                raise RecordError(why)
        except RecordError as err:
            return self._ignore(record.name, str(err))
        self._ignored.pop(record.name, None)
        peer = Peer(record.name, record.host, record.address, advert, record.local)
        previous = self._peers.get(record.name)
        self._peers[record.name] = peer
        if previous is not None and (previous.advert, previous.host) == (advert, record.host):
            return None  # only the address: the browser switched to the preferred protocol
        return Change("added" if previous is None else "updated", record.name, peer)

    def judge(self, name: str, port: int, txt: tuple[bytes, ...], advert: Advert) -> str | None:
        """Why an advert of this cluster must not count (`unauthenticated`, `replayed`), or None.

        A MAC says who made an advert, not when: one from an older start of its node than
        another seen here is a replay (agent/mdns/auth.py). Without a key, nothing is judged.
        """
        if self._auth is None:
            return None
        if self._auth.verify(name, port, txt):
            return "unauthenticated"
        start = boot_order(advert.boot)
        if start < self._starts.setdefault(advert.key, start):
            return "replayed"
        self._starts[advert.key] = start
        return None

    def gone(self, record: ServiceRecord) -> Change | None:
        """Apply a removal; None when the record was never a peer."""
        self._ignored.pop(record.name, None)
        peer = self._peers.pop(record.name, None)
        return Change("removed", record.name, peer) if peer is not None else None

    def _ignore(self, name: str, reason: str) -> Change | None:
        # A replay of a peer's older advert leaves the peer as its newer one said.
        if reason != "replayed" and self._peers.pop(name, None) is not None:
            # A peer whose advert turned unusable is no longer one; say why once.
            self._ignored[name] = reason
            return Change("removed", name, reason=reason)
        if self._ignored.get(name) == reason:
            return None
        self._ignored[name] = reason
        return Change("ignored", name, reason=reason)
