"""The joining half of the formation machine: proving a server, joining it as a server or an
agent, and, once released, admitting the next server joiner (rules 6 and 8 of election.py).

6. A server that a wire proof shows serving is joined, whatever the node's state; as a server
   while fewer than `servers` servers exist, else as an agent. Server joins go one at a time
   (etcd admits one learner at a time), admitted by the cluster: the lowest serving server
   advertises `admit=` for the lowest live fresh node once no other server is starting,
   joining or silent and its etcd holds no learner (joins.py, admission), and a server joiner
   releases only when admitted.
8. A node whose server join was cut short before its etcd started (a power cut in the seconds
   between its release and etcd's first write) is no member: its k3s would ask etcd to add it
   again, so it joins again, admitted like any joiner; it never stands nor votes (its disk
   holds the cluster's CA: a cluster-init there would be a second etcd under the same CA).

A node with only k3s-agent.service installed (`agent_only`) joins as an agent whatever the
slots: `k3s agent` cannot take a server's place.

These are the methods of election.Formation that carry those rules, kept here with them; the
machine's state is Formation's (_Machine names what they use of it).
"""

from __future__ import annotations

from typing import Protocol

from agent import const
from agent.cluster import view as v
from agent.cluster.actions import Action, Advertise, Event, Prove, Release, ReleaseMode
from agent.cluster.joins import Joins
from agent.cluster.phases import Phase, Timings
from agent.cluster.view import NodeAdvert, View
from agent.mdns.records import Role


class _Machine(Protocol):
    """What the joining steps use of election.Formation."""

    host: str
    key: str
    member: Role | None
    ca_on_disk: str
    can_join: bool
    agent_only: bool
    timings: Timings
    phase: Phase
    status: str
    released: Release | None
    view: View
    joins: Joins
    _published_at: float | None
    _heard_from: float
    _local_ca: str | None
    _api_at: float
    _stalled: bool

    def _advertise_fresh(self, now: float, actions: list[Action]) -> None: ...
    def _advertise(self, actions: list[Action], advert: Advertise) -> None: ...
    def _keep_rounds(self, now: float, actions: list[Action], pace: float = 0.0) -> None: ...
    def _release(
        self, now: float, actions: list[Action], release: Release, phase: Phase, status: str
    ) -> None: ...
    def _after_release(self, now: float, actions: list[Action]) -> None: ...
    def _admission_pace(self, now: float) -> float | None: ...
    def _stall(self, actions: list[Action], host: str, reason: str, waited: float) -> None: ...


class JoinSteps:
    """Rules 6 and 8, as methods Formation inherits."""

    def _join(self: _Machine, now: float, server: NodeAdvert, actions: list[Action]) -> None:
        self.phase = Phase.JOIN
        self._advertise_fresh(now, actions)
        joined = self.joins.joined
        if joined is not None and joined.name == server.name:
            published = self._published_at
            if published is None or self._heard_from <= max(self.joins.joined_at, published):
                # Server or agent, and whose turn it is, are decided on the whole view, by a
                # live round started once this node's own advert is on the wire and the proof
                # passed: Avahi's browser may not have heard a joiner yet (a healed partition, a
                # cold cache), and of two joiners deciding at once the later sees the earlier.
                self.status = f"join: counting servers before joining {server.host}"
                return
            slot = not self.agent_only and self.joins.server_slot(self.view, now)
            mode: ReleaseMode = "join-server" if slot else "join-agent"
            if mode == "join-server" and self.joins.admitted(self.view, now) is None:
                # A key this node never saw (a node gone, or unheard here) is not "no one".
                admits = self.view.host_of(server.admit) or (
                    "a node not seen here" if server.admit else "no one"
                )
                self.status = (
                    f"join: waiting for {server.host} to admit this node as a server (it admits "
                    f"{admits} now; etcd admits one learner at a time)"
                )
                return
            self._release(
                now, actions, Release(mode, server), Phase.RELEASED,
                f"joined https://{server.host}:6443",
            )
            return
        if not self.can_join:
            self.status = f"cannot join {server.host}: no token configured (SUGARKUBE_TOKEN)"
            return
        self.status = f"join: proving {server.host}:6443"
        if self.joins.proving is None:
            self.joins.proving = server.name
            actions.append(Prove(server))

    def _after_release(self: _Machine, now: float, actions: list[Action]) -> None:
        release = self.released
        assert release is not None
        leader = release.leader.host if release.leader is not None else self.host
        vote = release.leader.key if release.leader is not None else self.key
        if release.mode == "join-agent" or self.member == Role.AGENT:
            self._advertise(actions, Advertise(Role.AGENT, v.SERVING, leader, vote=vote))
            self.status = "agent: joined the cluster"
            return
        admit = ""
        if self._local_ca is not None:
            self.phase = Phase.SERVING
            self.status = "serving: k3s API up on 6443"
            # A server admits the next server joiner (joins.py, admission), from what live
            # rounds hear while fresh nodes are about.
            settled = now >= self._api_at + self.timings.voter_settle
            admit = self.joins.admission(self.view, now, settled)
            if (pace := self._admission_pace(now)) is not None:
                self._keep_rounds(now, actions, pace)
            if settled:
                # `serving` tells server joiners it is their turn: etcd refuses a new member
                # until every voter has been connected for its health interval, so a node that
                # just became one says so only that much later (joins.py, admission).
                etcd = self.joins.etcd_now(now)
                self._advertise(actions, Advertise(
                    Role.SERVER, v.SERVING, leader, self._local_ca, vote, admit,
                    etcd.members if etcd is not None else 0,
                ))
                return
        # Released, k3s starting: say so on the wire at once, and by an in-place TXT update
        # where a rename (~1 s of probing, no advert) would hide that this node took a slot.
        if release.mode == "join-server":
            advert = Advertise(Role.CANDIDATE, v.JOINING, leader, vote=vote, admit=admit)
        elif release.mode == "member":
            advert = Advertise(Role.SERVER, v.STARTING, leader, self.ca_on_disk, vote, admit)
        else:
            advert = Advertise(Role.BOOTSTRAP, v.STARTING, leader, self.ca_on_disk, vote, admit)
        self._advertise(actions, advert)

    def _admission_pace(self: _Machine, now: float) -> float | None:
        """How far apart a serving server runs live rounds to admit joiners, None for not at
        all: back to back while a fresh node is listed, else slowly while a server slot is
        free (Avahi's browser may never list a node heard again after a partition heals)."""
        if self._local_ca is None:
            return None
        if self.joins.fresh_about(self.view, now):
            return 0.0
        return const.ADMISSION_IDLE_ROUND if self.joins.slot_free(self.view, now) else None

    def _say_waiting(self: _Machine, now: float, actions: list[Action]) -> None:
        """While a known server does not serve yet, the status names it; stalls warn once.
        A known server that claims to serve and failed its proof is named with the cause."""
        if self.released is not None:
            return
        failed = self.joins.failed
        if failed is not None and any(a.name == failed.advert.name for a in self.view.known(now)):
            self.status += f"; {failed.advert.host} refused: {failed.reason}"
        waiting = self.joins.waiting
        if waiting is None:
            return
        advert, since, reason = waiting.advert, waiting.since, waiting.reason
        if not any(a.name == advert.name for a in self.view.known(now)):
            self.joins.waiting = None
            return
        waited = now - since
        self.status = f"waiting for {advert.host} to serve (last proof: {reason})"
        if waited >= self.timings.stall_warn:
            self.status = f"waiting {int(waited // 60)} min for {advert.host} to serve " + (
                f"(last proof: {reason})"
            )
            self._stall(actions, advert.host, reason, waited)

    def _stall(
        self: _Machine, actions: list[Action], host: str, reason: str, waited: float
    ) -> None:
        if not self._stalled:
            self._stalled = True
            actions.append(
                Event("join_stalled", (("server", host), ("reason", reason), ("s_waited",
                                                                              round(waited))))
            )
