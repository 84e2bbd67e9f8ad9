"""The half that both publishers share: what is wanted, and waiting until it is so.

agent/avahi/publisher.py (an Avahi entry group over D-Bus) and agent/mdns/fallback.py (a static
service file) are reconcile loops: set() records the wish and wakes the loop, the loop makes the
world match it and marks it synced. Only the loop differs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from agent import const
from agent.mdns.records import Advertisement


class WantedAdvert:
    """The wanted Advertisement (or None), the loop's wake-up, and the synced/established flags."""

    def __init__(self) -> None:
        self._wanted: Advertisement | None = None
        self._name = ""  # the name in use: the wanted one, or Avahi's alternative after collisions
        self._kick = asyncio.Event()
        self._synced = asyncio.Event()
        self.established = asyncio.Event()  # the advert is on the wire, as Avahi or a round says
        self.on_established: Callable[[str], None] | None = None  # called with the name
        self.on_lost: Callable[[], None] | None = None  # the advert left the wire

    def _lost(self) -> None:
        """The advert is no longer established: say so once."""
        if self.established.is_set():
            self.established.clear()
            if self.on_lost is not None:
                self.on_lost()

    @property
    def name(self) -> str:
        """The instance name in use (an alternative name after a collision)."""
        return self._name

    def set(self, advert: Advertisement | None) -> None:
        """Want advert published (None: withdrawn); the run() loop makes it so."""
        if advert == self._wanted:
            return
        if advert is None or self._wanted is None or advert.name != self._wanted.name:
            self._name = advert.name if advert is not None else ""
        self._wanted = advert
        self._synced.clear()
        self._kick.set()

    async def settled(self, timeout: float) -> bool:
        """True once what was last set() is in place (not necessarily established yet)."""
        try:
            async with asyncio.timeout(timeout):
                await self._synced.wait()
        except TimeoutError:
            return False
        return True

    async def withdraw(self, timeout: float = const.SHUTDOWN_GRACE) -> bool:
        """Withdraw the advert (Avahi sends goodbyes); True once done within timeout."""
        self.set(None)
        return await self.settled(timeout)
