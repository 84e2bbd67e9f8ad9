"""`make bench-check`: a regression guard on ratios, not a timed test.

A fresh run measures the figures that have a reference in the same run (ours and the stock
tools', on the same lab at the same moment), so the machine's speed cancels out of each ratio
ours / reference. Each ratio is compared with the one of the newest committed results
(bench/results/<date>.json); it fails only if it worsened by more than a noise margin derived
from the recorded spread: twice the two series' relative half-ranges (p5..p95 around the
median) added in quadrature, and never under 10 %.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import agent, discovery
from bench.stats import Figure
from tests.integration.helpers import Probe
from tests.lab import Lab

RESULTS = Path(__file__).resolve().parent / "results"
MARGIN_FLOOR = 0.10
# (label, ours, reference): figure names as bench writes them.
RATIOS = (
    ("discovery, cold cache", "discovery, cold cache: our D-Bus browser",
     "discovery, cold cache: avahi-browse -rp"),
    ("discovery, warm cache", "discovery, warm cache: our D-Bus browser",
     "discovery, warm cache: avahi-browse -rp"),
    ("withdrawal seen by a peer", "SIGTERM -> removal seen by a peer (floor: 1 s goodbye TTL)",
     "SIGTERM -> removal seen by a peer: avahi-browse -rp (same goodbye)"),
)


def relative_spread(values: Sequence[float]) -> float:
    """Half the p5..p95 range, relative to the median (nearest rank)."""
    ordered = sorted(values)
    rank = lambda q: ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # noqa: E731
    median = Figure("", "", tuple(values)).median()
    return (rank(0.95) - rank(0.05)) / 2 / median if median else 0.0


def compare(committed: dict[str, Sequence[float]], fresh: dict[str, Sequence[float]]
            ) -> list[tuple[str, float, float, float, bool]]:
    """Per ratio: (label, committed ratio, fresh ratio, margin, within the margin)."""
    rows = []
    for label, ours, ref in RATIOS:
        if not (committed.get(ours) and committed.get(ref) and fresh.get(ours)
                and fresh.get(ref)):
            continue
        med = lambda v: Figure("", "", tuple(v)).median()  # noqa: E731
        before = med(committed[ours]) / med(committed[ref])
        now = med(fresh[ours]) / med(fresh[ref])
        margin = max(MARGIN_FLOOR, 2 * math.hypot(relative_spread(committed[ours]),
                                                  relative_spread(committed[ref])))
        rows.append((label, before, now, margin, now <= before * (1 + margin)))
    return rows


def newest_committed() -> tuple[Path, dict[str, Sequence[float]]]:
    for path in sorted(RESULTS.glob("*.json"), reverse=True):
        data = json.loads(path.read_text())
        return path, {f["name"]: f["values"] for f in data["figures"]}
    raise SystemExit("bench-check: no bench/results/*.json to compare with; run `make bench`")


def main() -> int:
    path, committed = newest_committed()
    runs = int(os.environ.get("BENCH_N", "10"))
    with tempfile.TemporaryDirectory() as tmp, Lab(2, prefix="skc", subnet="10.244.0") as lab:
        publisher = Probe(lab.node(1), "publish_probe", discovery.K3S, stdin=True)
        publisher.send(name=discovery.TARGET, txt=["k3s=1", "cluster=sugar", "env=dev",
                                                   "role=candidate", "phase=discover"])
        figures = discovery.measure(lab, runs)
        publisher.close()
        figures += agent.measure(lab, max(3, runs // 2), Path(tmp))
    fresh = {f.name: f.values for f in figures}
    rows = compare(committed, fresh)
    print(f"bench-check against {path.name} (N={runs}):")
    for label, before, now, margin, ok in rows:
        print(f"  {'ok  ' if ok else 'FAIL'} {label}: ours/reference {before:.2f} -> {now:.2f}"
              f" (allowed up to {before * (1 + margin):.2f}, margin {margin:.0%})")
    if len(rows) < len(RATIOS):
        print("bench-check: the committed results lack some reference figures; run `make bench`")
        return 1
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
