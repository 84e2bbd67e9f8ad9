"""`make demo`: three lab nodes run the agent; their logs interleave as they find each other."""

from __future__ import annotations

import argparse
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.lab.lab import Lab

ROOT = Path(__file__).resolve().parents[2]
NODES = 3
DEADLINE = 60.0  # s: the demo never runs longer than this
SHOWN = ("started", "advert_published", "peer_added", "peer_updated", "peer_removed", "phase",
         "election_won", "gate_released", "k3s_serving", "stopped", "crashed")


def _env() -> dict[str, str]:
    return {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(ROOT),
        "SUGARKUBE_CLUSTER": "sugar", "SUGARKUBE_ENV": "dev", "SUGARKUBE_TOKEN": "demo-token-1234",
    }


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every node saw every other node."""
    with tempfile.TemporaryDirectory() as tmp, Lab(NODES, prefix=args.prefix,
                                                    subnet=args.subnet) as lab:
        logs = [Path(tmp) / f"node{i}.log" for i in range(1, NODES + 1)]
        offsets = [0] * NODES
        print(f"lab up: {NODES} nodes, each with its own avahi-daemon and dbus-daemon\n")
        agents = []
        for i, node in enumerate(lab.nodes):
            agents.append(node.spawn("/usr/bin/python3", "-m", "agent", "run", log=logs[i],
                                     env=_env()))
            time.sleep(0.5)  # staggered, as Pis boot
        seen: list[set[str]] = [set() for _ in range(NODES)]
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline and not all(len(s) >= NODES for s in seen):
            for i in range(NODES):
                offsets[i] = _show(i, logs[i], offsets[i], seen[i])
            time.sleep(0.1)
        converged = all(len(s) >= NODES for s in seen)
        print(f"\n{'converged' if converged else 'did NOT converge'}: every node's peer table")
        for i in range(NODES):
            print(f"  node{i + 1}: {', '.join(sorted(seen[i]))}")
        done = lab.node(1).run("/usr/bin/python3", "-m", "agent", "discover", "--timeout", "3",
                               env=_env())
        print(f"\nsugarkube-agent discover on node1 (exit {done.returncode}):\n{done.stdout}")
        for agent in agents:
            agent.send_signal(signal.SIGTERM)
        for agent in agents:
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
        for i in range(NODES):
            _show(i, logs[i], offsets[i], seen[i])
        print("\nlab down")
    return 0 if converged else 1


def _show(i: int, log: Path, offset: int, seen: set[str]) -> int:
    if not log.exists():
        return offset
    with log.open("rb") as f:
        f.seek(offset)
        data = f.read()
    complete = data[: data.rfind(b"\n") + 1]
    for raw in complete.decode(errors="replace").splitlines():
        line = raw.split(">", 1)[1] if raw.startswith("<") else raw
        event = line.split(" ", 1)[0].removeprefix("event=")
        if event in SHOWN:
            print(f"node{i + 1} | {line}")
        if event == "peer_added" and "name=" in line:
            seen.add(line.split("host=", 1)[1].split(" ", 1)[0] if "host=" in line else "?")
    return offset + len(complete)


