"""The double-absence gate, pure: live-round results and `now` in, a verdict out.

Absence counts only when observed in two consecutive live rounds at least ABSENCE_ROUND_GAP
apart, with no presence in between (DESIGN.md §A "Gates"). A live round asks the wire, not a cache:
Avahi keeps a dead node's PTR record for up to 75 minutes (RFC 6762 §10), so an empty browser is
not evidence, and a full one is not either.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent import const


@dataclass
class AbsenceGate:
    """Counts consecutive absent rounds; any presence starts the count again."""

    rounds_needed: int = const.ABSENCE_ROUNDS
    min_gap: float = const.ABSENCE_ROUND_GAP  # s between the starts of counted rounds
    absent_rounds: int = 0
    _last_counted: float | None = None  # start time of the last counted absent round

    def observe(self, started: float, present: bool) -> None:
        """Record a round that started at `started` (monotonic s) and what it saw."""
        if present:
            self.absent_rounds = 0
            self._last_counted = None
            return
        if self._last_counted is not None and started - self._last_counted < self.min_gap:
            return  # too close to the previous one to count as another observation
        self.absent_rounds += 1
        self._last_counted = started

    @property
    def passed(self) -> bool:
        """True once absence was observed in enough consecutive, spaced rounds."""
        return self.absent_rounds >= self.rounds_needed

    def next_round_at(self) -> float | None:
        """Earliest start of the next round that can count (None: any time)."""
        return None if self._last_counted is None else self._last_counted + self.min_gap

    def reset(self) -> None:
        """Forget every observation."""
        self.absent_rounds = 0
        self._last_counted = None
