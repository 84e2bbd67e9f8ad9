"""`make bench`: run every figure on one lab and write bench/results/<date>.md."""

from __future__ import annotations

import datetime
import os
import platform
import sys
import tempfile
from pathlib import Path

from bench import agent, discovery
from bench.stats import markdown
from tests.lab import Lab

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    runs = int(os.environ.get("BENCH_N", "20"))
    figures = []
    with tempfile.TemporaryDirectory() as tmp, Lab(2, prefix="skb", subnet="10.254.0") as lab:
        # A publisher for the discovery figures: node1's agent itself.
        publisher = agent.Agent(lab.node(1), Path(tmp) / "publisher.log")
        publisher.wait_event("advert_published", 20)
        figures += discovery.measure(lab, runs)
        publisher.stop()
        figures += agent.measure(lab, max(3, runs // 4), Path(tmp))
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
