"""k3s on one node, and the etcd clusters, as strict as k3s is where formation depends on it.

- k3s.service (or k3s-agent.service) starts at boot and waits in the gate (ExecCondition) until
  the agent releases; it then runs what the drop-in and the disk say. Restart=always,
  RestartSec=5s: a k3s that exits is started again 5 s later.
- A node whose k3s cannot run (memory cgroup off) exits at once, every time.
- State on disk is started from (the drop-in's `server:` is then ignored, as k3s does).
- cluster-init / single mint a new CA about 1 s after start (on disk from then: a power cut
  before that mints nothing); etcd runs from then, the API serves after the start delay.
- A join needs its target to serve and be reachable; the CA it gets is the target's cluster CA
  (on disk at once). A server join is a MemberAdd as learner (a member, voter or learner, of
  the same node name from an earlier disk is removed first: real k3s refuses the join with
  "duplicate node name found" until the operator deletes the node, which the lab's power-cut
  scenario does and this model does at once). etcd 3.4 refuses it without a quorum
  (k3s exits on the timeout), with a learner already pending ("too many learner members in
  cluster"), or unless the member asked (the server joined) has been connected to every other
  voter for 5 s ("unhealthy cluster": etcdserver mayAddMember, isConnectedFullySince, with
  the strict reconfig check; a connection is as old as the younger of its two ends' etcd).
  A refused join is counted; k3s exits and starts again 5 s later. The leader's learner
  manager (a 15 s tick, k3s pkg/etcd) promotes a learner that caught up; the joiner serves
  only then. A learner down for 5 minutes is removed.
- A server serves while its etcd cluster has a quorum of voting members running.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.sim.machine import Machine

Ident = tuple[int, int]  # (machine, disk generation): a re-flashed disk is another member

RESTART = 5.0  # s: RestartSec=5s in the k3s units
ETCD_START = 1.0  # s from start to etcd running (and to the CA on disk for cluster-init)
CONTACT = (1.0, 3.0)  # s from start to the first request to the server joined
CATCH_UP = (2.0, 6.0)  # s a learner takes to catch up with the leader's log
LEARNER_TICK = 15.0  # s between learner-manager runs (k3s pkg/etcd)
LEARNER_STALL = 300.0  # s without progress before a learner is removed (k3s pkg/etcd)
HEALTH_INTERVAL = 5.0  # s every voter must have been connected before a MemberAdd (etcd 3.4)

TOO_MANY_LEARNERS = "too many learner members in cluster"
UNHEALTHY = "unhealthy cluster: a voter connected less than 5 s ago"
VOTER_DOWN = "unhealthy cluster: a voter is down"


@dataclass
class Cluster:
    ca: str
    single: bool
    voters: set[Ident]
    tick: float  # phase of the learner manager's tick
    learner: Ident | None = None
    learner_since: float = 0.0
    catch_up: float = 0.0
    progress_at: float = 0.0
    servers: set[Ident] = field(default_factory=set)  # every member that took a server's state


class K3s:
    """The k3s process of one machine."""

    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.w = machine.world
        self.state = "off"  # off | gated | starting | up
        self.inc = 0
        self.serving = False
        self.etcd_since: float | None = None  # this server's etcd runs since

    def boot(self) -> None:
        self.state = "gated"
        self.inc += 1

    def power_off(self) -> None:
        self._stop("off")

    def gate_released(self) -> None:
        if self.state == "gated":
            self._start()

    def etcd_running(self) -> bool:
        return self.etcd_since is not None

    def _stop(self, state: str) -> None:
        self.state, self.serving, self.etcd_since = state, False, None
        self.inc += 1
        self.w.recompute(self.m.disk.k3s_ca)

    def _exit(self) -> None:
        self._stop("gated")  # systemd starts it again; the gate passes at once
        self.w.at(self.w.now + RESTART, self._restart, self.inc)

    def _restart(self, inc: int) -> None:
        if inc == self.inc and self.state == "gated":
            self._start()

    def _start(self) -> None:
        self.inc += 1
        self.state, self.serving = "starting", False
        if not self.m.eligible:
            self.w.outcome.ineligible_k3s += 1
            self._exit()
            return
        w, disk, inc = self.w, self.m.disk, self.inc
        ready = w.now + w.uniform(*w.s.k3s)
        if disk.k3s_ca:
            w.at(w.now + ETCD_START, self._resume, inc, ready)
        elif disk.dropin in ("cluster-init", "single"):
            w.at(w.now + ETCD_START, self._mint, inc, ready)
        elif disk.dropin in ("join-server", "join-agent"):
            w.at(w.now + w.uniform(*CONTACT), self._contact, inc, ready)

    def _run(self, inc: int, ready: float, *, etcd: bool) -> None:
        if etcd:
            self.etcd_since = self.w.now
            self.m.disk.etcd_init = True
            self.w.recompute(self.m.disk.k3s_ca)
        self.w.at(max(ready, self.w.now), self._up, inc)

    def _up(self, inc: int) -> None:
        if inc == self.inc and self.state == "starting":
            self.state = "up"
            self.w.recompute(self.m.disk.k3s_ca)

    def _mint(self, inc: int, ready: float) -> None:
        if inc != self.inc:
            return
        disk = self.m.disk
        ca = self.w.mint(self.m, single=disk.dropin == "single")
        disk.k3s_ca, disk.k3s_role = ca, "server"
        self._run(inc, ready, etcd=True)

    def _resume(self, inc: int, ready: float) -> None:
        if inc != self.inc:
            return
        disk = self.m.disk
        cluster = self.w.clusters[disk.k3s_ca]
        me = self.m.ident
        if disk.k3s_role == "agent" or cluster.single:
            self._run(inc, ready, etcd=False)
        elif me in cluster.voters or me == cluster.learner:
            self._run(inc, ready, etcd=True)
        else:
            self._join_etcd(inc, ready, cluster)  # a join that was refused: ask again

    def _contact(self, inc: int, ready: float) -> None:
        if inc != self.inc:
            return
        disk, w = self.m.disk, self.w
        target = w.machines[disk.target] if disk.target is not None else None
        me = self.m.idx
        if target is None or not target.k3s.serving or not (
            w.reach(me, target.idx) and w.reach(target.idx, me)
        ):
            w.at(w.now + RESTART, self._contact, inc, ready)  # "failed to get CA certs": again
            return
        disk.k3s_ca = target.disk.k3s_ca
        if disk.dropin == "join-agent":
            disk.k3s_role = "agent"
            self._run(inc, ready, etcd=False)
            return
        disk.k3s_role = "server"
        self._join_etcd(inc, ready, w.clusters[disk.k3s_ca])

    def _join_etcd(self, inc: int, ready: float, cluster: Cluster) -> None:
        w, me = self.w, self.m.ident
        cluster.servers.add(me)
        w.count_servers()
        if cluster.single:
            self._run(inc, ready, etcd=False)
            return
        old = {v for v in cluster.voters if v[0] == me[0] and v != me}
        if old and w.quorum(cluster):
            cluster.voters -= old  # k3s removes the member its node name had before
            w.recompute(cluster.ca)
        if cluster.learner is not None and cluster.learner[0] == me[0] and w.quorum(cluster):
            cluster.learner = None  # a learner of that name too (a node re-flashed mid-join)
        if not w.quorum(cluster):
            self._exit()  # MemberAdd times out without a quorum; k3s exits
            return
        refusal = self._refusal(cluster)
        if refusal:
            w.outcome.refused(w.now, self.m.idx, cluster.ca, refusal)
            w.trace(self.m, f"etcd: {refusal}: k3s exits")
            self._exit()
            return
        cluster.learner, cluster.learner_since = me, w.now
        cluster.catch_up, cluster.progress_at = w.uniform(*CATCH_UP), w.now
        w.schedule_tick(cluster)
        self._run(inc, ready, etcd=True)

    def _refusal(self, cluster: Cluster) -> str:
        if cluster.learner is not None and cluster.learner != self.m.ident:
            return TOO_MANY_LEARNERS
        disk = self.m.disk
        asked = self.w.machines[disk.target] if disk.target is not None else None
        if asked is None or asked.k3s.etcd_since is None:
            return VOTER_DOWN
        for ident in cluster.voters:
            m = self.w.member(ident)
            if m is asked:
                continue
            since = m.k3s.etcd_since if m is not None else None
            if since is None:
                return VOTER_DOWN
            if self.w.now - max(since, asked.k3s.etcd_since) < HEALTH_INTERVAL:
                return UNHEALTHY
        return ""
