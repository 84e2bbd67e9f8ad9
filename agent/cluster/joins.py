"""Joining a cluster that exists, pure: which server, when, and as a server or an agent.

- A server is joined only once a wire proof shows it serving (agent/cluster/probe.py). A proof
  refused for a CA mismatch refuses that advert for good; a server that claims to serve but fails
  is held down for `dead_hold`; one still starting (a released bootstrapper, a restarting member)
  is asked again after `retry`, and the node says whom it waits for.
- Servers or agents: a joiner takes a server slot while the servers, released joiners and
  bootstrappers it knows, and the live candidates with lower keys (they join first), number
  fewer than `servers`, and so do the members a server's etcd lists (`members=`).
- Server joins go one at a time, admitted by the cluster: etcd admits one learner at a time
  ("too many learner members in cluster"; k3s before v1.26.5/v1.27.2 exits on it), and two
  joiners that cannot see each other (loss, a partition) would both try. So one node decides:
  the lowest serving server a live round hears advertises `admit=<key>` for the lowest live
  fresh node, once every other server serves and is heard (a joiner still a learner, a member
  restarting, a server gone silent: each waited for at most `order_wait` since first seen so,
  side by side; without etcd's answer, a joiner that no live round hears, dead as a learner?,
  until `learner_removal` after it was last heard: etcd keeps a dead learner until k3s removes
  it). A grant
  stands until its node takes it or `order_wait` passes; a server joiner releases only when
  some server admits it, and joins through that one. The admitting server's own etcd has the
  last word (k3s's /db/info, `etcd`): no admission while it holds a learner or has `servers`
  members, whatever the adverts say; its member count goes on the wire (`members=`) for
  joiners' slots.
- A cluster is known while any advert of one is listed or held, a starting one included (its
  proof is refused until its k3s serves, and a released bootstrapper that died after minting its
  CA is a cluster when it returns); only a server that claims to serve and fails its proof is
  set aside, for `dead_hold` at a time (a dead server in Avahi's cache must not block forever).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent import const
from agent.bounded import Bounded, trim
from agent.cluster import view as v
from agent.cluster.actions import Event
from agent.cluster.view import NodeAdvert, View
from agent.mdns.records import Role

UNHEARD = "unheard"  # the state of a server no live round hears: waited for


@dataclass(frozen=True)
class EtcdMembers:
    """What this server's etcd says of its members (k3s's /db/info), and when it said it."""

    members: int  # voters and learners
    learners: int
    at: float


# Proof failures after a TLS answer (probe.RefusalReason values): the server is alive, so its
# cluster exists and blocks bootstrapping even though this node cannot join it yet (this node's
# clock behind the cluster's certificates, a Pi without an RTC battery before NTP syncs).
ANSWERED = frozenset({"tls_error", "verify_failed", "bad_cacerts"})
# A server not to give the token to: it serves another CA than the one pinned (the token's, else
# the authenticated advert's `ca=`), or its advert pins none.
REFUSED = frozenset({"ca_mismatch", "unauthenticated"})


@dataclass
class Waiting:
    """A server that does not serve yet, since when, and its last proof's reason."""

    advert: NodeAdvert
    since: float
    reason: str


@dataclass
class Joins:
    """The join half of a node's formation; the election asks it and feeds it proofs."""

    key: str
    servers: int
    retry: float  # s before a starting server is proven again
    dead_hold: float  # s a server that claims to serve but fails is not proven again
    order_wait: float  # s a server join waits at most for each one ahead of it
    learner_removal: float  # s after a joiner was last heard until k3s removed it if it died
    etcd_ttl: float  # s an answer of this server's etcd is acted on
    # Adverts carry a valid MAC (a token is configured, agent/mdns/auth.py): a refused server is
    # still a node of this cluster, whatever its address serves now, and keeps blocking a
    # bootstrap; without one, a server serving another CA is someone else's and counts for
    # nothing.
    authenticated: bool = False
    proving: str | None = None  # instance name under proof
    joined: NodeAdvert | None = None  # the server whose proof passed
    joined_at: float = 0.0  # when
    waiting: Waiting | None = None
    failed: Waiting | None = None  # the last server that claimed to serve and failed its proof
    # Tables by name or key from the network, bounded (agent/bounded.py): the refused and the
    # passed lose their oldest past PEER_TABLE_MAX; the others only entries no longer in force.
    _refused: dict[str, None] = field(default_factory=lambda: Bounded(const.PEER_TABLE_MAX))
    _retry_at: dict[str, float] = field(default_factory=dict)  # not proven again before
    _dead_until: dict[str, float] = field(default_factory=dict)  # claimed serving, failed
    _blocked_since: dict[tuple[str, str], float] = field(default_factory=dict)
    etcd: EtcdMembers | None = None  # as a server: the last answer of its etcd
    _grant: tuple[str, str, float] | None = None  # (ident, key, since) of the node admitted
    # let their grants lapse: come last
    _passed: dict[str, None] = field(default_factory=lambda: Bounded(const.PEER_TABLE_MAX))

    def proof_done(
        self, now: float, advert: NodeAdvert, ok: bool, reason: str, why: str = ""
    ) -> Event:
        """Record a wire proof's outcome (`why`: its cause, for STATUS); the event to log."""
        self.proving = None
        for held in (self._retry_at, self._dead_until):
            trim(held, const.PEER_TABLE_MAX, lambda _, until: until <= now)
        if ok:
            self.joined, self.joined_at, self.waiting, self.failed = advert, now, None, None
            return Event("wire_proof_passed", (("server", advert.host),))
        why = why or reason or "refused"
        if reason in REFUSED:
            if self.authenticated:
                self._retry_at[advert.name] = now + self.dead_hold
            else:
                self._refused[advert.name] = None
            self.failed = Waiting(advert, now, why)
            return Event("join_refused", (("server", advert.host), ("reason", reason)))
        if advert.phase != v.SERVING:
            self._retry_at[advert.name] = now + self.retry
            same = self.waiting is not None and self.waiting.advert.key == advert.key
            since = self.waiting.since if self.waiting is not None and same else now
            self.waiting = Waiting(advert, since, why)
            return Event("server_not_serving_yet", (("server", advert.host), ("reason", reason)))
        self._retry_at[advert.name] = now + self.dead_hold
        if reason not in ANSWERED:  # nothing answered: maybe a dead node in Avahi's cache
            self._dead_until[advert.name] = now + self.dead_hold
        self.failed = Waiting(advert, now, why)
        return Event("wire_proof_failed", (("server", advert.host), ("reason", reason)))

    def counts(self, advert: NodeAdvert) -> bool:
        """Not an advert refused for serving another CA."""
        return advert.name not in self._refused

    def _provable(self, now: float, advert: NodeAdvert) -> bool:
        return self.counts(advert) and self._retry_at.get(advert.name, 0.0) <= now

    def server(self, view: View, now: float) -> NodeAdvert | None:
        """The server to prove or join now: the one under proof, else one that admits us (it
        serves, and sees the cluster healthy), else serving ones first."""
        servers = [a for a in view.known(now) if a.joinable and self._provable(now, a)]
        for a in servers:
            if a.name == self.proving:
                return a
        if not servers:
            return None
        return min(servers, key=lambda a: (
            a.admit != self.key, a.phase != v.SERVING, a.role != Role.SERVER, a.key
        ))

    def cluster_known(self, view: View, now: float) -> bool:
        """An advert that says a cluster exists, listed or held, starting ones included, unless
        it claimed to serve and nothing answered its proof (a dead server in Avahi's cache)."""
        return any(
            a.cluster_side and self.counts(a) and self._dead_until.get(a.name, 0.0) <= now
            for a in view.adverts(now)
        )

    def server_slot(self, view: View, now: float) -> bool:
        """Whether we join as a server: the free slots go to the lowest waiting keys."""
        taken = {
            a.ident for a in view.adverts(now)
            if self.counts(a) and (a.bootstrapping or (a.cluster_side and a.role != Role.AGENT))
        }
        ahead = {a.ident for a in self._fresh(view, now) if a.key < self.key}
        in_etcd = max((a.members for a in view.adverts(now) if self.counts(a)), default=0)
        return max(len(taken | ahead), in_etcd + len(ahead)) < self.servers

    def admission(self, view: View, now: float, settled: bool) -> str:
        """As a server whose API answers: the key of the fresh node admitted to join as a
        server now, or "" (a join in flight, no free slot, or a lower server admits).

        One node admits, the lowest serving server a live round hears, so two joiners that
        cannot see each other still join one at a time. It admits the lowest live fresh key
        once no other server is starting or joining (each waited for: `_first_waited`) and,
        unless it is the only server, once it has `settled` (etcd's health interval). A grant
        stands until its node is seen to take it or `order_wait` passes, heard or not (a
        joiner's advert lost on the wire must not pass its turn to another); a node that let
        its grant lapse comes after every other. A grant whose node is seen serving as a server
        is done at once, admitting or not: kept while no slot is free, it would outlive its node
        (wiped, back under a new key) and hold the next joiner for the rest of `order_wait`.
        One seen only joining stands until admission opens: a learner gone silent, whose advert
        this node then forgets (an avahi-daemon restart here), must still hold the next back."""
        if self._grant is not None and any(
            a.ident == self._grant[0] and a.role == Role.SERVER and a.phase == v.SERVING
            for a in view.known(now)
        ):
            self._grant = None
        if not self._may_admit(view, now, settled):
            return ""
        if self._grant is not None:
            ident, key, since = self._grant
            taken = any(a.ident == ident and not a.fresh for a in view.known(now))
            if not taken and now < since + self.order_wait:
                return key
            if not taken:
                self._passed[ident] = None
            self._grant = None
        fresh = sorted(self._fresh(view, now), key=lambda a: (a.ident in self._passed, a.key))
        if not fresh:
            return ""
        self._grant = (fresh[0].ident, fresh[0].key, now)
        self._passed.pop(fresh[0].ident, None)
        return fresh[0].key

    def _may_admit(self, view: View, now: float, settled: bool) -> bool:
        """No lower serving server admits, a slot is free, and etcd can take a learner."""
        live = view.live(now)
        heard = {a.ident for a in live}  # under any of its names: a rename is not yet heard live
        if any(
            a.role == Role.SERVER and a.phase == v.SERVING and a.key < self.key
            and a.ident in heard for a in view.known(now)
        ):
            return False
        if not self.slot_free(view, now) or (self._servers(view, now) and not settled):
            return False
        waited = self._first_waited(view, now, self._busy(view, now, live))  # waits start now
        if (etcd := self.etcd_now(now)) is not None and etcd.learners:
            return False  # etcd's word: a learner it holds, heard of or not (after a power cut)
        return waited is None

    def _servers(self, view: View, now: float) -> set[str]:
        return {
            a.ident for a in view.adverts(now)
            if self.counts(a) and a.cluster_side and a.role != Role.AGENT
        }

    def slot_free(self, view: View, now: float) -> bool:
        """As a server: fewer servers than `servers` are known, ourselves included, and in
        etcd (a member powered off is one, seen or not)."""
        etcd = self.etcd_now(now)
        members = etcd.members if etcd is not None else 0
        return max(len(self._servers(view, now)) + 1, members) < self.servers

    def etcd_now(self, now: float) -> EtcdMembers | None:
        """The etcd answer, while recent enough to act on."""
        if self.etcd is None or now - self.etcd.at > self.etcd_ttl:
            return None
        return self.etcd

    def admitted(self, view: View, now: float) -> NodeAdvert | None:
        """A server that admits us, or None (any one: etcd's learner slot is one for the whole
        cluster, whichever server is asked; only a server's advert can admit, as only a
        server is joined)."""
        return next((
            a for a in view.known(now)
            if a.joinable and a.admit == self.key and self.counts(a)
        ), None)

    def _busy(
        self, view: View, now: float, live: list[NodeAdvert]
    ) -> list[tuple[NodeAdvert, str]]:
        """Servers to wait for, each with the state it is waited for in: its phase while it
        does not serve yet and is heard (a starting member, a joiner: maybe an etcd learner);
        UNHEARD for one no live round hears (down? etcd refuses a member while a voter is down,
        and one that comes back must be connected 5 s before the next). A silent joiner is
        waited for as a learner (its phase) unless etcd's own answer tells of its learners."""
        heard = {a.ident for a in live}
        busy = []
        for a in view.known(now):
            if not (a.cluster_side and a.role != Role.AGENT and self.counts(a)):
                continue
            if a.ident in heard:
                self._blocked_since.pop((a.ident, UNHEARD), None)  # a new silence waits anew
                if a.phase != v.SERVING:
                    busy.append((a, a.phase))
            elif a.phase == v.JOINING and self.etcd_now(now) is None:
                busy.append((a, a.phase))
            else:
                busy.append((a, UNHEARD))
        return busy

    def fresh_about(self, view: View, now: float) -> bool:
        """A fresh node's advert is listed or held: someone may want to join."""
        return any(a.fresh for a in view.known(now))

    def _fresh(self, view: View, now: float) -> list[NodeAdvert]:
        """Live fresh nodes: free or bound candidates, and bootstrappers (that lost, or join)."""
        return [a for a in view.live(now) if a.fresh]

    def _first_waited(
        self, view: View, now: float, pending: list[tuple[NodeAdvert, str]]
    ) -> NodeAdvert | None:
        """The lowest-keyed node still waited for. Every wait starts when its node is first
        seen in that state, all at once: a node that moves on (a joiner that serves) is waited
        for afresh."""
        live = {a.ident for a in view.live(now)}
        waited = {a.ident for a, _ in pending}
        trim(self._blocked_since, const.PEER_TABLE_MAX, lambda key, _: key[0] not in waited)
        for a, state in sorted(pending, key=lambda p: p[0].key):
            since = self._blocked_since.setdefault((a.ident, state), now)
            until = since + self.order_wait
            if state == v.JOINING and a.ident not in live:
                until = max(view.heard_at(a.ident), since) + self.learner_removal
            if now < until:
                return a
        return None

    def wake_times(self) -> list[float]:
        """When a hold-down or an order wait ends."""
        granted = [self._grant[2]] if self._grant is not None else []
        ends = [since + self.order_wait for since in [*self._blocked_since.values(), *granted]]
        return [*self._retry_at.values(), *ends]
