"""`make bench`: run every figure on one lab and write bench/results/<date>.md."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

from bench import agent, discovery, formation, idle
from bench.stats import markdown
from tests.integration.helpers import Probe
from tests.lab import Lab

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    runs = int(os.environ.get("BENCH_N", "20"))
    figures = []
    with tempfile.TemporaryDirectory() as tmp, Lab(2, prefix="skb", subnet="10.254.0") as lab:
        # A stable advert for the discovery figures, published by our Publisher.
        publisher = Probe(lab.node(1), "publish_probe", discovery.K3S, stdin=True)
        publisher.send(name=discovery.TARGET, txt=["k3s=1", "cluster=sugar", "env=dev",
                                                   "role=candidate", "phase=discover"])
        figures += discovery.measure(lab, runs)
        publisher.close()
        figures += agent.measure(lab, max(3, runs // 4), Path(tmp))
    formation_runs = max(3, runs // 2)
    figures.append(formation.cold_formation(formation_runs))
    figures += formation.join_next_to_server(formation_runs)
    figures += formation.absence(formation_runs)
    figures += idle.measure(float(os.environ.get("BENCH_IDLE_S", "300")))
    today = datetime.date.today().isoformat()
    text = (
        f"# Benchmarks {today}\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        f", {platform.platform()}. Lab: 2 nodes, real avahi-daemon and dbus-daemon per node.\n\n"
        f"{markdown(figures)}\n"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{today}.md"
    out.write_text(text)
    sys.stdout.write(text)
    print(f"written: {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
