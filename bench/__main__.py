"""`make bench`: run every figure on the lab; write bench/results/<date>.md, .json and .png.

The JSON keeps every value, for `make bench-check` (bench/check.py) to compare ratios with.
BENCH_N sets the repetitions (20), BENCH_FAULT_ROUNDS the rounds of each fault scenario (3; 0:
skipped), BENCH_ADVERSARY_ROUNDS the rounds beside the lab's forger (3; 0: skipped),
BENCH_IDLE_S the idle window (300 s), BENCH_SCALE the lab
sizes of the scale figures ("3,10,25"; empty: skipped; 50 nodes did not converge on a 2-core
machine: 51 avahi-daemons and agents starting at once starve it, see bench/scale.py).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import adversary, agent, discovery, faults, formation, idle, picture
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
    fault_rounds = int(os.environ.get("BENCH_FAULT_ROUNDS", "3"))
    fault_table = ""
    if fault_rounds > 0:
        fault_figures, fault_table = faults.measure(fault_rounds)
        figures += fault_figures
    attack_rounds = int(os.environ.get("BENCH_ADVERSARY_ROUNDS", "3"))
    attack_table = ""
    if attack_rounds > 0:
        attack_figures, attack_table = adversary.measure(attack_rounds)
        figures += attack_figures
    figures += idle.measure(float(os.environ.get("BENCH_IDLE_S", "300")))
    sizes = [int(n) for n in os.environ.get("BENCH_SCALE", "3,10,25").split(",") if n]
    scale_rows: list[dict[str, Any]] = []
    if sizes:
        from bench import scale

        scale_figures, scale_rows = scale.measure(sizes)
        figures += scale_figures
    today = datetime.date.today().isoformat()
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python "
               f"{platform.python_version()}, {platform.platform()}")
    text = (
        f"# Benchmarks {today}\n\n"
        f"Machine: {machine}. Lab: real avahi-daemon and dbus-daemon per node.\n\n"
        f"{markdown(figures)}\n"
        + (f"\n## Fault suite (tests/integration/faults.py)\n\n{fault_table}\n" if fault_table
           else "")
        + (f"\n## A forger on the LAN (tests/integration/hostile.py)\n\n{attack_table}\n"
           if attack_table else "")
        + "".join(f"\nScale N={row['n']}: {row.get('error') or row['skipped']}\n"
                  for row in scale_rows if "error" in row or "skipped" in row)
        + f"\n![discovery and scale]({today}.png)\n"
    )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{today}.md"
    out.write_text(text)
    (RESULTS / f"{today}.json").write_text(json.dumps({
        "date": today, "machine": machine,
        "figures": [{"name": f.name, "unit": f.unit, "values": list(f.values)} for f in figures],
        "scale": scale_rows,
    }, indent=1, default=str) + "\n")
    picture.draw({f.name: f.values for f in figures}, scale_rows, RESULTS / f"{today}.png")
    sys.stdout.write(text)
    print(f"written: {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
