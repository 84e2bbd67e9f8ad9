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
from pathlib import Path

from agent import const
from agent.avahi.bus import AvahiBus, AvahiError
from agent.avahi.publisher import Publisher
from agent.config import ConfigError, Settings, load_settings
from agent.daemon.control import ControlServer, DaemonState
from agent.daemon.formation import FormationRunner
from agent.daemon.netlink import InterfaceError, choose_interface
from agent.daemon.verifier import due_this_boot, run_verifier
from agent.log import EventLog


class Fatal(Exception):
    """A component cannot go on; the daemon exits non-zero so that systemd restarts it."""


async def serve(settings: Settings, log: EventLog, config_path: Path | None = None) -> int:
    """Run the daemon until SIGTERM; returns the process exit code."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    hup = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
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
                tasks.create_task(
                    _verify_and_reload(
                        settings=settings, config_path=config_path, log=log, runner=runner,
                        hostname=hostname, hup=hup,
                    ),
                    name="verifier",
                ),
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


async def _verify_and_reload(
    *,
    settings: Settings,
    config_path: Path | None,
    log: EventLog,
    runner: FormationRunner,
    hostname: str,
    hup: asyncio.Event,
) -> None:
    """Verify once per boot after the gate opened (k3s up, or a bounded wait); on SIGHUP
    reload the configuration (a bad one is logged and the old one kept) and verify again."""
    release = asyncio.ensure_future(runner.released.wait())
    hangup = asyncio.ensure_future(hup.wait())
    await asyncio.wait({release, hangup}, return_when=asyncio.FIRST_COMPLETED)
    if release.done() and due_this_boot():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(runner.k3s_up.wait(), const.VERIFIER_WAIT_FOR_K3S)
        await run_verifier(settings, log, hostname)
    release.cancel()
    while True:
        await hup.wait()
        hup.clear()
        try:
            fresh = load_settings(config_path)
        except ConfigError as err:
            log.event("config_reload_failed", "error", error=str(err), kept="the running config")
        else:
            changed = [f for f in ("cluster", "env", "servers", "mdns", "metrics")
                       if getattr(fresh, f) != getattr(settings, f)]
            log.debug_enabled = fresh.mdns.debug
            log.event(
                "config_reloaded", changed=",".join(changed) or None,
                restart_needed=bool(set(changed) - {"mdns"}) or None,
            )
        await run_verifier(settings, log, hostname)


async def _watch_bus(bus: AvahiBus) -> None:
    await bus.closed.wait()
    raise Fatal("the system bus connection closed (dbus-daemon stopped?)")
