"""`make demo`: three lab Pis form one k3s cluster by themselves, explaining each step.

Each node runs the agent and k3s (the lab's stand-in, with a real etcd per server: tests/lab/k3s/)
gated on `sugarkube-agent gate`, as the image's units do. The agents' and k3s's events interleave
as the nodes vote, one stands, releases `cluster-init`, and the others join it in turn; at the
end etcd's member list and each node's `sugarkube-agent status`. Exit 0 when etcd holds one
cluster of three voters.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.integration.formation import PiNode, etcd_status
from tests.integration.helpers import PYTHON, node_env, parse_event
from tests.lab.lab import Lab

NODES = 3
SERVE_DELAY = 8.0  # s from k3s's start to serving: short for a demo (a Pi: 20-60 s)
DEADLINE = 180.0  # s: the demo never waits longer than this for the cluster
AGENT_SHOWN = ("started", "phase", "election_won", "bound", "bootstrap_yielded",
               "wire_proof_passed", "join_refused", "join_stalled", "not_standing",
               "gate_released", "k3s_serving", "crashed")  # fmt: skip
K3S_SHOWN = ("bootstrapped", "join_request", "learner_added", "promoted", "joined", "restarted",
             "serving", "refused", "failed")  # fmt: skip


class _Tail:
    """The complete lines a log gained since the last look."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new_lines(self) -> list[str]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return complete.decode(errors="replace").splitlines()


def _show(name: str, tail: _Tail, shown: tuple[str, ...], source: str) -> None:
    for line in tail.new_lines():
        if parse_event(line).get("event") in shown:
            text = line.split(">", 1)[1] if line.startswith("<") else line
            print(f"{name} {source:5} | {text.removeprefix('k3s-standin ')}")


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 when etcd holds one cluster of three voters."""
    with tempfile.TemporaryDirectory() as tmp, Lab(NODES, prefix=args.prefix,
                                                    subnet=args.subnet) as lab:
        logs = Path(tmp)
        print(f"lab up: {NODES} nodes, each with its own avahi-daemon, dbus-daemon, agent and "
              f"k3s (serves {SERVE_DELAY:g} s after it starts)\n")  # fmt: skip
        pis = [PiNode(node, logs, serve_delay=SERVE_DELAY) for node in lab.nodes]
        tails = [(_Tail(pi.agent_log), _Tail(pi.k3s_log)) for pi in pis]
        for pi in pis:
            pi.start()
            time.sleep(0.5)  # staggered, as Pis boot
        started = time.monotonic()
        deadline = started + DEADLINE
        formed = False
        while time.monotonic() < deadline and not formed:
            for pi, (agent_tail, k3s_tail) in zip(pis, tails, strict=True):
                _show(pi.node.name, agent_tail, AGENT_SHOWN, "agent")
                _show(pi.node.name, k3s_tail, K3S_SHOWN, "k3s")
            formed = all(  # every gate released, every k3s serving, every agent aware of it
                pi.released() and pi.joined() and pi.agent and pi.agent.events("k3s_serving")
                for pi in pis
            )
            time.sleep(0.2)
        elapsed = time.monotonic() - started
        print(f"\n{'formed' if formed else 'NOT formed'} after {elapsed:.0f} s")
        status = etcd_status(lab.node(1))
        one_cluster = False
        if status is not None:
            cluster_id, members = status
            voters = [name for name, learner in members.items() if not learner]
            print(f"\netcd on node1: cluster {cluster_id:x}, {len(voters)} voters: "
                  f"{', '.join(sorted(members))}")  # fmt: skip
            views = [etcd_status(pi.node) for pi in pis]
            one_cluster = all(view == status for view in views) and len(voters) == NODES
        for pi in pis:
            done = pi.node.run(PYTHON, "-m", "agent", "status", env=node_env(**pi.env))
            print(f"\nsugarkube-agent status on {pi.node.name}:\n{done.stdout.rstrip()}")
        for pi in pis:
            pi.power_cut()
        print("\nlab down")
    return 0 if formed and one_cluster else 1
