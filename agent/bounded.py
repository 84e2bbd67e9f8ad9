"""Tables keyed by what the network sends (instance names, hosts, election keys) stay bounded.

Anyone on the LAN can advertise a new name every millisecond; a table that keeps one entry per
name for ever is memory an adversary fills at will. Each such table is a plain dict trimmed at
its insertion points, oldest entries first (dicts keep insertion order), and only entries its
owner says are `expendable`: what still decides something (a live advert, a hold not yet run
out) is never dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def trim(table: dict[K, V], limit: int, expendable: Callable[[K, V], bool] | None = None) -> None:
    """Past `limit` entries, drop the oldest expendable ones (all are, by default) until half
    remain: one pass per limit / 2 insertions, so trimming costs O(1) per insertion while fewer
    than half the entries are kept for being in use."""
    if len(table) <= limit:
        return
    keep = max(limit // 2, 1)  # the newest entry at least
    for key, value in list(table.items()):
        if len(table) <= keep:
            return
        if expendable is None or expendable(key, value):
            del table[key]


class Bounded(dict[K, V]):
    """A dict that trims itself (every entry expendable) when `[]=` or setdefault adds a key."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        trim(self, self.limit)

    def setdefault(self, key: K, default: V) -> V:
        """The value at `key`, after inserting `default` there if it had none."""
        if key not in self:
            self[key] = default
        return self[key]
