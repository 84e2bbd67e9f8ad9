"""Publishing this node's advert: one Avahi entry group, kept equal to what is wanted.

The publisher is a reconcile loop. Callers say what they want published (`set()`); every event
(a new wish, avahi-daemon leaving or coming back, its server state, our group's state) only
wakes the loop, which then makes the daemon's state match the wish. One mechanism thus covers the
first publish, in-place TXT updates, renames on role changes, name collisions, daemon restarts
and the withdrawal at shutdown.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from agent import const
from agent.avahi import defs
from agent.avahi.bus import AvahiBus, AvahiError
from agent.log import EventLog
from agent.mdns.records import Advertisement
from agent.mdns.wanted import WantedAdvert

_COLLISION_RENAMES_MAX = 16  # alternative names tried in a row before giving up until a kick


class Publisher(WantedAdvert):
    """Keeps one entry group equal to the wanted Advertisement (or to nothing)."""

    def __init__(self, bus: AvahiBus, log: EventLog) -> None:
        super().__init__()
        self._bus = bus
        self._log = log
        self._group: str | None = None  # entry group object path
        self._published: Advertisement | None = None  # what the group holds, with the real name
        self._collided = False
        self._committed_at = 0.0

    async def run(self) -> None:
        """Reconcile until cancelled."""
        undo = self._bus.on_presence(self._on_presence)
        try:
            while True:
                await self._kick.wait()
                self._kick.clear()
                try:
                    await self._reconcile()
                except AvahiError as err:
                    self._log.event(
                        "advert_error", "warning", error=str(err), dbus_error=err.name
                    )
                    if not err.daemon_gone:
                        self._group_lost()
                    self._retry_later()
        finally:
            undo()

    # -- events -----------------------------------------------------------------------------

    def _on_presence(self, state: defs.ServerState | None) -> None:
        if state is None:
            self._group_lost()  # the daemon took our group with it
        self._kick.set()

    def _on_group_signal(self, member: str, args: tuple[Any, ...]) -> None:
        if member != "StateChanged":
            return
        state, error = defs.EntryGroupState(args[0]), args[1]
        if state == defs.EntryGroupState.ESTABLISHED:
            self.established.set()
            elapsed = (time.monotonic() - self._committed_at) * 1000
            self._log.event("advert_published", name=self._name, ms_elapsed=round(elapsed))
            if self.on_established is not None:
                self.on_established(self._name)
            return
        self.established.clear()
        if state == defs.EntryGroupState.COLLISION:
            self._log.event("advert_collision", "notice", name=self._name)
            self._collided = True
            self._kick.set()
        elif state == defs.EntryGroupState.FAILURE:
            self._log.event("advert_failed", "warning", name=self._name, error=error)
            self._published = None
            self._retry_later()

    def _retry_later(self) -> None:
        asyncio.get_running_loop().call_later(const.AVAHI_RECONNECT_DELAY, self._kick.set)

    def _group_lost(self) -> None:
        if self._group is not None:
            self._bus.unregister(self._group)
        self._group = None
        self._published = None
        self.established.clear()

    # -- reconcile --------------------------------------------------------------------------

    async def _reconcile(self) -> None:
        wanted = self._wanted
        if self._bus.state != defs.ServerState.RUNNING:
            # While the server registers its host name (or has none), Avahi wants groups reset
            # and registered again once it runs (avahi-client/client.h, AVAHI_CLIENT_S_*).
            if self._group is not None and self._bus.state is not None:
                await self._call("Reset")
            self._published = None
            self.established.clear()
            if wanted is None:
                self._synced.set()
            return
        if wanted is None:
            if self._group is not None:
                group = self._group
                await self._call("Free")  # Avahi sends goodbye packets (TTL 0) as it frees
                self._bus.unregister(group)
                self._group_lost()
                self._log.event("advert_withdrawn", name=self._name or None)
            self._synced.set()
            return
        if self._group is None:
            (path,) = await self._bus.call(
                defs.SERVER_PATH, defs.IFACE_SERVER, "EntryGroupNew", ("()", "(o)")
            )
            self._group = path
            self._bus.register(path, self._on_group_signal)
        if self._collided:
            self._collided = False
            await self._rename()
        target = replace(wanted, name=self._name)
        published = self._published
        if published is not None and replace(published, txt=target.txt) == target:
            if published.txt != target.txt:
                for stype in target.stypes:
                    await self._call(
                        "UpdateServiceTxt", defs.SIG_UPDATE_SERVICE_TXT,
                        (target.interface, target.protocol, 0, target.name, stype, "",
                         list(target.txt)),
                    )
                self._published = target
                self._log.event("advert_updated", name=target.name)
        else:
            await self._add_and_commit(target)
        self._synced.set()

    async def _add_and_commit(self, target: Advertisement) -> None:
        for _ in range(_COLLISION_RENAMES_MAX):
            await self._call("Reset")
            self._published = None
            self.established.clear()
            try:
                for stype in target.stypes:
                    await self._call(
                        "AddService", defs.SIG_ADD_SERVICE,
                        (target.interface, target.protocol, 0, target.name, stype, "", "",
                         target.port, list(target.txt)),
                    )
            except AvahiError as err:
                if err.name != defs.ERR_COLLISION:
                    raise
                # Another client of this same daemon holds the name: Avahi refuses it locally.
                self._log.event("advert_collision", "notice", name=target.name, local=True)
                await self._rename()
                target = replace(target, name=self._name)
                continue
            self._committed_at = time.monotonic()
            await self._call("Commit")
            self._published = target
            return
        raise AvahiError(f"no free instance name after {_COLLISION_RENAMES_MAX} alternatives")

    async def _rename(self) -> None:
        (alternative,) = await self._bus.call(
            defs.SERVER_PATH, defs.IFACE_SERVER, "GetAlternativeServiceName",
            ("(s)", "(s)"), (self._name,),
        )
        self._log.event("advert_renamed", "notice", name=self._name, alternative=alternative)
        self._name = alternative

    async def _call(
        self, method: str, signature: tuple[str, str] = ("()", "()"), args: tuple[Any, ...] = ()
    ) -> tuple[Any, ...]:
        assert self._group is not None
        return await self._bus.call(self._group, defs.IFACE_ENTRY_GROUP, method, signature, args)
