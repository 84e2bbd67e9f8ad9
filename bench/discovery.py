"""Discovery latency, cold and warm: our D-Bus browser and the stock `avahi-browse -rpt`.

Ours is timed inside the probe from the browser's start to the resolved record (the process's
own start-up is not counted); avahi-browse from its process start to its resolved `=` line
(its start-up, a few ms of C, is counted). Cold means the browsing node's avahi-daemon was just
restarted, so its cache is empty; warm is a second browse right after.
"""

from __future__ import annotations

import queue
import subprocess
import threading
import time

from bench.stats import Figure
from tests.integration.helpers import Probe, unescape_browse
from tests.lab import Lab, Node

K3S = "_k3s-sugar-dev._tcp"
TARGET = "k3s-sugar-dev@node1.local (candidate)"


def ours(node: Node) -> float:
    """ms from browse start to the target's resolved record."""
    probe = Probe(node, "browse_probe", K3S, "5")
    try:
        line = probe.expect(lambda ln: ln.get("kind") == "added" and ln["name"] == TARGET, 6)
        return float(line["ms"])
    finally:
        probe.close()


def stock(node: Node) -> float:
    """ms from avahi-browse's start to its resolved line for the target."""
    started = time.monotonic()
    proc = subprocess.Popen(
        node.enter_argv("avahi-browse", "-rp", K3S), stdout=subprocess.PIPE, text=True
    )
    lines: queue.Queue[tuple[float, str]] = queue.Queue()
    assert proc.stdout is not None
    out = proc.stdout
    threading.Thread(
        target=lambda: [lines.put((time.monotonic(), ln)) for ln in out], daemon=True
    ).start()
    try:
        while (remaining := started + 6 - time.monotonic()) > 0:
            try:
                at, line = lines.get(timeout=remaining)
            except queue.Empty:
                break
            fields = line.split(";")
            if fields[0] == "=" and len(fields) > 3 and unescape_browse(fields[3]) == TARGET:
                return (at - started) * 1000
        raise RuntimeError("avahi-browse did not resolve the target within 6 s")
    finally:
        proc.terminate()
        proc.wait(5)
        out.close()


def measure(lab: Lab, runs: int) -> list[Figure]:
    """Cold and warm discovery, ours and stock, interleaved so both see the same conditions."""
    browser = lab.node(2)
    values: dict[str, list[float]] = {k: [] for k in ("ours cold", "stock cold", "ours warm",
                                                       "stock warm")}
    for i in range(runs):
        order = (("ours", ours), ("stock", stock)) if i % 2 == 0 else (
            ("stock", stock), ("ours", ours))
        for label, fn in order:
            browser.restart_avahi()
            values[f"{label} cold"].append(fn(browser))
            values[f"{label} warm"].append(fn(browser))
    names = {
        "ours cold": "discovery, cold cache: our D-Bus browser",
        "stock cold": "discovery, cold cache: avahi-browse -rp",
        "ours warm": "discovery, warm cache: our D-Bus browser",
        "stock warm": "discovery, warm cache: avahi-browse -rp",
    }
    return [Figure(names[k], "ms", tuple(v)) for k, v in values.items()]
