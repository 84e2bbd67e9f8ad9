"""Publishing this node's advert: two Avahi entry groups, kept equal to what is wanted.

The publisher is a reconcile loop. Callers say what they want published (`set()`); every event
(a new wish, avahi-daemon leaving or coming back, its server state, our groups' states) only
wakes the loop, which then makes the daemon's state match the wish. One mechanism thus covers the
first publish, in-place TXT updates, renames on role changes, name collisions, daemon restarts
and the withdrawal at shutdown.

The advert is published in two steps (agent/avahi/rdata.py says why): the claim group holds the
unique SRV and TXT and is probed; once Avahi says it is established, the pointers group adds the
shared PTRs that browsers follow. A peer thus sees the advert whole or not at all.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from agent import const
from agent.avahi import defs, rdata
from agent.avahi.bus import AvahiBus, AvahiError
from agent.log import EventLog
from agent.mdns.records import Advertisement
from agent.mdns.wanted import WantedAdvert

_COLLISION_RENAMES_MAX = 16  # alternative names tried in a row before giving up until a kick


def _pointed_at(advert: Advertisement) -> Advertisement:
    """What the pointers depend on: everything but the TXT."""
    return replace(advert, txt=())


class Publisher(WantedAdvert):
    """Keeps the claim and pointers groups equal to the wanted Advertisement (or to nothing)."""

    def __init__(self, bus: AvahiBus, log: EventLog) -> None:
        super().__init__()
        self._bus = bus
        self._log = log
        self._claim: str | None = None  # entry group path: SRV + TXT, probed
        self._pointers: str | None = None  # entry group path: the PTRs, added once claimed
        self._published: Advertisement | None = None  # what the claim holds, with the real name
        self._pointed: Advertisement | None = None  # what the pointers point at (TXT left out)
        self._claimed = False  # the claim group is established
        self._collided = False
        self._committed_at = 0.0
        self._host = ""  # the host name and domain the claim's SRV names, as Avahi gave them
        self._domain = "local"
        self._host_in_doubt = False  # the server re-registered its host records meanwhile

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
                        self._groups_lost()
                    self._retry_later()
        finally:
            undo()

    # -- events -----------------------------------------------------------------------------

    def _on_presence(self, state: defs.ServerState | None) -> None:
        if state is None:
            self._groups_lost()  # the daemon took our groups with it
        self._kick.set()

    def _on_claim_signal(self, member: str, args: tuple[Any, ...]) -> None:
        if member != "StateChanged":
            return
        state, error = defs.EntryGroupState(args[0]), args[1]
        self._claimed = state == defs.EntryGroupState.ESTABLISHED
        if self._claimed:
            self._kick.set()  # now the pointers
            return
        self._lost()
        if state == defs.EntryGroupState.COLLISION:
            self._log.event("advert_collision", "notice", name=self._name)
            self._collided = True
            self._kick.set()
        elif state == defs.EntryGroupState.FAILURE:
            self._log.event("advert_failed", "warning", name=self._name, error=error)
            self._published = None
            self._retry_later()

    def _on_pointers_signal(self, member: str, args: tuple[Any, ...]) -> None:
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
        self._lost()
        if state == defs.EntryGroupState.FAILURE:
            self._log.event("advert_failed", "warning", name=self._name, error=error)
            self._pointed = None
            self._retry_later()

    def _retry_later(self) -> None:
        asyncio.get_running_loop().call_later(const.AVAHI_RECONNECT_DELAY, self._kick.set)

    def _groups_lost(self) -> None:
        for path in (self._claim, self._pointers):
            if path is not None:
                self._bus.unregister(path)
        self._claim = self._pointers = None
        self._published = self._pointed = None
        self._claimed = False
        self._lost()

    # -- reconcile --------------------------------------------------------------------------

    async def _reconcile(self) -> None:
        wanted, state = self._wanted, self._bus.state
        if state is None:  # the daemon is gone, and our groups with it
            pass
        elif wanted is None:
            await self._free()
        elif state == defs.ServerState.RUNNING:
            await self._publish(wanted)
        elif state == defs.ServerState.REGISTERING:
            # Avahi registers host records again when an address comes or goes: our groups stay
            # (a reset would send goodbyes, and peers would lose the advert for seconds); the
            # SRV still names this host unless the name itself changed, checked once RUNNING.
            self._host_in_doubt = True
        else:
            await self._hold()
        if wanted is None:
            self._synced.set()

    async def _hold(self) -> None:
        """The host name collided (or the server failed): Avahi wants groups reset and registered
        again once it runs, under the new name (avahi-client/client.h, AVAHI_CLIENT_S_*)."""
        for path in (self._pointers, self._claim):
            if path is not None:
                await self._call(path, "Reset")
        self._published = self._pointed = None
        self._claimed = False
        self._lost()

    async def _free(self) -> None:
        """Withdraw: pointers first, so peers drop the PTRs before what they lead to."""
        if self._claim is None and self._pointers is None:
            return
        for path in (self._pointers, self._claim):
            if path is not None:
                await self._call(path, "Free")  # Avahi sends goodbyes (TTL 0) as it frees
        self._groups_lost()
        self._log.event("advert_withdrawn", name=self._name or None)

    async def _publish(self, wanted: Advertisement) -> None:
        if self._host_in_doubt:
            self._host_in_doubt = False
            (host,) = await self._server("GetHostNameFqdn")
            if host != self._host:
                self._published = None  # the SRV must name the new host: claim again
        if self._collided:
            self._collided = False
            await self._rename()
        target = replace(wanted, name=self._name)
        published = self._published
        if published is not None and replace(published, txt=target.txt) == target:
            if published.txt != target.txt:
                await self._update_txt(target)
        else:
            await self._claim_name(target)
            target = replace(target, name=self._name)
        if self._claimed and self._pointed != _pointed_at(target):
            await self._point(target)
        self._synced.set()

    async def _claim_name(self, target: Advertisement) -> None:
        """Withdraw the pointers, then put the SRV and TXT in the claim group and commit it."""
        if self._pointers is not None and self._pointed is not None:
            await self._call(self._pointers, "Reset")
            self._pointed = None
        self._lost()
        if self._claim is None:
            self._claim = await self._new_group(self._on_claim_signal)
        for _ in range(_COLLISION_RENAMES_MAX):
            await self._call(self._claim, "Reset")
            self._published = None
            self._claimed = False
            (self._host,) = await self._server("GetHostNameFqdn")
            (self._domain,) = await self._server("GetDomainName")
            try:
                for record in rdata.claim_records(target, self._host, self._domain):
                    await self._add_record(self._claim, target, record)
            except AvahiError as err:
                if err.name != defs.ERR_COLLISION:
                    raise
                # Another client of this same daemon holds the name: Avahi refuses it locally.
                self._log.event("advert_collision", "notice", name=target.name, local=True)
                await self._rename()
                target = replace(target, name=self._name)
                continue
            self._committed_at = time.monotonic()
            await self._call(self._claim, "Commit")
            self._published = target
            return
        raise AvahiError(f"no free instance name after {_COLLISION_RENAMES_MAX} alternatives")

    async def _point(self, target: Advertisement) -> None:
        if self._pointers is None:
            self._pointers = await self._new_group(self._on_pointers_signal)
        await self._call(self._pointers, "Reset")
        for record in rdata.pointer_records(target, self._domain):
            await self._add_record(self._pointers, target, record)
        await self._call(self._pointers, "Commit")
        self._pointed = _pointed_at(target)

    async def _update_txt(self, target: Advertisement) -> None:
        """Replace the TXT in place (what UpdateServiceTxt does): Avahi re-announces it."""
        assert self._claim is not None
        for record in rdata.claim_records(target, self._host, self._domain):
            if record.rtype == rdata.TYPE_TXT:
                await self._add_record(self._claim, target, record, defs.PUBLISH_UPDATE)
        self._published = target
        self._log.event("advert_updated", name=target.name)

    async def _rename(self) -> None:
        (alternative,) = await self._server(
            "GetAlternativeServiceName", ("(s)", "(s)"), (self._name,)
        )
        self._log.event("advert_renamed", "notice", name=self._name, alternative=alternative)
        self._name = alternative

    async def _new_group(self, handler: Any) -> str:
        (path,) = await self._server("EntryGroupNew", ("()", "(o)"))
        self._bus.register(path, handler)
        return str(path)

    async def _add_record(
        self, group: str, target: Advertisement, record: rdata.RawRecord, flags: int = 0
    ) -> None:
        if record.unique:
            flags |= defs.PUBLISH_UNIQUE
        await self._call(group, "AddRecord", defs.SIG_ADD_RECORD, (
            target.interface, target.protocol, flags, record.name, rdata.CLASS_IN,
            record.rtype, record.ttl, record.rdata,
        ))

    async def _server(
        self, method: str, signature: tuple[str, str] = ("()", "(s)"), args: tuple[Any, ...] = ()
    ) -> tuple[Any, ...]:
        return await self._bus.call(defs.SERVER_PATH, defs.IFACE_SERVER, method, signature, args)

    async def _call(
        self, group: str, method: str, signature: tuple[str, str] = ("()", "()"),
        args: tuple[Any, ...] = (),
    ) -> tuple[Any, ...]:
        return await self._bus.call(group, defs.IFACE_ENTRY_GROUP, method, signature, args)
