"""The lab's hostile host driven from a test or a benchmark (tests/lab/adversary.py runs it):
what it forged, saw and received, and the honest nodes' side of it."""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.integration.formation import PiNode, assert_one_cluster, wait_formed
from tests.integration.helpers import PYTHON, node_env, parse_event, wait_for
from tests.lab import Lab, Node

STYPE = "_k3s-sugar-dev._tcp"
FORGED = [f"k3s-sugar-dev@evil-{role}.local ({role})" for role in ("server", "bootstrap",
                                                                     "candidate")]  # fmt: skip
FORM_TIMEOUT = 120.0


class Adversary:
    """The lab's hostile host on one node; what it saw and received, from its files."""

    def __init__(self, node: Node, out: Path, *flags: str) -> None:
        self.out = out
        self.proc = node.spawn(
            PYTHON, "-m", "tests.lab.adversary", "--addr", node.addr, "--stype", STYPE,
            "--out", str(out), "--duration", "600", *flags,
            log=out.parent / "adversary.log", env=node_env(), stdin=subprocess.PIPE,
        )  # fmt: skip
        wait_for("the adversary ready", (out / "adversary.json").exists, 30)

    def counts(self) -> dict[str, int]:
        return json.loads((self.out / "adversary.json").read_text())

    def tokens(self) -> list[dict[str, str]]:
        """Every credential the fake 6443 received: each one a leaked token."""
        file = self.out / "tokens.jsonl"
        return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []

    def command(self, line: str) -> None:
        """`freeze` what it captured so far, or `replay` it."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def still_a_peer(pi: PiNode, prefix: str) -> bool:
    """Whether PI's agent holds a peer whose instance name starts with PREFIX (under Avahi's
    alternative name too, `... #2`): some such name's last peer event is no removal."""
    assert pi.agent is not None
    last: dict[str, str] = {}
    for line in pi.agent.text().splitlines():
        event = parse_event(line)
        if event.get("event", "").startswith("peer_") and event.get("name", "").startswith(prefix):
            last[event["name"]] = event["event"]
    return any(kind in ("peer_added", "peer_updated") for kind in last.values())


def ignored(pi: PiNode, reason: str) -> set[str]:
    """The instance names PI's agent ignored for REASON."""
    assert pi.agent is not None
    return {e["name"] for e in pi.agent.events("record_ignored") if e.get("reason") == reason}


def split_brains(pis: list[PiNode]) -> int:
    """How many of PIS raised the split-brain alarm."""
    return sum(bool(pi.agent is not None and pi.agent.events("split_brain")) for pi in pis)


@dataclass(frozen=True)
class Attacked:
    """Three honest nodes formed beside a forger: what happened."""

    formed_s: float
    forged: int  # forged adverts it sent (announced or in answers)
    ignored: int  # forged adverts the honest agents logged as unauthenticated
    tokens: int  # credentials its fake 6443 received
    split_brains: int


def form_beside_a_forger(lab: Lab, logs: Path) -> tuple[Attacked, Adversary, list[PiNode]]:
    """Nodes 1-3 of LAB form beside the forger on node 4, which also captures their adverts."""
    liar = Adversary(lab.node(4), logs / "adversary", "--forge", "--capture",
                     "k3s-sugar-dev@node")  # fmt: skip
    started = time.monotonic()
    pis = [PiNode(lab.node(i), logs).start() for i in (1, 2, 3)]
    wait_formed(pis, FORM_TIMEOUT)
    formed = time.monotonic() - started
    assert_one_cluster(pis, 3)
    outcome = Attacked(
        formed_s=formed, forged=liar.counts()["forged"],
        ignored=sum(len(set(FORGED) & ignored(pi, "unauthenticated")) for pi in pis),
        tokens=len(liar.tokens()), split_brains=split_brains(pis),
    )
    return outcome, liar, pis
