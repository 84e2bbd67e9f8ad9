"""One Raspberry Pi of the simulated LAN: what survives a power cut, and what runs on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from tests.sim.agent import Agent
from tests.sim.avahi import Avahi
from tests.sim.k3s import Ident, K3s

if TYPE_CHECKING:
    from tests.sim.world import World

AGENT_AFTER_AVAHI = 0.5  # s: the agent unit is ordered after avahi-daemon


@dataclass
class Disk:
    """What survives a power cut: the ballot, the k3s drop-in and k3s's own state."""

    gen: int = 0  # bumped by a re-flash
    key: str = ""
    bound: str = ""
    bound_host: str = ""
    released: str = ""
    dropin: str = ""
    target: int | None = None
    k3s_ca: str = ""
    k3s_role: str = ""
    etcd_init: bool = False  # k3s's etcd started from this disk (server/db/etcd/member/wal)


class Machine:
    """One Raspberry Pi: power, disk, /run, avahi-daemon, the agent and k3s."""

    def __init__(self, world: World, idx: int, key: str, eligible: bool) -> None:
        self.world, self.idx, self.host = world, idx, f"n{idx}.local"
        self.eligible = eligible
        self.disk = Disk()
        self.marker = ""  # /run/sugarkube/gate-released: tmpfs
        self.powered = False
        self.arrived = False
        self.boots = 0
        self.next_key = key  # the key a fresh ballot gets (then new ones at each restart)
        self.avahi = Avahi(self)
        self.k3s = K3s(self)
        self.agent: Agent | None = None

    @property
    def ident(self) -> Ident:
        return (self.idx, self.disk.gen)

    @property
    def key(self) -> str:
        return self.agent.f.key if self.agent is not None else self.disk.key

    def take_key(self) -> str:
        key, self.next_key = self.next_key, ""
        return key or self.world.new_key()

    def boot(self) -> None:
        self.powered, self.marker = True, ""
        self.boots += 1
        self.avahi.start()
        self.k3s.boot()
        self.world.at(self.world.now + AGENT_AFTER_AVAHI, self.start_agent, self.boots)

    def power_off(self) -> None:
        if not self.powered:
            return
        self.powered, self.marker = False, ""
        self.boots += 1
        if self.agent is not None:
            self.agent.alive = False
            self.agent = None
        self.avahi.stop(goodbye=False)
        self.k3s.power_off()

    def start_agent(self, boots: int) -> None:
        if boots == self.boots and self.powered and self.agent is None:
            self.agent = Agent(self)
            self.world.agent_started(self)
            self.agent.start()

    def stop_agent(self) -> None:
        if self.agent is not None:
            agent, self.agent = self.agent, None
            agent.stop()
