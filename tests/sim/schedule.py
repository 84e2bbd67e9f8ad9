"""A simulated run, described compactly: who arrives when, and the faults, as plain values.

A Schedule's repr is valid Python, so a counterexample hypothesis prints can be pasted into
tests/sim/test_regressions.py as it is.

Fault times are absolute (simulated seconds) or, with `after=`, count from the moment something
happened to the fault's subject: its advert established ("publish"), it stood ("stand", its
Bind to itself), its first Bind of any kind ("bind"), its release ("release") or its k3s serving
("serve"). A subject is a node index, or BOOT (the bootstrapper: the first node to stand,
release cluster-init, or serve as one; resolved when the fault fires) or LOW (the node with the
lowest election key among those running an agent at that moment).
"""

from __future__ import annotations

from dataclasses import dataclass

BOOT = -1
LOW = -2

TRIGGERS = ("", "publish", "stand", "bind", "release", "serve")


@dataclass(frozen=True)
class PowerCut:
    """Every node loses power at `at`; power returns `off` s later, each node then boots in
    0-15 s (the schedule's seed decides); `reflash` comes back with an empty disk and a new key."""

    at: float
    off: float = 10.0
    reflash: int | None = None
    after: str = ""
    who: int = BOOT  # whose `after` event `at` counts from


@dataclass(frozen=True)
class Power:
    """One node loses power (no goodbye: a power cut, SIGKILL of everything); back `off` s
    later, None: never."""

    node: int
    at: float
    off: float | None = None
    after: str = ""


@dataclass(frozen=True)
class AgentRestart:
    """The agent stops (SIGTERM: it withdraws its adverts; crash: Avahi frees them, goodbyes
    all the same) and is running again `off` s later; k3s keeps running."""

    node: int
    at: float
    off: float = 1.0
    after: str = ""


@dataclass(frozen=True)
class AvahiRestart:
    """avahi-daemon stops (crash: no goodbyes) and is back `off` s later with an empty cache."""

    node: int
    at: float
    off: float = 3.0
    crash: bool = False
    after: str = ""


@dataclass(frozen=True)
class Partition:
    """From `at` for `heal` s, no packet crosses between the groups (nodes left out of every
    group are with the first); with one group of two nodes it cuts one pair only
    (visibility that is not transitive). `oneway`: only from the first group to the others."""

    groups: tuple[tuple[int, ...], ...]
    at: float = 0.0
    heal: float = 30.0
    oneway: bool = False
    after: str = ""
    who: int = BOOT


Fault = PowerCut | Power | AgentRestart | AvahiRestart | Partition


@dataclass(frozen=True)
class Schedule:
    """One run: node i's agent first starts at starts[i] (None: the node never arrives)."""

    starts: tuple[float | None, ...]
    servers: int = 3
    loss: float = 0.0  # per packet, each receiver independently
    k3s: tuple[float, float] = (2.0, 5.0)  # s from k3s start to serving (a Pi: 20-60 s)
    ineligible: tuple[int, ...] = ()  # nodes whose k3s cannot run (memory cgroup off)
    faults: tuple[Fault, ...] = ()
    seed: int = 0  # packet loss, delays, boot spread, keys
    ranks: tuple[int, ...] = ()  # election key order per node (0 lowest); () keys from seed

    @property
    def n(self) -> int:
        return len(self.starts)

    def labels(self) -> list[str]:
        """Scenario names, for the figures."""
        names = {type(f).__name__ for f in self.faults}
        out = sorted(names)
        if any(isinstance(f, PowerCut) and f.reflash is not None for f in self.faults):
            out.append("Reflash")
        if any(isinstance(f, Partition) and f.at == 0.0 and not f.after for f in self.faults):
            out.append("PartitionAtPowerOn")
        if None in self.starts:
            out.append("NeverArrives")
        if self.ineligible:
            out.append("Ineligible")
        if self.loss >= 0.2:
            out.append("HeavyLoss")
        if self.k3s[0] >= 20:
            out.append("SlowK3s")
        if not self.faults and None not in self.starts and not self.ineligible:
            out.append("NoFault")
        return out
