"""Summaries of repeated measurements: N, median, p95, min, max."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One measured quantity over N runs."""

    name: str
    unit: str
    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    def median(self) -> float:
        return statistics.median(self.values)

    def p95(self) -> float:
        """Nearest-rank 95th percentile."""
        ordered = sorted(self.values)
        return ordered[max(0, -(-95 * len(ordered) // 100) - 1)]


def markdown(figures: Sequence[Figure]) -> str:
    """A Markdown table of the figures."""
    rows = [
        "| figure | N | median | p95 | min | max | unit |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for f in figures:
        if not f.values:
            rows.append(f"| {f.name} | 0 | - | - | - | - | {f.unit} |")
            continue
        digits = 3 if max(abs(v) for v in f.values) < 1 else 1  # small values keep their size
        cells = [f.median(), f.p95(), min(f.values), max(f.values)]
        rows.append(
            f"| {f.name} | {f.n} | " + " | ".join(f"{c:.{digits}f}" for c in cells)
            + f" | {f.unit} |"
        )
    return "\n".join(rows)
