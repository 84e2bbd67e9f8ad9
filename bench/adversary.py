"""Issue 12's figures: rounds of three honest lab nodes forming beside the lab's forger
(tests/integration/hostile.py): adverts forged, ignored, tokens leaked, split brains, and the
formation time under attack."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.stats import Figure
from tests.integration.hostile import Attacked, form_beside_a_forger
from tests.lab import Lab


def _round() -> Attacked | str:
    with tempfile.TemporaryDirectory() as tmp, Lab(
        4, prefix="skh", subnet="10.245.0", workdir=Path(tmp) / "lab"
    ) as lab:
        try:
            return form_beside_a_forger(lab, Path(tmp))[0]
        except AssertionError as exc:  # did not form, or etcd disagreeing
            return str(exc).splitlines()[0][:160]


def measure(rounds: int) -> tuple[list[Figure], str]:
    """(the formation time beside the forger, the attack's Markdown table)."""
    results = [_round() for _ in range(rounds)]
    done = [r for r in results if isinstance(r, Attacked)]
    failures = [r for r in results if isinstance(r, str)]
    figure = Figure("3-node formation beside a forger", "s", tuple(r.formed_s for r in done))
    rows = [
        "| rounds | not formed | adverts forged | forged adverts ignored | tokens leaked | "
        "split brains |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {rounds} | {len(failures)} | {sum(r.forged for r in done)} | "
        f"{sum(r.ignored for r in done)} | {sum(r.tokens for r in done)} | "
        f"{sum(r.split_brains for r in done)} |",
        *(f"|   ({reason}) | | | | | |" for reason in dict.fromkeys(failures)),
    ]
    return [figure] if done else [], "\n".join(rows)
