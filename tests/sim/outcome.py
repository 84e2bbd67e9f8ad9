"""What a run did, and the properties checked over it.

Safety, over the whole run:
- one cluster: at most one CA minted by cluster-init/single across all time. The election's
  guarantee holds with at most `servers` fresh eligible nodes (election.py, "Why one cluster");
  a re-flashed node that had promised its support counts as one more fresh node (its promise is
  gone with its disk). Beyond that bound a second CA is reported, not failed.
- at most `servers` nodes ever take a server's role (k3s took a server's state, or released as
  one this boot: a release whose power went before k3s took anything joins again, rule 8);
- no failed join: etcd never refuses a server's MemberAdd for a reason an ordering of the joins
  avoids (a second learner, a voter connected less than 5 s); refusals because a voter is down
  for good are reported apart (no order of joins avoids them);
- a node that cannot run k3s is never released.
Liveness: once the last disturbance is over (the last arrival, fault or heal), every powered,
eligible node is released within LIVENESS_BOUND (world.py; and, for the figures, every server
among them serves: "formed"), unless the run is excused: fewer than a quorum of eligible nodes
up with no cluster to join, a cluster whose etcd lost its quorum for good, or a node bound to a
bootstrapper that is gone (the price election.py names: it needs `wipe`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tests.sim.k3s import VOTER_DOWN
from tests.sim.schedule import Schedule

if TYPE_CHECKING:
    from tests.sim.world import World


@dataclass
class Outcome:
    schedule: Schedule
    trace: list[str] | None = None
    cas: list[tuple[float, int, str]] = field(default_factory=list)  # (t, node, ca) minted
    failed_joins: list[tuple[float, int, str]] = field(default_factory=list)  # (t, node, why)
    degraded_joins: list[tuple[float, int, str]] = field(default_factory=list)  # a voter down
    ineligible_released: list[int] = field(default_factory=list)
    ineligible_k3s: int = 0  # k3s starts on a node that cannot run it
    servers_max: int = 0
    fresh: set[tuple[int, int]] = field(default_factory=set)  # eligible nodes that ran fresh
    reflashes: int = 0
    promises_lost: int = 0
    events: Counter[str] = field(default_factory=Counter)
    end: float = 0.0
    disturbed: float = 0.0
    released_in: float | None = None  # s from the last disturbance to all released
    formed_in: float | None = None  # s from the last disturbance to all released and serving
    coexisting: int = 0  # CAs still on some disk at the end (1: one cluster, whatever was minted)
    excused: str = ""  # why liveness is not owed ("" owed)
    unreleased: list[int] = field(default_factory=list)

    def refused(self, t: float, node: int, ca: str, why: str) -> None:
        """etcd refused a server's MemberAdd."""
        entry = (round(t, 2), node, f"{ca}: {why}")
        (self.degraded_joins if why == VOTER_DOWN else self.failed_joins).append(entry)

    @property
    def fresh_nodes(self) -> int:
        """Fresh eligible nodes, a re-flashed one that had promised counted again."""
        return len({idx for idx, _ in self.fresh}) + self.promises_lost

    @property
    def guaranteed(self) -> bool:
        """The one-cluster guarantee's premise holds in this run."""
        return self.fresh_nodes <= self.schedule.servers

    @property
    def split_brain(self) -> bool:
        return len(self.cas) > 1

    def problems(self) -> list[str]:
        """Violated properties, one line each (beyond-the-bound split brains excluded)."""
        out = []
        if self.split_brain and self.guaranteed:
            out.append(f"two clusters with {self.fresh_nodes} fresh nodes: minted {self.cas}")
        if self.servers_max > self.schedule.servers:
            out.append(f"{self.servers_max} servers, {self.schedule.servers} wanted")
        if self.failed_joins:
            out.append(f"failed joins: {self.failed_joins}")
        if self.ineligible_released:
            out.append(f"released a node that cannot run k3s: {self.ineligible_released}")
        if self.liveness_failed:
            out.append(
                f"nodes {self.unreleased} not released {self.end - self.disturbed:.0f} s after "
                f"the last disturbance at {self.disturbed:.1f} s"
            )
        return out

    @property
    def liveness_failed(self) -> bool:
        return self.released_in is None and not self.excused


def finish(world: World) -> Outcome:
    """Close the run's books: liveness, and why it is excused if it is."""
    out = world.outcome
    out.end, out.disturbed = world.now, world.disturbed
    out.coexisting = len({m.disk.k3s_ca for m in world.machines if m.disk.k3s_ca})
    if world.formed_at is not None:
        out.formed_in = world.formed_at - world.disturbed
    if world.released_at is not None:
        out.released_in = world.released_at - world.disturbed
        return out
    out.unreleased = [
        m.idx for m in world.machines
        if m.powered and m.eligible and (m.agent is None or m.agent.f.released is None)
    ]
    out.excused = _excuse(world)
    return out


def _excuse(world: World) -> str:
    up = [m for m in world.machines if m.powered and m.eligible]
    live_keys = {m.key for m in up} | {m.disk.key for m in up}
    for ca, cluster in world.clusters.items():
        if any(m.k3s.serving for m in world.machines if m.disk.k3s_ca == ca):
            continue
        running = sum(
            1 for ident in cluster.voters
            if (m := world.member(ident)) is not None and m.powered and m.eligible
        )
        if running < len(cluster.voters) // 2 + 1:
            return f"cluster {ca} lost its etcd quorum"
    by_key = {m.disk.key: m for m in world.machines if m.disk.key}
    for m in up:
        if m.disk.released or not m.disk.bound:
            continue
        key, steps = m.disk.bound, 0
        while steps <= len(world.machines):
            if key not in live_keys:
                return f"n{m.idx} is bound to a bootstrapper that is gone"
            holder = by_key.get(key)
            if holder is None or holder.disk.bound in ("", key):
                break
            key, steps = holder.disk.bound, steps + 1
    if not world.clusters and len(up) < world.s.servers // 2 + 1:
        return "fewer than a quorum of eligible nodes up"
    return ""
