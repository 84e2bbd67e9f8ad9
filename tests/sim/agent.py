"""The agent on one node, as agent/daemon/formation.py runs the pure machine.

The machine is the real `Formation`; around it, what the runner does with its actions and how
the I/O turns into observations: the ballot written before a Bind shows, an advert set on the
publisher (a rename withdraws the old name, probes the new one and calls `unpublished()` if the
old one was established), live rounds as wire.py runs them (a question, the resend at 0.5 s,
the result after the 1 s window and NETLINK_SETTLE), wire proofs over TCP, and the release
(drop-in, ballot, /run marker, then k3s). Its browser reports what the node's Avahi cache holds;
after avahi-daemon restarts, items it does not list again are removed at the first AllForNow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent import const
from agent.cluster.election import (
    Action,
    Advertise,
    Bind,
    Event,
    Formation,
    NodeAdvert,
    Prove,
    Release,
    RunRound,
)
from agent.mdns.records import Role
from tests.sim.avahi import ALL_FOR_NOW, ANSWER_DELAY, LATENCY

if TYPE_CHECKING:
    from tests.sim.machine import Machine

STYPE = "_k3s-sugar-dev._tcp"
RESEND = const.LIVE_ROUND_RESEND  # s: wire.py asks again
ROUND_END = const.LIVE_ROUND_WINDOW + const.NETLINK_SETTLE  # s from a round's start to its result
ARP_FAIL = 3.0  # s: connect() to a powered-off host on the LAN fails with EHOSTUNREACH
CONNECT = (0.002, 0.01)  # s: a refused TCP connection (RST)
PROOF = (0.05, 0.3)  # s: TCP, TLS and GET /cacerts on a serving k3s
LOCAL_API = (0.05, 2.0)  # s from k3s serving to the runner's next local poll (backoff to 2 s)
SERVER_MODES = ("cluster-init", "single", "join-server")


def instance(host: str, role: Role) -> str:
    return f"k3s-sugar-dev@{host} ({role})"


class Agent:
    """One run of sugarkube-agent on a machine, from start to stop."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.w = machine.world
        disk = machine.disk
        member = self._membership()
        # FormationRunner._rejoin: a join-server release at an earlier boot, etcd never started.
        rejoin = (
            not machine.marker and disk.released == "join-server" and not disk.etcd_init
            and disk.k3s_role != "agent"
        )
        if rejoin:
            member = None
        self.fresh = member is None and not rejoin  # may vote and stand
        self.f = Formation(
            host=machine.host,
            key=disk.key or self.w.new_key(),  # ballot.Ballot.new(): saved at a Bind or release
            servers=self.w.s.servers,
            member=member,
            ca_on_disk=disk.k3s_ca if member == Role.SERVER else "",
            rejoin=rejoin,
            stype=STYPE,
            bound=disk.bound,
            bound_host=disk.bound_host,
        )
        if member is None and not machine.eligible:
            self.f.ineligible = "k3s cannot run here: memory cgroup off"
        self.alive = True
        self.wanted: tuple[str, NodeAdvert] | None = None
        self.names: dict[str, Role] = {}
        self.items: set[str] = set()
        self.stale: set[str] = set()
        self.watching = False
        self._wake_t = float("inf")

    def _membership(self) -> Role | None:
        """FormationRunner._membership: released before (marker or ballot) or k3s state."""
        disk = self.m.disk
        mode = self.m.marker or disk.released
        if disk.k3s_role == "agent" or mode == "join-agent":
            return Role.AGENT
        if disk.k3s_role == "server" or mode:
            return Role.SERVER
        return None

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> None:
        if self.m.avahi.up:
            self._browse()
        self.step()

    def stop(self) -> None:
        """SIGTERM or a crash: Avahi frees the client's groups either way (goodbyes)."""
        self.alive = False
        self.m.avahi.withdraw()

    def step(self) -> None:
        if not self.alive:
            return
        now = self.w.now
        for action in self.f.step(now):
            self._act(action)
        wake = self.f.wake_at(now)
        if wake < self._wake_t:
            self._wake_t = wake
            self.w.at(wake, self._wake, wake)

    def _wake(self, t: float) -> None:
        if self.alive and t == self._wake_t:
            self._wake_t = float("inf")
            self.step()

    # -- actions ------------------------------------------------------------------------------

    def _act(self, action: Action) -> None:
        self.w.trace(self.m, action)
        if isinstance(action, Advertise):
            self._advertise(action)
        elif isinstance(action, Bind):
            disk = self.m.disk
            disk.key, disk.bound, disk.bound_host = self.f.key, action.key, action.host
            self.w.note(self.m, "stand" if action.key == self.f.key else "bind")
        elif isinstance(action, RunRound):
            self._round()
        elif isinstance(action, Prove):
            self._prove(action.advert)
        elif isinstance(action, Release):
            self._release(action)
        elif isinstance(action, Event):
            self.w.outcome.events[action.name] += 1

    def _advertise(self, a: Advertise) -> None:
        m = self.m
        name = instance(m.host, a.role)
        advert = NodeAdvert(name, m.host, a.role, self.f.key, a.ca, str(m.idx), a.phase, a.vote,
                             a.admit, a.members)
        self.names[name] = a.role
        if self.wanted is not None and self.wanted[0] == name:
            self.wanted = (name, advert)
            m.avahi.update(advert)
            return
        if m.avahi.established() is not None:
            # The publisher's _claim_name: the old name leaves the wire, on_lost fires.
            self.w.at(self.w.now, self._lost)
        self.wanted = (name, advert)
        m.avahi.register(name, advert)

    def _release(self, r: Release) -> None:
        m, disk = self.m, self.m.disk
        if r.mode != "member":
            disk.dropin = r.mode
            disk.target = int(r.leader.address) if r.leader is not None else None
            disk.key, disk.released = self.f.key, r.mode  # FormationRunner._write_release
        m.marker = r.mode
        self.w.released(m, r.mode)
        if r.mode != "join-agent" and self.f.member != Role.AGENT:
            self.watching = True
            if m.k3s.serving:
                self.k3s_serving()
        m.k3s.gate_released()

    def _round(self) -> None:
        heard: dict[int, NodeAdvert] = {}
        now = self.w.now
        self.w.at(now + self.w.uniform(*ANSWER_DELAY), self._hear, heard)
        self.w.at(now + RESEND + self.w.uniform(*ANSWER_DELAY), self._hear, heard)
        self.w.at(now + ROUND_END, self._round_done, now, heard)

    def _hear(self, heard: dict[int, NodeAdvert]) -> None:
        if not self.alive:
            return
        me = self.m.idx
        for other in self.w.machines:
            advert = other.avahi.established() if other is not self.m else None
            if advert is not None and self.w.packet(me, other.idx) and (
                self.w.packet(other.idx, me)
            ):
                heard[other.idx] = advert

    def _round_done(self, started: float, heard: dict[int, NodeAdvert]) -> None:
        if self.alive:
            cluster = self.w.clusters.get(self.m.disk.k3s_ca)
            if self.m.k3s.serving and cluster is not None and not cluster.single:
                # FormationRunner._round: k3s's /db/info, etcd's members and learners
                learners = int(cluster.learner is not None)
                self.f.etcd_members(self.w.now, len(cluster.voters) + learners, learners)
            self.f.round_done(started, list(heard.values()))
            self.step()

    def _prove(self, advert: NodeAdvert) -> None:
        target = self.w.machines[int(advert.address)]
        me, them = self.m.idx, target.idx
        if not target.powered:
            delay, ok, reason = ARP_FAIL, False, "unreachable"
        elif not (self.w.reach(me, them) and self.w.reach(them, me)):
            delay, ok, reason = const.WIRE_PROOF_TIMEOUT, False, "timeout"
        elif target.k3s.serving:
            delay, ok, reason = self.w.uniform(*PROOF), True, ""
        else:
            delay, ok, reason = self.w.uniform(*CONNECT), False, "refused"
        self.w.at(self.w.now + delay, self._proved, advert, ok, reason)

    def _proved(self, advert: NodeAdvert, ok: bool, reason: str) -> None:
        if self.alive:
            event = self.f.proof_done(self.w.now, advert, ok, reason)
            self.w.outcome.events[event.name] += 1
            self.step()

    # -- observations -------------------------------------------------------------------------

    def established(self, name: str) -> None:
        role = self.names.get(name)
        if self.alive and role is not None:
            self.f.published(self.w.now, role)
            self.w.note(self.m, "publish")
            self.step()

    def _lost(self) -> None:
        if self.alive:
            self.f.unpublished()
            self.step()

    def avahi_gone(self, established: bool) -> None:
        """The daemon left: our groups with it (on_lost if the advert was established); the
        browser keeps its items as stale."""
        self.stale |= self.items
        if established:
            self.w.at(self.w.now, self._lost)

    def avahi_back(self) -> None:
        """The daemon runs again: browse anew and publish what is wanted."""
        self.w.at(self.w.now + self.w.uniform(*LATENCY), self._republish, self.m.avahi.inc)
        self._browse()

    def _republish(self, inc: int) -> None:
        if self.alive and inc == self.m.avahi.inc and self.wanted is not None:
            self.m.avahi.register(*self.wanted)

    def _browse(self) -> None:
        avahi = self.m.avahi
        for name, entry in list(avahi.cache.items()):
            self.item(name, entry.advert)
        avahi.browse()
        self.w.at(self.w.now + ALL_FOR_NOW, self._all_for_now, avahi.inc)

    def _all_for_now(self, inc: int) -> None:
        if inc != self.m.avahi.inc:
            return
        for name in sorted(self.stale):
            self.item_gone(name)
        self.stale.clear()

    def item(self, name: str, advert: NodeAdvert) -> None:
        if not self.alive:
            return
        self.items.add(name)
        self.stale.discard(name)
        self.f.advert_seen(self.w.now, advert)
        self.step()

    def item_gone(self, name: str) -> None:
        if not self.alive or name not in self.items:
            return
        self.items.discard(name)
        self.stale.discard(name)
        self.f.advert_gone(self.w.now, name)
        self.step()

    def k3s_serving(self) -> None:
        """The runner's local API poll (backoff to 2 s) sees k3s answer."""
        if self.watching:
            self.w.at(self.w.now + self.w.uniform(*LOCAL_API), self._local_api)

    def _local_api(self) -> None:
        ca = self.m.disk.k3s_ca
        if self.alive and self.m.k3s.serving and ca:
            self.f.local_api(self.w.now, ca)
            self.step()
