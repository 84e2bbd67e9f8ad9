"""The simulated LAN: machines, the network between them, the schedule's faults, one event heap.

Deterministic: one random.Random seeded by the schedule draws every loss, delay and jitter, and
events at the same instant run in the order they were scheduled. Simulated time only: a run of
several simulated minutes takes milliseconds.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

from agent import const
from tests.sim.agent import SERVER_MODES
from tests.sim.k3s import LEARNER_STALL, LEARNER_TICK, Cluster, Ident
from tests.sim.machine import Disk, Machine
from tests.sim.outcome import Outcome, finish
from tests.sim.schedule import (
    BOOT,
    LOW,
    AgentRestart,
    AvahiRestart,
    Fault,
    Partition,
    Power,
    PowerCut,
    Schedule,
)

BOOT_SPREAD = (0.0, 15.0)  # s from power-on to the agent's start: Pis boot 5-15 s apart
CHECK_EVERY = 0.5  # s between checks of whether the run is over
TAIL = 20.0  # s a formed cluster is watched after the last disturbance (a late second init)
# s after the last disturbance by which every up, eligible node is released: a joiner that died
# as a learner holds the joins behind it until k3s would have removed it (LEARNER_REMOVAL, 330 s
# after it was last heard), and the joins after it go one at a time (~30 s each here).
LIVENESS_BOUND = const.LEARNER_REMOVAL + 120.0


class World:
    """One run of a Schedule."""

    def __init__(self, schedule: Schedule, *, trace: bool = False) -> None:
        self.s = schedule
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.rng = random.Random(schedule.seed)
        self._ranked = bool(schedule.ranks)
        self._keys = 0
        keys = [self.new_key(r) for r in schedule.ranks] if self._ranked else [
            self.new_key() for _ in schedule.starts
        ]
        self.machines = [
            Machine(self, i, keys[i], i not in schedule.ineligible) for i in range(schedule.n)
        ]
        self._blocked: Counter[tuple[int, int]] = Counter()
        self.clusters: dict[str, Cluster] = {}
        self.outcome = Outcome(schedule, trace=[] if trace else None)
        self.mains = True
        self.pending = 0  # scheduled arrivals and fault steps not yet happened
        self.armed: list[Fault] = []
        self.stood: int | None = None
        self.initiator: int | None = None
        self.disturbed = 0.0
        self.released_at: float | None = None
        self.formed_at: float | None = None
        self._stopped = False

    # -- the engine ---------------------------------------------------------------------------

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (t, self._seq, fn, args))
        self._seq += 1

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.rng.random()

    def new_key(self, rank: int | None = None) -> str:
        if self._ranked or rank is not None:
            self._keys += 1
            return f"{(rank if rank is not None else 1000 + self._keys) + 1 << 40:016x}"
        return f"{self.rng.getrandbits(64):016x}"

    def trace(self, m: Machine, what: object) -> None:
        if self.outcome.trace is not None:
            self.outcome.trace.append(f"{self.now:8.3f} n{m.idx} {what}")

    def run(self) -> Outcome:
        for i, t in enumerate(self.s.starts):
            if t is not None:
                self.pending += 1
                self.at(t, self._arrive, self.machines[i])
        for fault in self.s.faults:
            if fault.after:
                self.armed.append(fault)
            else:
                self.pending += 1
                self.at(fault.at, self._fire, fault, None)
        self.at(CHECK_EVERY, self._check)
        heap = self._heap
        while heap and not self._stopped:
            t, _, fn, args = heapq.heappop(heap)
            self.now = t
            fn(*args)
        return finish(self)

    # -- the network --------------------------------------------------------------------------

    def reach(self, src: int, dst: int) -> bool:
        return not self._blocked[(src, dst)]

    def packet(self, src: int, dst: int) -> bool:
        """Does one multicast packet from src reach dst (a powered machine with avahi up)?"""
        other = self.machines[dst]
        if not other.powered or self._blocked[(src, dst)]:
            return False
        return self.s.loss == 0.0 or self.rng.random() >= self.s.loss

    # -- k3s's clusters -----------------------------------------------------------------------

    def member(self, ident: Ident) -> Machine | None:
        m = self.machines[ident[0]]
        return m if m.disk.gen == ident[1] else None

    def mint(self, m: Machine, *, single: bool) -> str:
        ca = f"ca{len(self.outcome.cas) + 1}"
        self.outcome.cas.append((round(self.now, 2), m.idx, ca))
        self.clusters[ca] = Cluster(ca, single, {m.ident}, self.uniform(0, LEARNER_TICK))
        self.clusters[ca].servers.add(m.ident)
        self.trace(m, f"k3s minted {ca}")
        return ca

    def quorum(self, cluster: Cluster) -> bool:
        running = 0
        for ident in cluster.voters:
            m = self.member(ident)
            running += m is not None and m.k3s.etcd_running()
        return running >= len(cluster.voters) // 2 + 1

    def recompute(self, ca: str) -> None:
        """Who serves in this cluster, now that a member started or stopped."""
        cluster = self.clusters.get(ca)
        if cluster is None:
            return
        quorum = self.quorum(cluster)
        for ident in cluster.servers:
            m = self.member(ident)
            if m is None:
                continue
            serving = m.k3s.state == "up" and (cluster.single or (
                quorum and ident in cluster.voters))
            if serving and not m.k3s.serving:
                m.k3s.serving = True
                self.trace(m, "k3s serving")
                if m.agent is not None:
                    m.agent.k3s_serving()
                self.note(m, "serve")
            m.k3s.serving = serving
        self._update_formed()

    def schedule_tick(self, cluster: Cluster) -> None:
        t = cluster.tick + (math.floor((self.now - cluster.tick) / LEARNER_TICK) + 1) * LEARNER_TICK
        if t <= self.now + 1e-6:  # float rounding at a tick's own instant
            t += LEARNER_TICK
        self.at(t, self._tick, cluster)

    def _tick(self, cluster: Cluster) -> None:
        """k3s's learner manager on the leader: promote the learner once it caught up."""
        ident = cluster.learner
        if ident is None:
            return
        m = self.member(ident)
        if m is not None and m.k3s.etcd_running():
            cluster.progress_at = self.now
            if self.quorum(cluster) and self.now - cluster.learner_since >= cluster.catch_up:
                cluster.voters.add(ident)
                cluster.learner = None
                self.trace(m, f"etcd: promoted to voter in {cluster.ca}")
                self.recompute(cluster.ca)
                return
        elif self.now - cluster.progress_at >= LEARNER_STALL:
            cluster.learner = None  # removed: no progress for 5 minutes
            return
        self.schedule_tick(cluster)

    # -- what the agents and k3s report -------------------------------------------------------

    def agent_started(self, m: Machine) -> None:
        assert m.agent is not None
        self.trace(m, f"agent starts: key={m.agent.f.key} member={m.agent.f.member}")
        if m.agent.fresh and m.eligible:
            self.outcome.fresh.add(m.ident)
        self._update_formed()

    def released(self, m: Machine, mode: str) -> None:
        if mode in ("cluster-init", "single") and self.initiator is None:
            self.initiator = m.idx
        if not m.eligible:
            self.outcome.ineligible_released.append(m.idx)
        self.count_servers()
        self.note(m, "release")

    def count_servers(self) -> None:
        """Nodes that are servers of a cluster (k3s took a server's state), or released this
        boot to become one, per cluster. A server release whose power went before its k3s took
        anything is no server: at its next boot it joins again, admitted (election.py rule 8)."""
        per: Counter[str] = Counter()
        for x in self.machines:
            if x.disk.k3s_role == "server" or x.marker in SERVER_MODES:
                per[self._cluster_of(x)] += 1
        self.outcome.servers_max = max(self.outcome.servers_max, *per.values(), 0)

    def _cluster_of(self, x: Machine) -> str:
        if x.disk.k3s_ca:
            return x.disk.k3s_ca
        if x.disk.dropin == "join-server" and x.disk.target is not None:
            target = self.machines[x.disk.target]
            return target.disk.k3s_ca or f"to be minted by n{target.idx}"
        return f"to be minted by n{x.idx}"

    def note(self, m: Machine, what: str) -> None:
        """Something happened to m: arm the faults that wait for it."""
        if what == "stand" and self.stood is None:
            self.stood = m.idx
        if what in ("release", "serve"):
            self._update_formed()
        for fault in list(self.armed):
            subject = fault.who if isinstance(fault, PowerCut | Partition) else fault.node
            if fault.after == what and self._is(subject, m, what):
                self.armed.remove(fault)
                self.pending += 1
                self.at(self.now + fault.at, self._fire, fault, m.idx)

    def _is(self, subject: int, m: Machine, what: str) -> bool:
        if subject == BOOT:
            if what in ("release", "serve"):
                return m.disk.released in ("cluster-init", "single")
            return m.idx == self.stood
        if subject == LOW:
            return m.idx == self._lowest()
        return m.idx == subject

    def _lowest(self) -> int:
        keyed = [(m.key, m.idx) for m in self.machines if m.powered and m.agent is not None]
        return min(keyed)[1] if keyed else 0

    def _resolve(self, subject: int) -> int:
        if subject == BOOT:
            for idx in (self.initiator, self.stood):
                if idx is not None:
                    return idx
            return self._lowest()
        return self._lowest() if subject == LOW else subject

    # -- the schedule -------------------------------------------------------------------------

    def _disturb(self) -> None:
        self.disturbed = self.now
        self.released_at = self.formed_at = None
        self._update_formed()

    def _arrive(self, m: Machine) -> None:
        self.pending -= 1
        m.arrived = True
        if self.mains and not m.powered:
            m.boot()
        self._disturb()

    def _boot(self, m: Machine) -> None:
        self.pending -= 1
        if self.mains and not m.powered and m.arrived:
            m.boot()
        self._disturb()

    def _fire(self, fault: Fault, subject: int | None) -> None:
        self.pending -= 1
        self.trace(self.machines[0], f"fault {fault}")
        if isinstance(fault, PowerCut):
            self._power_cut(fault)
        elif isinstance(fault, Partition):
            self._partition(fault)
        else:
            m = self.machines[subject if subject is not None else self._resolve(fault.node)]
            if isinstance(fault, Power):
                m.power_off()
                if fault.off is not None:
                    self.pending += 1
                    self.at(self.now + fault.off, self._boot, m)
            elif isinstance(fault, AgentRestart) and m.agent is not None:
                m.stop_agent()
                self.pending += 1
                self.at(self.now + fault.off, self._agent_back, m, m.boots)
            elif isinstance(fault, AvahiRestart) and m.avahi.up:
                m.avahi.stop(goodbye=not fault.crash)
                self.pending += 1
                self.at(self.now + fault.off, self._avahi_back, m, m.boots)
        self._disturb()

    def _power_cut(self, fault: PowerCut) -> None:
        for m in self.machines:
            m.power_off()
        self.mains = False
        if fault.reflash is not None:
            m = self.machines[self._resolve(fault.reflash)]
            self.outcome.reflashes += 1
            self.outcome.promises_lost += bool(m.disk.bound)
            m.disk = Disk(gen=m.disk.gen + 1)
            m.next_key = self.new_key()
        self.pending += 1
        self.at(self.now + fault.off, self._mains_on)

    def _mains_on(self) -> None:
        self.pending -= 1
        self.mains = True
        for m in self.machines:
            if m.arrived:
                self.pending += 1
                self.at(self.now + self.uniform(*BOOT_SPREAD), self._boot, m)
        self._disturb()

    def _partition(self, fault: Partition) -> None:
        groups = [set(g) for g in fault.groups]
        listed = set().union(*groups)
        groups[0] |= {m.idx for m in self.machines} - listed
        if len(groups) == 1:
            pairs = {(a, b) for a in fault.groups[0] for b in fault.groups[0] if a != b}
        else:
            pairs = {(a, b) for i, g in enumerate(groups) for h in groups[i + 1:] for a in g
                     for b in h}
            pairs |= {(b, a) for a, b in pairs}
        if fault.oneway:
            first = groups[0] if len(groups) > 1 else {fault.groups[0][0]}
            pairs = {(a, b) for a, b in pairs if a in first}
        self._blocked.update(pairs)
        self.pending += 1
        self.at(self.now + fault.heal, self._heal, pairs)

    def _heal(self, pairs: set[tuple[int, int]]) -> None:
        self.pending -= 1
        self._blocked.subtract(pairs)
        self._disturb()

    def _agent_back(self, m: Machine, boots: int) -> None:
        self.pending -= 1
        m.start_agent(boots)
        self._disturb()

    def _avahi_back(self, m: Machine, boots: int) -> None:
        self.pending -= 1
        if boots == m.boots and m.powered and not m.avahi.up:
            m.avahi.start()
        self._disturb()

    # -- when the run is over -----------------------------------------------------------------

    def formed(self) -> tuple[bool, bool]:
        """Every powered, eligible node released; and every server among them serving."""
        released = serving = True
        for m in self.machines:
            if not m.powered or not m.eligible:
                continue
            agent = m.agent
            if agent is None or agent.f.released is None:
                return False, False
            serving = serving and (m.k3s.serving or not agent.watching)
        return released, serving

    def _update_formed(self) -> None:
        released, serving = self.formed()
        if not released:
            self.released_at = None
        elif self.released_at is None:
            self.released_at = self.now
        if not serving:
            self.formed_at = None
        elif self.formed_at is None:
            self.formed_at = self.now

    def _check(self) -> None:
        self._update_formed()
        settled = self.formed_at is not None and self.now >= self.formed_at + TAIL
        given_up = self.now >= self.disturbed + LIVENESS_BOUND + CHECK_EVERY
        if self.pending == 0 and (settled or given_up):
            self._stopped = True
        else:
            self.at(self.now + CHECK_EVERY, self._check)
