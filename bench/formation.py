"""Cluster formation figures: cold 3-node formation, a join next to a server, the gates."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from bench.stats import Figure
from tests.integration.formation import PiNode, form, wait_formed
from tests.integration.helpers import PYTHON, avahi_browse, node_env, unescape_browse
from tests.lab import Lab

K3S = "_k3s-sugar-dev._tcp"


def _lab(n: int, workdir: Path) -> Lab:
    return Lab(n, prefix="skf", subnet="10.247.0", workdir=workdir / "lab")


def cold_formation(runs: int) -> Figure:
    """ms from the first agent's start to all three gates released (starts within 2 s)."""
    values = []
    for i in range(runs):
        with tempfile.TemporaryDirectory() as tmp, _lab(3, Path(tmp)) as lab:
            nodes = form(lab, Path(tmp), jitter=2.0, seed=1000 + i)
            released = _release_times(nodes, 60)
            first = min(pi.agent.started_at for pi in nodes if pi.agent)
            values.append((max(released) - first) * 1000)
            wait_formed(nodes, 30)
    return Figure("3-node cold formation: first agent start -> all gates released", "ms",
                  tuple(values))


def _release_times(nodes: list[PiNode], timeout: float) -> list[float]:
    """When each node's gate_released line first appeared (polled every 20 ms)."""
    seen: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(nodes) and time.monotonic() < deadline:
        for i, pi in enumerate(nodes):
            if i not in seen and pi.released():
                seen[i] = time.monotonic()
        time.sleep(0.02)
    assert len(seen) == len(nodes), "not every gate released"
    return list(seen.values())


def join_next_to_server(runs: int) -> list[Figure]:
    """A fresh node next to a serving server: agent start -> gate released (join decision)."""
    in_process, whole = [], []
    with tempfile.TemporaryDirectory() as tmp, _lab(2, Path(tmp)) as lab:
        server = PiNode(lab.node(1), Path(tmp), SUGARKUBE_SERVERS="1").start()
        wait_formed([server], 30)
        for i in range(runs):
            logs = Path(tmp) / f"join{i}"
            logs.mkdir()
            joiner = PiNode(lab.node(2), logs, SUGARKUBE_SERVERS="1").start()
            (at,) = _release_times([joiner], 30)
            (released,) = wait_formed([joiner], 30)
            assert joiner.agent is not None
            in_process.append(float(released["ms_elapsed"]))
            whole.append((at - joiner.agent.started_at) * 1000)
            joiner.agent.stop()
            joiner.k3s.terminate()
            joiner.k3s.wait(10)
            lab.node(2).run(PYTHON, "-m", "agent", "wipe", "--yes", env=node_env(), timeout=60)
    return [
        Figure("join next to a running server: agent start -> gate released (in-process)",
               "ms", tuple(in_process)),
        Figure("join next to a running server: process start -> gate released", "ms",
               tuple(whole)),
    ]


def absence(runs: int) -> list[Figure]:
    """The double-absence gate on a quiet LAN, and a crashed server judged absent."""
    quiet, quiet_stock, crashed, avahi_still = [], [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp, _lab(2, Path(tmp)) as lab:
            node1, node2 = lab.node(1), lab.node(2)
            quiet.append(_absence_ms(node2, "node1.local"))
            # The replaced scripts' absence check: one cached `avahi-browse -rpt` that finds
            # nothing (it returns at Avahi's all-for-now, a second after its query starts).
            started = time.monotonic()
            assert not avahi_browse(node2, K3S)
            quiet_stock.append((time.monotonic() - started) * 1000)
            server = PiNode(node1, Path(tmp), SUGARKUBE_SERVERS="1").start()
            wait_formed([server], 30)
            assert server.agent is not None
            server.power_cut()
            killed = time.monotonic()
            _absence_ms(node2, "node1.local")
            crashed.append((time.monotonic() - killed) * 1000)  # incl. the probe's start-up
            listed = any("node1" in unescape_browse(r[3]) for r in avahi_browse(node2, K3S))
            avahi_still.append((time.monotonic() - killed) * 1000 if listed else 0.0)
    return [
        Figure("double-absence gate, nothing advertised (two live rounds >= 1 s apart)", "ms",
               tuple(quiet)),
        Figure("reference absence check, nothing advertised: one avahi-browse -rpt", "ms",
               tuple(quiet_stock)),
        Figure("crashed server (no goodbye) -> judged absent by the gate", "ms",
               tuple(crashed)),
        Figure("... at that moment Avahi's cache still lists it, for at least", "ms",
               tuple(avahi_still)),
    ]


def _absence_ms(node: object, host: str) -> float:
    done = node.run(  # type: ignore[attr-defined]
        PYTHON, "-m", "bench.absence_probe", K3S, host, node.addr,  # type: ignore[attr-defined]
        env=node_env(), timeout=60,
    )
    answer = json.loads(done.stdout)
    assert answer["code"] == 0, answer
    return float(answer["ms"])
