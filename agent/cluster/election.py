"""Cluster formation as one pure state machine: observations and `now` in, actions out.

Shape: the lowest live candidate, elected by a quorum of permanent promises (DESIGN.md §A
"Election"; in the spirit of Consul's `bootstrap_expect` and of Paxos's promises).

The rules, each with the fault it answers:
1. A node that holds cluster state, or has released before, is a *member*: its gate is released
   at once and it advertises `role=server` (or `agent`), `phase=starting` and the `ca=` of the CA
   on disk from its first step, whatever k3s is doing (a member is never invisible: after a power
   cut a re-flashed node sees the cluster and joins it instead of starting another).
2. A fresh candidate advertises `vote=`: the lowest election key among itself and the free
   candidates a live round heard (a cached advert may be a node dead for 75 minutes).
3. A candidate *stands* (binds itself and advertises `role=bootstrap`) when it is that lowest
   key, a quorum q = servers // 2 + 1 of live candidates votes for it (itself included), its
   settle window has passed and the double-absence gate saw no cluster on the wire.
4. A free candidate that a live round shows a standing bootstrapper *binds* to the lowest one:
   it persists the promise (action Bind, before anything shows it) and advertises `phase=bound`,
   `vote=<that key>`. The promise is for good: a bound node never votes, stands or binds again.
   A bootstrapper that a live round shows a lower one standing gives up the same way, by binding
   to it, even with its quorum; promises made to it pass on along the chain (view.supporters).
5. A bootstrapper releases `cluster-init` only with q live supporters (itself and the nodes
   bound to it), its own advert established, and a live round started after that establishment
   that heard no cluster and no other bootstrapper (the higher of two gives way; with servers=1,
   where one node is a quorum, this is all that keeps two nodes that stood a moment apart from
   both releasing): a node whose advert left the wire re-proves it is visible.
6. A server that a wire proof shows serving is joined, as a server while a slot is free, else
   as an agent; server joins are admitted by the cluster one at a time (joining.py).
7. A node that cannot run k3s (a blocking prerequisite fails) neither stands, votes nor binds.
8. A node whose server join was cut short before its etcd started joins again, admitted like
   any joiner, and never stands nor votes (joining.py).
9. A node whose `K10` token pins a CA that no CA on its disk matches only joins, in the same
   way: its cluster-init would mint a new CA that no token of the cluster matches, and every
   joiner refusing it would bootstrap a cluster of its own.

Why one cluster. Releasing cluster-init takes q supporters; each node supports at most one
bootstrapper ever, because its promise is permanent (persisted across restarts) and a
bootstrapper that gives up never releases. Two releases therefore need 2q distinct fresh nodes:
with at most `servers` (odd) fresh eligible nodes, 2q > servers, so two clusters cannot form under
any partition, loss, restart or delay. Members never count as supporters, and a cluster that
exists is visible through its members (rule 1), so fresh nodes join it; a partition that hides a
whole existing cluster is the one case quorum cannot cover (issue 12's split-brain alarm).
The bound: with more fresh nodes than `servers` (5 Pis, servers=3), two sides of a partition at
power-on that each hold q nodes can each bootstrap; without a partition the lowest key wins.

What a fault costs (liveness). A lone node or a minority side waits and says so. A candidate
that dies before standing is forgotten once live rounds stop hearing it. A bootstrapper that
dies after nodes bound to it holds them until it returns (its key and promise are on disk: it
resumes and releases); a node bound to one that never returns warns after `stall_warn` and
needs `sugarkube-agent wipe --yes` to stand again. That is the price of the rule above.

Servers or agents: a joiner takes a server slot while the servers, released joiners and
bootstrappers it knows, and the live candidates with lower keys, number fewer than `servers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent import const
from agent.cluster import view as v
from agent.cluster.actions import (
    Action,
    Advertise,
    Bind,
    Event,
    Prove,
    Release,
    ReleaseMode,
    RunRound,
)
from agent.cluster.gate import AbsenceGate
from agent.cluster.joining import JoinSteps
from agent.cluster.joins import EtcdMembers, Joins
from agent.cluster.phases import Phase, Timings
from agent.cluster.view import NodeAdvert, View
from agent.mdns.records import Role

__all__ = [  # the machine's vocabulary, for the runner, the tests and the simulator
    "Action", "Advertise", "Bind", "Event", "Formation", "NodeAdvert", "Phase", "Prove",
    "Release", "ReleaseMode", "RunRound", "Timings",
]


def quorum(servers: int) -> int:
    """Supporters a bootstrapper needs, itself included: a majority of `servers`."""
    return servers // 2 + 1


@dataclass
class Formation(JoinSteps):
    """The node's formation decisions; feed it observations, call step(now), do the actions."""

    host: str
    key: str
    servers: int
    member: Role | None = None  # SERVER or AGENT when the node held cluster state at start
    ca_on_disk: str = ""  # the cluster CA hash on disk (a member's, or once k3s wrote it)
    can_join: bool = True  # False without a token: k3s cannot join anything
    authenticated: bool = False  # adverts carry a valid MAC (agent/mdns/auth.py): see Joins
    ineligible: str = ""  # why k3s cannot run here ("" when it can): the node does not stand
    rejoin: bool = False  # a server join cut short before etcd started: join again (rule 8)
    join_only: str = ""  # why this node may only join, never stand (rule 9), "" when it may
    agent_only: bool = False  # only k3s-agent.service here: never stands, joins as an agent
    bound: str = ""  # the key this node promised its support to ("" free; its own: stood)
    bound_host: str = ""
    stype: str = ""
    timings: Timings = field(default_factory=Timings)
    phase: Phase = Phase.DISCOVER
    status: str = "starting"
    released: Release | None = None
    view: View = field(init=False)
    _gate: AbsenceGate = field(default_factory=AbsenceGate)
    _published_at: float | None = None
    _published_role: Role | None = None
    _round_in_flight: bool = False
    _round_due: float = 0.0  # no round is asked for before this
    _clean_round: float = float("-inf")  # start of the last round that heard no cluster
    joins: Joins = field(init=False)
    _stalled: bool = False
    _unseen_since: float | None = None  # the node we are bound to: not live since
    _heard_from: float = float("-inf")  # start of the last live round that completed
    _local_ca: str | None = None
    _api_at: float = 0.0  # when the local API first answered
    _advertised: Advertise | None = None

    def __post_init__(self) -> None:
        t = self.timings
        self.view = View(self.key, v.Holds(t.candidate_hold, t.dead_hold, t.live_ttl))
        self.joins = Joins(
            self.key, self.servers, t.bootstrap_retry, t.dead_hold, t.join_order_wait,
            t.learner_removal, t.etcd_ttl, authenticated=self.authenticated,
        )

    @property
    def quorum(self) -> int:
        return quorum(self.servers)

    @property
    def stalled(self) -> bool:
        """Waiting longer than stall_warn on a node that does not serve (or is not seen)."""
        return self._stalled and self.released is None

    # -- observations -------------------------------------------------------------------------

    def advert_seen(self, now: float, advert: NodeAdvert) -> None:
        """The browser reports an advert of another node (added or updated)."""
        self.view.seen(now, advert)

    def advert_gone(self, now: float, name: str) -> None:
        """The browser reports an advert removed."""
        self.view.gone(now, name)

    def published(self, now: float, role: Role) -> None:
        """Avahi reports our advert for `role` established (probed and announced)."""
        if role == self._published_role and self._published_at is None:
            self._published_at = now

    def unpublished(self) -> None:
        """Our advert left the wire (avahi-daemon stopped or reset our entry groups)."""
        self._published_at = None
        self._clean_round = float("-inf")

    def round_done(self, started: float, adverts: list[NodeAdvert]) -> None:
        """A live round that started at `started` heard these adverts (ours excluded)."""
        self._round_in_flight = False
        self._heard_from = max(self._heard_from, started)
        self.view.heard(started, adverts)
        blocked = any(self._blocks(a) for a in adverts if a.key != self.key)
        self._gate.observe(started, blocked)
        if blocked:
            self._clean_round = float("-inf")
        elif self._published_at is not None and started >= self._published_at:
            self._clean_round = started

    def round_failed(self, now: float) -> None:
        """A live round could not run: no evidence either way; another one is asked for after
        timings.round_retry (a round that fails at once, e.g. sockets refused, must not spin)."""
        self._round_in_flight = False
        self._round_due = now + self.timings.round_retry

    def proof_done(
        self, now: float, advert: NodeAdvert, ok: bool, reason: str = "", why: str = ""
    ) -> Event:
        """The wire proof of a server finished (`reason` a RefusalReason value, `why` its cause
        for STATUS); returns the event to log."""
        if ok:
            self._stalled = False
        return self.joins.proof_done(now, advert, ok, reason, why or reason)

    def local_api(self, now: float, ca_sha256: str) -> None:
        """The local k3s API answers on 6443, serving this CA."""
        self._local_ca, self._api_at = ca_sha256, now

    def ca_written(self, ca_sha256: str) -> None:
        """k3s wrote the cluster CA to this node's disk: the advert names it from now on, before
        the API serves (joiners pin the token to it; a clock behind may keep the API unproven)."""
        self.ca_on_disk = ca_sha256

    def etcd_members(self, now: float, members: int, learners: int) -> None:
        """This server's etcd lists `members`, `learners` of them learners (k3s's /db/info)."""
        self.joins.etcd = EtcdMembers(members, learners, now)

    # -- decisions ----------------------------------------------------------------------------

    def step(self, now: float) -> list[Action]:
        """Everything to do now, given what was observed; call again after any observation."""
        actions: list[Action] = []
        if self.member is not None and self.released is None:
            self._release(now, actions, Release("member"), Phase.MEMBER, "member: k3s starting")
        if self.released is not None:
            self._after_release(now, actions)
            return actions
        if self.ineligible:
            self.phase = Phase.INELIGIBLE
            self._advertise(actions, Advertise(Role.CANDIDATE, v.INELIGIBLE))
            self.status = f"not standing: {self.ineligible}"
            return actions
        self._keep_rounds(now, actions)
        if (server := self.joins.server(self.view, now)) is not None:
            self._join(now, server, actions)
        elif self.agent_only:
            self.phase = Phase.DISCOVER
            self._advertise_fresh(now, actions)
            self.status = (
                "agent only (k3s-agent.service, no k3s.service here): waiting for a server to join"
            )
        elif self.rejoin or self.join_only:
            self.phase = Phase.BOUND
            self._advertise_fresh(now, actions)
            self.status = (
                f"not standing: {self.join_only}; waiting for a server" if self.join_only else
                "rejoin: a server join was cut short before etcd started; waiting for a server"
            )
        elif self.bound == self.key:
            self._stand(now, actions)
        elif self.bound:
            self._wait_bound(now, actions)
        else:
            self._elect(now, actions)
        self._say_waiting(now, actions)
        return actions

    def wake_at(self, now: float) -> float:
        """When step() may decide something new without a new observation."""
        if self.released is not None:
            after = [now + const.IDLE_WAKE]  # after the release observations matter, and:
            if self._local_ca is not None:
                after.append(self._api_at + self.timings.voter_settle)
            if self._admission_pace(now) is not None:  # admitting joiners
                after += [self._round_due, *self.joins.wake_times()]
                after.append(self.view.next_change(now) or now)
            return self._next(now, after)
        t = self.timings
        candidates = [now + const.FORMATION_TICK, self._round_due]
        if self._published_at is not None:
            candidates.append(self._published_at + t.settle)
        candidates += [self._gate.next_round_at() or now, *self.joins.wake_times()]
        if self.joins.waiting is not None:
            candidates.append(self.joins.waiting.since + t.stall_warn)
        if self._unseen_since is not None:
            candidates.append(self._unseen_since + t.stall_warn)
        candidates.append(self.view.next_change(now) or now)
        return self._next(now, candidates)

    @staticmethod
    def _next(now: float, candidates: list[float]) -> float:
        future = [c for c in candidates if c > now]
        return min(future, default=now + const.FORMATION_TICK)

    # -- the phases ---------------------------------------------------------------------------

    def _elect(self, now: float, actions: list[Action]) -> None:
        self.phase = Phase.DISCOVER
        live = self.view.live(now)
        standing = [a for a in live if a.bootstrapping]
        if standing:
            self._bind_to(now, min(standing, key=lambda a: (a.key, a.name)), actions)
            return
        free, lowest = self._vote(now)
        self._advertise(actions, Advertise(Role.CANDIDATE, v.DISCOVER, lowest[1], vote=lowest[0]))
        if self._published_at is None:
            self.status = "discover: publishing this node's advert"
            return
        visible = 1 + len(free)
        if visible < self.quorum:
            self.status = (
                f"waiting: {visible} of {self.servers} servers visible, {self.quorum} needed; "
                "SUGARKUBE_SERVERS=1 for a single server"
            )
            return
        if lowest[0] != self.key:
            self.status = f"waiting: {lowest[1]} has the lowest election key and stands"
            return
        votes = 1 + sum(a.vote == self.key for a in free)
        if votes < self.quorum:
            self.status = f"elect: {votes} of {self.quorum} votes needed to stand"
            return
        self.phase = Phase.ELECT
        settled = now >= self._published_at + self.timings.settle
        if not self._gate.passed or not settled:
            needed = self._gate.rounds_needed  # counted on while the settle window runs
            self.status = (
                f"elect: absence {min(self._gate.absent_rounds, needed)}/{needed} for {self.stype}"
            )
            return
        actions.append(Event("election_won", (("key", self.key), ("votes", votes))))
        self._bind_to(now, None, actions)

    def _vote(self, now: float) -> tuple[list[NodeAdvert], tuple[str, str]]:
        """The live free candidates, and the (key, host) a free node votes for: the lowest."""
        free = [a for a in self.view.live(now) if a.free and a.key]
        return free, min([(self.key, self.host)] + [(a.key, a.host) for a in free])

    def _advertise_fresh(self, now: float, actions: list[Action]) -> None:
        """Say what this unreleased node is: standing, bound, or a free candidate and its vote
        (also while it proves or waits to join a server: others count it for slots and turns)."""
        if self.agent_only:  # takes no server slot, so it neither stands nor votes
            advert = Advertise(Role.CANDIDATE, v.INELIGIBLE, self.host)
        elif self.rejoin or self.join_only:  # bound to whichever server admits it
            advert = Advertise(Role.CANDIDATE, v.BOUND, self.bound_host or self.host, vote="")
        elif self.bound == self.key:
            advert = Advertise(Role.BOOTSTRAP, v.BOOTSTRAPPING, self.host, vote=self.key)
        elif self.bound:
            advert = Advertise(Role.CANDIDATE, v.BOUND, self.bound_host, vote=self.bound)
        else:
            _, (key, host) = self._vote(now)
            advert = Advertise(Role.CANDIDATE, v.DISCOVER, host, vote=key)
        self._advertise(actions, advert)

    def _stand(self, now: float, actions: list[Action]) -> None:
        self.phase = Phase.BOOTSTRAP
        self._advertise_fresh(now, actions)
        live = self.view.live(now)
        backing = 1 + len(v.supporters(self.key, live))
        visible = self._published_at is not None and self._clean_round >= self._published_at
        if backing >= self.quorum and visible and not self.joins.cluster_known(self.view, now):
            mode: ReleaseMode = "single" if self.servers == 1 else "cluster-init"
            self._release(now, actions, Release(mode), Phase.RELEASED, f"released: {mode}")
            return
        lower = [a for a in live if a.bootstrapping and a.key < self.key]
        if lower:
            winner = min(lower, key=lambda a: (a.key, a.name))
            actions.append(Event("bootstrap_yielded", (("to", winner.host),)))
            self._bind_to(now, winner, actions)
            return
        self.status = f"bootstrap: {backing} of {self.servers} servers agree, {self.quorum} needed"

    def _wait_bound(self, now: float, actions: list[Action]) -> None:
        self.phase = Phase.BOUND
        self._advertise_fresh(now, actions)
        if any(a.key == self.bound for a in self.view.live(now)):
            self._unseen_since = None
        elif self._unseen_since is None:
            self._unseen_since = now
        self.status = f"bound to bootstrap node {self.bound_host}: waiting for it to serve"
        if self._unseen_since is not None and now - self._unseen_since >= self.timings.stall_warn:
            minutes = int((now - self._unseen_since) // 60)
            self.status = (
                f"bound to bootstrap node {self.bound_host}, not seen for {minutes} min: power it"
                " on, or run `sugarkube-agent wipe --yes` here to stand again"
            )
            waited = now - self._unseen_since
            self._stall(actions, self.bound_host, "bootstrap node not seen", waited)

    # -- helpers ------------------------------------------------------------------------------

    def _bind_to(self, now: float, target: NodeAdvert | None, actions: list[Action]) -> None:
        """Promise our support, for good: to `target`, or to ourselves (stand)."""
        key, host = (self.key, self.host) if target is None else (target.key, target.host)
        self.bound, self.bound_host = key, host
        self._gate.reset()
        self._clean_round = float("-inf")
        actions.append(Bind(key, host))  # before the advert that shows it
        self._advertise_fresh(now, actions)
        if target is None:
            self.phase = Phase.BOOTSTRAP
            self.status = "bootstrap: waiting for a quorum of supporters"
        else:
            self.phase = Phase.BOUND
            self.status = f"bound to bootstrap node {host}: waiting for it to serve"

    def _release(
        self, now: float, actions: list[Action], release: Release, phase: Phase, status: str
    ) -> None:
        self.released = release
        self.phase = phase
        self.status = status
        actions.append(release)
        self._after_release(now, actions)

    def _keep_rounds(self, now: float, actions: list[Action], pace: float = 0.0) -> None:
        """Rounds run back to back until the release: liveness and absence both come from them
        (after it, `pace` apart while this server may admit joiners)."""
        due = max(self._gate.next_round_at() or now, self._round_due)
        if not self._round_in_flight and now >= due:
            self._round_in_flight = True
            self._round_due = now + max(self.timings.round_retry, pace)
            actions.append(RunRound())

    def _advertise(self, actions: list[Action], advert: Advertise) -> None:
        if advert != self._advertised:
            if self._advertised is None or advert.role != self._advertised.role:
                self._published_at = None
                self._published_role = advert.role
            self._advertised = advert
            actions.append(advert)

    def _blocks(self, advert: NodeAdvert) -> bool:
        """Does this live advert say we must not stand or, once standing, release: a cluster,
        or another standing node (rule 5: the higher one gives way, then the lower proceeds)?"""
        if not self.joins.counts(advert):
            return False
        return advert.cluster_side or advert.bootstrapping
