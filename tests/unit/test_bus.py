"""The bus takes Avahi's signals only from the connection that owns org.freedesktop.Avahi, and
follows that owner across restarts (GDBus' signal callback is the seam; no connection)."""

from __future__ import annotations

import asyncio
import io
import warnings
from typing import Any

from agent.avahi import defs
from agent.log import EventLog

with warnings.catch_warnings():  # gi's importer warns under Python 3.11; not ours to fix
    warnings.simplefilter("ignore", ImportWarning)
    from gi.repository import GLib

    from agent.avahi.bus import AvahiBus

BROWSER = "/Client1/ServiceBrowser1"
ITEM = (2, 0, "k3s-sugar-dev@evil.local (server)", "_k3s-sugar-dev._tcp", "local", 0)


def _owner_changed(bus: AvahiBus, old: str, new: str, sender: str = defs.DBUS_NAME) -> None:
    params = GLib.Variant("(sss)", (defs.BUS_NAME, old, new))
    bus._on_signal(None, sender, defs.DBUS_PATH, defs.DBUS_IFACE, "NameOwnerChanged", params)


def _item_new(bus: AvahiBus, sender: str) -> None:
    params = GLib.Variant("(iisssu)", ITEM)
    bus._on_signal(None, sender, BROWSER, defs.IFACE_SERVICE_BROWSER, "ItemNew", params)


def _state_changed(bus: AvahiBus, sender: str, state: defs.ServerState) -> None:
    params = GLib.Variant("(is)", (state, ""))
    bus._on_signal(None, sender, defs.SERVER_PATH, defs.IFACE_SERVER, "StateChanged", params)


def test_signals_count_only_from_the_current_owner_of_the_avahi_name() -> None:
    async def scenario() -> tuple[list[tuple[str, tuple[Any, ...]]], AvahiBus, str]:
        stream = io.StringIO()
        bus = AvahiBus(asyncio.get_running_loop(), log=EventLog(stream=stream))
        seen: list[tuple[str, tuple[Any, ...]]] = []
        _owner_changed(bus, "", ":1.5")  # avahi-daemon took its name
        await asyncio.sleep(0.01)
        bus.register(BROWSER, lambda member, args: seen.append((member, args)))
        _item_new(bus, ":1.5")
        for _ in range(3):
            _item_new(bus, ":1.66")  # another client, sending to our unique name
        _state_changed(bus, ":1.66", defs.ServerState.COLLISION)
        _owner_changed(bus, ":1.5", ":1.9", sender=":1.66")  # a forged owner change
        await asyncio.sleep(0.01)
        assert bus.state is None  # not COLLISION: the forged StateChanged changed nothing
        return seen, bus, stream.getvalue()

    seen, bus, log = asyncio.run(scenario())
    assert seen == [("ItemNew", ITEM)]
    assert bus.signals_ignored == 5
    (line,) = log.splitlines()  # logged once per sender
    assert line.startswith("event=dbus_signal_ignored sender=:1.66 owner=:1.5 ")
    assert "member=ItemNew" in line and f"path={BROWSER}" in line


def test_a_restarted_daemon_is_followed_to_its_new_unique_name() -> None:
    async def scenario() -> tuple[list[str], AvahiBus]:
        bus = AvahiBus(asyncio.get_running_loop())
        seen: list[str] = []
        _owner_changed(bus, "", ":1.5")
        _owner_changed(bus, ":1.5", "")  # the daemon stopped...
        _owner_changed(bus, "", ":1.9")  # ...and a new one runs
        await asyncio.sleep(0.01)
        bus.register(BROWSER, lambda member, _args: seen.append(member))
        _item_new(bus, ":1.5")  # a straggler of the old one, or someone reusing nothing
        _item_new(bus, ":1.9")
        await asyncio.sleep(0.01)
        return seen, bus

    seen, bus = asyncio.run(scenario())
    assert seen == ["ItemNew"]
    assert bus.signals_ignored == 1


def test_nothing_is_taken_before_the_owner_is_known() -> None:
    async def scenario() -> tuple[list[str], AvahiBus]:
        bus = AvahiBus(asyncio.get_running_loop(), log=EventLog(stream=io.StringIO()))
        seen: list[str] = []
        bus.register(BROWSER, lambda member, _args: seen.append(member))
        _item_new(bus, ":1.5")
        await asyncio.sleep(0.01)
        return seen, bus

    seen, bus = asyncio.run(scenario())
    assert seen == []
    assert bus.signals_ignored == 0  # dropped, not blamed: open() learns the owner first
