"""`sugarkube-agent run`: capture signals, start up, run under one TaskGroup, shut down.

Read top to bottom: serve() owns the bus, the publisher and the browser; the components run as
tasks of one TaskGroup; SIGTERM (or SIGINT) ends the wait, the advert is withdrawn within the
grace period (goodbye packets), the tasks are cancelled and the bus is closed. A component that
fails takes the daemon down with a non-zero exit, never leaving it half alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time

from agent import const
from agent.avahi.browser import Browser
from agent.avahi.bus import AvahiBus, AvahiError
from agent.avahi.publisher import Advertisement, Publisher
from agent.cluster.peers import Change, PeerTable
from agent.config import Settings
from agent.daemon.netlink import Interface, InterfaceError, choose_interface
from agent.log import EventLog
from agent.mdns.records import Advert, Role, encode_txt, instance_name, service_type


class Fatal(Exception):
    """A component cannot go on; the daemon exits non-zero so that systemd restarts it."""


def advertisement(settings: Settings, hostname: str, iface: Interface, role: Role) -> Advertisement:
    """This node's advert for the given role, under both service types."""
    host = f"{hostname}.local"
    advert = Advert(
        cluster=settings.cluster, env=settings.env, role=role, phase="discover", host=host,
        ip4=iface.ip4, ip6=iface.ip6,
    )
    return Advertisement(
        name=instance_name(settings.cluster, settings.env, hostname, role),
        stypes=(service_type(settings.cluster, settings.env), const.HTTPS_SERVICE_TYPE),
        port=const.K3S_API_PORT,
        txt=tuple(encode_txt(advert)),
        interface=iface.index,
    )


async def serve(settings: Settings, log: EventLog) -> int:
    """Run the daemon until SIGTERM; returns the process exit code."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        iface = await asyncio.to_thread(choose_interface, settings.mdns.interface)
    except InterfaceError as err:
        log.event("interface_unusable", "error", error=str(err))
        return const.EXIT_UNAVAILABLE
    hostname = socket.gethostname()
    bus = AvahiBus(loop)
    try:
        await bus.open()
    except AvahiError as err:
        log.event("dbus_unavailable", "error", error=str(err))
        return const.EXIT_UNAVAILABLE
    publisher = Publisher(bus, log)
    log.event(
        "started", cluster=settings.cluster, env=settings.env, host=hostname,
        interface=iface.name, avahi=bus.state.name.lower() if bus.state else "absent",
        ms_elapsed=round((time.monotonic() - started) * 1000),
    )
    try:
        async with asyncio.TaskGroup() as tasks:
            components = [
                tasks.create_task(publisher.run(), name="publisher"),
                tasks.create_task(_watch_peers(bus, settings, log), name="browser"),
                tasks.create_task(_watch_bus(bus), name="bus"),
            ]
            publisher.set(advertisement(settings, hostname, iface, Role.CANDIDATE))
            await stop.wait()
            log.event("stopping")
            withdrawn = await publisher.withdraw(const.SHUTDOWN_GRACE)
            if not withdrawn:
                log.event("withdraw_timeout", "warning", seconds=const.SHUTDOWN_GRACE)
            for task in components:
                task.cancel()
    except* Exception as group:
        for failure in group.exceptions:
            log.event("crashed", "error", error=f"{type(failure).__name__}: {failure}")
        crashed = True
    else:
        crashed = False
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bus.close(), const.SHUTDOWN_GRACE)
    if crashed:
        return const.EXIT_FAIL
    log.event("stopped")
    return const.EXIT_OK


async def _watch_bus(bus: AvahiBus) -> None:
    await bus.closed.wait()
    raise Fatal("the system bus connection closed (dbus-daemon stopped?)")


async def _watch_peers(bus: AvahiBus, settings: Settings, log: EventLog) -> None:
    table = PeerTable(settings.cluster, settings.env)
    async with Browser(bus, service_type(settings.cluster, settings.env), log) as browser:
        async for event in browser:
            if event.record is None:
                continue
            change = table.seen(event.record) if event.kind != "removed" else table.gone(
                event.record
            )
            if change is not None:
                _log_change(log, change, event.ms_elapsed)


def _log_change(log: EventLog, change: Change, ms_elapsed: float) -> None:
    if change.kind == "ignored":
        log.event("record_ignored", "notice", name=change.name, reason=change.reason)
        return
    peer = change.peer
    log.event(
        f"peer_{change.kind}",
        name=change.name,
        host=peer.advert.host if peer else None,
        target=peer.host if peer else None,
        role=peer.advert.role.value if peer else None,
        phase=peer.advert.phase if peer else None,
        local=peer.local if peer else None,
        reason=change.reason or None,
        ms_elapsed=round(ms_elapsed),
    )
