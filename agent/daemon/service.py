"""`sugarkube-agent run`: capture signals, start up, run under one TaskGroup, shut down.

Read top to bottom: serve() owns the bus, the publisher, the formation runner and the control
socket; the components run as tasks of one TaskGroup; SIGTERM (or SIGINT) ends the wait, the
advert is withdrawn within the grace period (goodbye packets), the tasks are cancelled and the
bus is closed. A component that fails takes the daemon down with a non-zero exit, never leaving
it half alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time

from agent import const
from agent.avahi.bus import AvahiBus, AvahiError
from agent.avahi.publisher import Publisher
from agent.config import Settings
from agent.daemon.control import ControlServer, DaemonState
from agent.daemon.formation import FormationRunner
from agent.daemon.netlink import InterfaceError, choose_interface
from agent.log import EventLog


class Fatal(Exception):
    """A component cannot go on; the daemon exits non-zero so that systemd restarts it."""


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
    state = DaemonState()
    runner = FormationRunner(
        settings=settings, log=log, bus=bus, publisher=publisher, iface=iface,
        hostname=hostname, state=state,
    )
    control = ControlServer(state, wipe=runner.wipe)
    await control.start()
    undo = bus.on_presence(runner.avahi_changed)
    log.event(
        "started", cluster=settings.cluster, env=settings.env, host=hostname,
        interface=iface.name, avahi=bus.state.name.lower() if bus.state else "absent",
        ms_elapsed=round((time.monotonic() - started) * 1000),
    )
    try:
        async with asyncio.TaskGroup() as tasks:
            components = [
                tasks.create_task(publisher.run(), name="publisher"),
                tasks.create_task(runner.run(), name="formation"),
                tasks.create_task(_watch_bus(bus), name="bus"),
            ]
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
        undo()
        await runner.close()
        await control.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bus.close(), const.SHUTDOWN_GRACE)
    if crashed:
        return const.EXIT_FAIL
    log.event("stopped")
    return const.EXIT_OK


async def _watch_bus(bus: AvahiBus) -> None:
    await bus.closed.wait()
    raise Fatal("the system bus connection closed (dbus-daemon stopped?)")
