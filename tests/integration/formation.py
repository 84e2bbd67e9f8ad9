"""A lab node as a Pi would run it: the agent, and k3s (the stand-in) gated on `agent gate`."""

from __future__ import annotations

import random
import time
from pathlib import Path

from tests.integration.helpers import PYTHON, Agent, node_env, wait_for
from tests.lab import Lab, Node
from tests.lab.k3s_standin import ca_of

TOKEN = "lab-token-0123456789"
# The k3s unit's ExecStartPre, then k3s itself: the stand-in runs only once the gate released;
# a node released as an agent runs it as `k3s agent` (in a real image: k3s-agent.service).
K3S_UNIT = (
    f"{PYTHON} -m agent gate --timeout 120 && "
    "if grep -q join-agent /run/sugarkube/gate-released; "
    f"then exec {PYTHON} -m tests.lab.k3s_standin --agent; "
    f"else exec {PYTHON} -m tests.lab.k3s_standin; fi"
)


class PiNode:
    """One node's agent and gated k3s stand-in, with their logs."""

    def __init__(self, node: Node, logs: Path, token: str = TOKEN, **env: str) -> None:
        self.node = node
        self.logs = logs
        self.env = {"SUGARKUBE_TOKEN": token, **env}
        self.agent: Agent | None = None
        self.k3s_log = logs / f"{node.ns}-k3s.log"

    def start(self) -> PiNode:
        self.agent = Agent(self.node, self.logs / f"{self.node.ns}-agent.log", env=self.env)
        self.k3s = self.node.spawn("sh", "-c", K3S_UNIT, log=self.k3s_log, env=node_env(**self.env))
        return self

    def released(self) -> dict[str, str] | None:
        assert self.agent is not None
        events = self.agent.events("gate_released")
        return events[0] if events else None

    def ca(self) -> str | None:
        """sha256 of the cluster CA this node's k3s belongs to (server or agent)."""
        return ca_of(self.node)

    def joined(self) -> bool:
        """The stand-in has finished joining (or bootstrapping)."""
        text = self.k3s_log.read_text(errors="replace") if self.k3s_log.exists() else ""
        return "event=serving" in text or "event=joined" in text


def form(lab: Lab, logs: Path, *, jitter: float, seed: int, **env: str) -> list[PiNode]:
    """Start every node of the lab within `jitter` s (random order), as powered-on Pis."""
    rng = random.Random(seed)
    delays = sorted(rng.uniform(0, jitter) for _ in lab.nodes)
    nodes = [PiNode(n, logs, **env) for n in lab.nodes]
    rng.shuffle(nodes)
    t0 = time.monotonic()
    for pi, delay in zip(nodes, delays, strict=True):
        time.sleep(max(0.0, t0 + delay - time.monotonic()))
        pi.start()
    return nodes


def wait_formed(nodes: list[PiNode], timeout: float) -> list[dict[str, str]]:
    """Wait until every node's gate released and its k3s joined; the release events."""
    def all_done() -> list[dict[str, str]] | None:
        released = [pi.released() for pi in nodes]
        if all(released) and all(pi.joined() for pi in nodes):
            return [r for r in released if r]
        return None

    try:
        return wait_for("every gate released and k3s joined", all_done, timeout)
    except AssertionError:
        for pi in nodes:
            assert pi.agent is not None
            print(f"--- {pi.node.ns} agent\n{pi.agent.tail(25)}")
            k3s = pi.k3s_log.read_text(errors="replace") if pi.k3s_log.exists() else ""
            print(f"--- {pi.node.ns} k3s\n{k3s[-1500:]}")
        raise
