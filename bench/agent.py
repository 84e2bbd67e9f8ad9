"""The agent as a process: start to first advert, withdraw to removal seen, steady RSS.

The withdrawal is watched by two peers' browsers on node2 at once: ours and the stock
`avahi-browse -rp` that the replaced scripts used, so both see the same goodbye.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
import time
from pathlib import Path

from bench.stats import Figure
from tests.integration.helpers import Agent, Probe, unescape_browse
from tests.lab import Lab, Node

K3S = "_k3s-sugar-dev._tcp"
NODE1 = "k3s-sugar-dev@node1.local ("


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


class StockBrowse:
    """A long-running `avahi-browse -rp` in a node; its lines, timestamped as they arrive."""

    def __init__(self, node: Node, stype: str) -> None:
        self.proc = subprocess.Popen(node.enter_argv("avahi-browse", "-rp", stype),
                                     stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[tuple[float, list[str]]] = queue.Queue()
        out = self.proc.stdout
        assert out is not None
        threading.Thread(target=lambda: [self.lines.put((time.monotonic(), ln.split(";")))
                                         for ln in out], daemon=True).start()

    def removed_at(self, prefix: str, timeout: float) -> float:
        """When the next `-` line for a name starting with prefix arrived."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            at, fields = self.lines.get(timeout=remaining)
            if fields[0] == "-" and len(fields) > 3 and unescape_browse(fields[3]).startswith(
                    prefix):
                return at
        raise TimeoutError(f"avahi-browse saw no removal of {prefix!r} in {timeout:g} s")

    def drain(self) -> None:
        while not self.lines.empty():
            self.lines.get()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)


def measure(lab: Lab, runs: int, logs: Path) -> list[Figure]:
    """Per run: start node1's agent, time its advert on node2, read RSS, SIGTERM, time removal."""
    start_established: list[float] = []
    start_seen: list[float] = []
    withdraw_seen: list[float] = []
    withdraw_stock: list[float] = []
    rss: list[float] = []
    probe = Probe(lab.node(2), "browse_probe", K3S, str(runs * 30))
    stock = StockBrowse(lab.node(2), K3S)
    mine = lambda ln: str(ln.get("name", "")).startswith(NODE1)  # noqa: E731
    try:
        for i in range(runs):
            started = time.monotonic()
            agent = Agent(lab.node(1), logs / f"bench-agent{i}.log")
            agent.wait_event("advert_published", 20)  # polled every 50 ms
            start_established.append((time.monotonic() - started) * 1000)
            line = probe.expect(lambda ln: ln.get("kind") == "added" and mine(ln), 20)
            start_seen.append((line["t"] - started) * 1000)
            present = {line["name"]}
            time.sleep(3)  # settle, then read the resident size
            rss.append(_rss_kib(agent.proc.pid) / 1024)
            while not probe.lines.empty():  # renames since (the lone node elects itself)
                ln = probe.lines.get()
                if mine(ln) and ln["kind"] in ("added", "removed"):
                    (present.add if ln["kind"] == "added" else present.discard)(ln["name"])
            final = sorted(present)[-1]
            stock.drain()
            sent = time.monotonic()
            agent.proc.send_signal(signal.SIGTERM)
            while present:
                line = probe.expect(lambda ln: ln.get("kind") == "removed" and mine(ln), 10)
                present.discard(line["name"])
            withdraw_seen.append((line["t"] - sent) * 1000)
            withdraw_stock.append((stock.removed_at(final, 10) - sent) * 1000)
            agent.proc.wait(10)
            lab.node(1).run("sh", "-c", "rm -rf /run/sugarkube /etc/rancher/k3s/config.yaml.d")
    finally:
        probe.close()
        stock.close()
    return [
        Figure("agent start (process) -> advert seen by a peer", "ms", tuple(start_seen)),
        Figure("agent start (process) -> advert established (Avahi probing included)", "ms",
               tuple(start_established)),
        Figure("SIGTERM -> removal seen by a peer (floor: 1 s goodbye TTL)", "ms",
               tuple(withdraw_seen)),
        Figure("SIGTERM -> removal seen by a peer: avahi-browse -rp (same goodbye)", "ms",
               tuple(withdraw_stock)),
        Figure("agent steady RSS (no scapy)", "MiB", tuple(rss)),
    ]
