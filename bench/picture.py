"""bench/results/<date>.png: discovery latency ours vs the stock tools, and the scale curves.

matplotlib from Debian's python3-matplotlib, drawn off-screen (Agg).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

DISCOVERY = (
    ("cold cache", "discovery, cold cache: our D-Bus browser",
     "discovery, cold cache: avahi-browse -rp"),
    ("warm cache", "discovery, warm cache: our D-Bus browser",
     "discovery, warm cache: avahi-browse -rp"),
)
# The scale curves: (title, value of one raw row of bench/scale.py), one point per lab size.
SCALE: tuple[tuple[str, Callable[[Mapping[str, Any]], float]], ...] = (
    ("cold browse -> all N adverts resolved (ms, median)",
     lambda row: statistics.median(r["cold"]["all_ms"] for r in row["discovery"]
                                   if r["cold"]["all_ms"] is not None)),
    ("steady agent CPU, median over nodes (%)",
     lambda row: statistics.median(row["agent_cpu_pct"])),
    ("steady agent RSS, median over nodes (MiB)",
     lambda row: statistics.median(row["agent_rss_mib"])),
    ("steady mDNS packets/s on the LAN", lambda row: row["pkts_per_s"]),
)


def draw(figures: Mapping[str, Sequence[float]], scale: Sequence[Mapping[str, Any]],
         out: Path) -> Path:
    """Write the picture; figures: name -> values; scale: bench/scale.py's raw rows."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    scale = [row for row in scale if "error" not in row and "skipped" not in row]
    panels = len(DISCOVERY) + (len(SCALE) if scale else 0)
    cols = 3
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, (title, ours, ref) in zip(flat, DISCOVERY, strict=False):
        data = [list(figures.get(ours, ())), list(figures.get(ref, ()))]
        ax.boxplot(data, labels=["ours (D-Bus browser)", "avahi-browse -rp"], showfliers=True)
        for i, values in enumerate(data, start=1):
            ax.plot([i] * len(values), values, "o", alpha=0.35, markersize=3)
        ax.set_title(f"discovery, {title} (N={len(data[0])} each)")
        ax.set_ylabel("ms")
    used = len(DISCOVERY)
    if scale:
        sizes = [row["n"] for row in scale]
        for ax, (label, value) in zip(flat[used:], SCALE, strict=False):
            ax.plot(sizes, [value(row) for row in scale], "o-")
            ax.set_xlabel("lab nodes, all advertising")
            ax.set_title(label)
            ax.set_xticks(sizes)
        used += len(SCALE)
    for ax in flat[used:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
