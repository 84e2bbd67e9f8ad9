"""What this node knows of the other nodes' adverts, pure: observations and `now` in, answers out.

Two sources feed it, and they are not worth the same:
- the browser (Avahi's cache): an advert it lists may belong to a node that died without a
  goodbye up to 75 minutes ago (RFC 6762 §10), so it is a hint, never proof of life;
- live rounds (agent/mdns/wire.py): a fresh querier asks the wire and only live responders
  answer, so an advert a round heard is *live* for `live_ttl` after the round started.

An advert the browser removed is still *held* for a while: a candidate for `candidate_hold` (its
rename to "(bootstrap)" or "(server)" takes a probe, ~1 s), a joiner, server, bootstrapper or
agent for `dead_hold` (an avahi-daemon restart hides a node's adverts for 2.5-4 s, measured in
the lab).

Nodes are identified by their election key, not by instance or host name: a node's instance name
changes with its role, and two nodes may share a host name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent import const
from agent.bounded import trim
from agent.mdns.records import Advert, RecordError, Role, normalize_host, parse_advert

if TYPE_CHECKING:  # wire.py imports zeroconf: the pure election need not load it
    from agent.mdns.wire import LiveRecord

# Advert phases (TXT `phase=`) the election reads; DESIGN.md §A "mDNS records".
DISCOVER = "discover"  # a free candidate: `vote=` is the candidate it would like to bootstrap
BOUND = "bound"  # a candidate bound for good to the bootstrapper named by `vote=` (an ack)
INELIGIBLE = "ineligible"  # cannot run k3s here: neither stands nor votes
BOOTSTRAPPING = "bootstrap"  # a bootstrapper that has not released yet
STARTING = "starting"  # released or a member, k3s not answering yet
JOINING = "joining"  # released to join as a server, k3s not answering yet (etcd learner)
SERVING = "serving"  # the local API answers


@dataclass(frozen=True)
class NodeAdvert:
    """Another node's advert, as the browser or a live round saw it."""

    name: str
    host: str
    role: Role
    key: str = ""
    ca: str = ""
    address: str = ""  # where its 6443 is reached
    phase: str = ""
    vote: str = ""  # election key it votes for (phase discover) or is bound to (phase bound)
    admit: str = ""  # a serving server: the key of the fresh node it admits as a server now
    members: int = 0  # a serving server: etcd's members, voters and learners (0 unknown)
    ip6: str = ""  # its TXT ip6=: dialled when the address above is not an IPv4 one

    @property
    def ident(self) -> str:
        """The node behind the advert: its key, or its name when it has none (foreign adverts)."""
        return self.key or f"name:{self.name}"

    @property
    def cluster_side(self) -> bool:
        """Released or a member: a cluster exists wherever this node is (blocks bootstrapping)."""
        if self.role in (Role.SERVER, Role.AGENT):
            return True
        if self.role == Role.BOOTSTRAP:
            return self.phase != BOOTSTRAPPING
        return self.phase == JOINING

    @property
    def joinable(self) -> bool:
        """A server whose API can be proven and joined (a joiner renames once it serves)."""
        return self.role == Role.SERVER or (
            self.role == Role.BOOTSTRAP and self.phase != BOOTSTRAPPING
        )

    @property
    def bootstrapping(self) -> bool:
        return self.role == Role.BOOTSTRAP and self.phase == BOOTSTRAPPING

    @property
    def fresh(self) -> bool:
        """Not released yet, and may join: a free or bound candidate, or a bootstrapper."""
        return self.bootstrapping or (
            self.role == Role.CANDIDATE and self.phase in (DISCOVER, BOUND)
        )

    @property
    def free(self) -> bool:
        """A candidate that may still vote, ack or stand."""
        return self.role == Role.CANDIDATE and self.phase not in (BOUND, INELIGIBLE, JOINING)


@dataclass(frozen=True)
class Holds:
    """How long the view keeps what it stopped seeing, in seconds."""

    candidate: float
    dead: float
    live_ttl: float


@dataclass
class _Seen:
    advert: NodeAdvert
    updated: float  # when last reported, by the browser or a round
    present: bool = True  # the browser lists it
    gone_at: float = 0.0
    live_at: float = float("-inf")  # start of the newest live round that heard it
    browsed: bool = True  # False: known only from live rounds


@dataclass
class View:
    """The other nodes' adverts by instance name, with what each observation proves."""

    own_key: str
    holds: Holds
    _seen: dict[str, _Seen] = field(default_factory=dict)

    # -- observations -------------------------------------------------------------------------

    def seen(self, now: float, advert: NodeAdvert) -> None:
        """The browser lists this advert (added or updated)."""
        old = self._seen.get(advert.name)
        same = old is not None and old.advert.key == advert.key
        live_at = old.live_at if old is not None and same else float("-inf")
        self._seen[advert.name] = _Seen(advert, now, live_at=live_at)
        self._forget(now)

    def gone(self, now: float, name: str) -> None:
        """The browser removed this advert."""
        seen = self._seen.get(name)
        if seen is not None and seen.present and seen.browsed:
            seen.present = False
            seen.gone_at = now

    def heard(self, started: float, adverts: list[NodeAdvert]) -> None:
        """A live round that started at `started` heard these adverts."""
        for advert in adverts:
            seen = self._seen.get(advert.name)
            if seen is not None and seen.advert.key == advert.key:
                seen.live_at = max(seen.live_at, started)
                if seen.updated <= started:
                    # The round's content is newer than what the browser said before it began.
                    seen.advert = advert
                    seen.updated = started
                if not seen.present:  # the browser missed it (loss) or dropped it early
                    seen.present, seen.browsed = True, False
            else:
                self._seen[advert.name] = _Seen(
                    advert, started, live_at=started, browsed=False
                )
        self._forget(started)

    def _forget(self, now: float) -> None:
        """Past VIEW_ADVERTS_MAX names, drop the oldest adverts no longer held (a flood)."""
        trim(self._seen, const.VIEW_ADVERTS_MAX, lambda _, seen: not self._held(now, seen))

    # -- questions ----------------------------------------------------------------------------

    def _held(self, now: float, seen: _Seen) -> bool:
        if not seen.browsed:
            return now < seen.live_at + self.holds.live_ttl
        if seen.present:
            return True
        return now < seen.gone_at + self._hold(seen.advert)

    def _hold(self, advert: NodeAdvert) -> float:
        """A fresh candidate's advert is held while it renames; a joiner's (maybe an etcd
        learner whose agent restarts) and any server's, bootstrapper's or agent's longer."""
        return self.holds.candidate if advert.role == Role.CANDIDATE and not advert.cluster_side \
            else self.holds.dead

    def _live(self, now: float, seen: _Seen) -> bool:
        return now < seen.live_at + self.holds.live_ttl

    def known(self, now: float) -> list[NodeAdvert]:
        """Every other node's newest advert that is listed or still held (cache: a hint)."""
        return [s.advert for s in self._newest(now, live=False).values()]

    def live(self, now: float) -> list[NodeAdvert]:
        """Every other node's newest advert, for nodes a live round heard within live_ttl."""
        return [s.advert for s in self._newest(now, live=True).values()]

    def heard_at(self, ident: str) -> float:
        """When a live round last heard this node (any of its names); -inf if never."""
        return max(
            (s.live_at for s in self._seen.values() if s.advert.ident == ident),
            default=float("-inf"),
        )

    def host_of(self, key: str) -> str:
        """The host name a node with this election key last advertised, "" if none."""
        return next((s.advert.host for s in self._seen.values() if key and s.advert.key == key), "")

    def adverts(self, now: float) -> list[NodeAdvert]:
        """Every advert listed or held, older names of a node included (renames in flight)."""
        return [
            s.advert for s in self._seen.values()
            if s.advert.key != self.own_key and self._held(now, s)
        ]

    def _newest(self, now: float, *, live: bool) -> dict[str, _Seen]:
        newest: dict[str, _Seen] = {}
        for seen in self._seen.values():
            advert = seen.advert
            if advert.key == self.own_key or not self._held(now, seen):
                continue
            if live and not self._live(now, seen):
                continue
            best = newest.get(advert.ident)
            if best is None or (seen.present, seen.updated) > (best.present, best.updated):
                newest[advert.ident] = seen
        return newest

    def next_change(self, now: float) -> float | None:
        """When a hold or a liveness runs out: the answers may change then without an event."""
        times = []
        for seen in self._seen.values():
            if seen.live_at > float("-inf"):
                times.append(seen.live_at + self.holds.live_ttl)
            if seen.browsed and not seen.present:
                times.append(seen.gone_at + self._hold(seen.advert))
        future = [t for t in times if t > now]
        return min(future) if future else None


def supporters(root: str, live: list[NodeAdvert]) -> set[str]:
    """The live nodes whose bindings lead to `root` (a bootstrapper's key), `root` not included.

    A node in phase `bound` has promised, for good, to help no bootstrapper but the one its
    `vote=` names; a bootstrapper that gave up binds itself to another in the same way, so a
    promise made to it passes on. Only live nodes are followed: a promise heard from a cache
    could be from before a wipe (election.py, "Why one cluster").
    """
    bound = {a.key: a.vote for a in live if a.key and a.role == Role.CANDIDATE and a.phase == BOUND}
    if bound.get(root, root) != root:
        return set()  # `root` gave way to another: it will never release
    found: set[str] = set()
    for start in bound:
        node, steps = start, 0
        while node in bound and node != root and steps <= len(bound):  # a forged cycle ends
            node, steps = bound[node], steps + 1
        if node == root and start != root:
            found.add(start)
    return found


Judge = Callable[[str, int, tuple[bytes, ...], Advert], str | None]  # peers.PeerTable.judge


def to_node_adverts(
    records: list[LiveRecord], own_key: str, judge: Judge | None = None
) -> tuple[list[NodeAdvert], dict[str, str]]:
    """Other nodes' adverts among a live round's records, and why the others were ignored, by
    name: unparsable TXT, or what JUDGE says (no valid MAC, a replay). Our own advert is
    skipped, recognised by its election key, not its host name: two nodes may share a host name.
    """
    adverts: list[NodeAdvert] = []
    ignored: dict[str, str] = {}
    for record in records:
        try:
            advert = parse_advert(record.txt)
        except RecordError as err:
            ignored[record.name] = str(err)
            continue
        if judge is not None and (why := judge(record.name, record.port, record.txt, advert)):
            ignored[record.name] = why
            continue
        if own_key and advert.key == own_key:
            continue
        adverts.append(
            NodeAdvert(
                name=record.name, host=advert.host or normalize_host(record.host),
                role=advert.role, key=advert.key, ca=advert.ca,
                address=record.addresses[0] if record.addresses else advert.ip4,
                phase=advert.phase, vote=advert.vote, admit=advert.admit,
                members=int(advert.members or 0), ip6=advert.ip6,
            )
        )
    return adverts, ignored
