"""The fault suite's table: each scenario of tests/integration/faults.py, R rounds on the lab.

Per scenario: rounds run, split brains (more than one cluster-init, CA or etcd cluster ID), rounds
that did not form within the scenario's bound, joins k3s refused, and the time from the end of
the last fault to every node formed with etcd agreeing (median, p95).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.stats import Figure
from tests.integration.faults import SCENARIOS, Outcome
from tests.lab import Lab


def _round(name: str) -> Outcome | str:
    """One round of a scenario in a fresh lab: its Outcome, or why it did not form."""
    with tempfile.TemporaryDirectory() as tmp, Lab(
        3, prefix="skq", subnet="10.246.0", workdir=Path(tmp) / "lab"
    ) as lab:
        try:
            return SCENARIOS[name](lab, Path(tmp))
        except AssertionError as exc:  # a wait that timed out, or etcd disagreeing
            return str(exc).splitlines()[0][:160]


def measure(rounds: int) -> tuple[list[Figure], str]:
    """(a time-to-formed figure per scenario, the suite's Markdown table)."""
    figures, rows = [], [
        "| scenario | rounds | split brains | not formed | refused joins | formed median s | p95 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in SCENARIOS:
        results = [_round(name) for _ in range(rounds)]
        done = [r for r in results if isinstance(r, Outcome)]
        failures = [r for r in results if isinstance(r, str)]
        figure = Figure(f"fault {name}: last fault -> formed", "s",
                        tuple(r.formed_s for r in done))  # fmt: skip
        figures.append(figure)
        timing = (f"{figure.median():.1f} | {figure.p95():.1f}" if done else "- | -")
        rows.append(
            f"| {name} | {rounds} | {sum(r.split_brain for r in done)} | {len(failures)} | "
            f"{sum(r.failed_joins for r in done)} | {timing} |"
        )
        rows += [f"|   ({name}: {reason}) | | | | | | |" for reason in dict.fromkeys(failures)]
    return figures, "\n".join(rows)
