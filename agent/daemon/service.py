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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent import __version__, const
from agent.avahi import defs
from agent.avahi.browser import Browser
from agent.avahi.bus import AvahiBus, AvahiError
from agent.avahi.publisher import Publisher
from agent.config import ConfigError, Settings, load_settings
from agent.daemon import local
from agent.daemon.control import ControlServer, DaemonState
from agent.daemon.formation import AdvertPublisher, FormationRunner
from agent.daemon.metrics import Metrics, MetricsError, serve_metrics
from agent.daemon.netlink import Interface, InterfaceError, choose_interface, watch_interface
from agent.daemon.notify import Notifier
from agent.daemon.peerwatch import BrowserFactory
from agent.daemon.verifier import due_this_boot, run_verifier
from agent.log import EventLog
from agent.mdns.records import Role, service_type


class Fatal(Exception):
    """A component cannot go on; the daemon exits non-zero so that systemd restarts it."""


async def serve(settings: Settings, log: EventLog, config_path: Path | None = None) -> int:
    """Run the daemon until SIGTERM; returns the process exit code."""
    return await Daemon(settings, log, config_path).serve()


class Daemon:
    """The daemon's lifecycle: signals, start-up, the components' TaskGroup, shutdown."""

    def __init__(self, settings: Settings, log: EventLog, config_path: Path | None) -> None:
        self.settings = settings
        self.log = log
        self.config_path = config_path
        self.stop = asyncio.Event()
        self.hup = asyncio.Event()
        self.notifier = Notifier(on_error=lambda line: log.event("notify_failed", "warning",
                                                                 error=line))
        self.started = time.monotonic()
        self._closers: list[Callable[[], Awaitable[object]]] = []
        self.bus: AvahiBus | None = None  # None on the no-D-Bus path

    async def serve(self) -> int:
        """Start up, run until SIGTERM, shut down; the exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.hup.set)
        try:
            code = await self._startup()
            if code is not None:
                return code
            crashed = await self._run()
        finally:
            await self._shutdown()
        if crashed:
            return const.EXIT_FAIL
        self.log.event("stopped")
        return const.EXIT_OK

    async def _startup(self) -> int | None:
        """Open every resource; an exit code when one cannot be had."""
        log = self.log
        role = await asyncio.to_thread(local.held_role, Path("/"))
        refusal = "" if role is None else await asyncio.to_thread(
            local.settings_refusal, Path("/"), self.settings
        )
        if role is not None and refusal:  # a member set up for another cluster: its k3s runs
            log.event("settings_refused", "error", reason=refusal)
            fixed = asyncio.ensure_future(local.reloaded(self.config_path, self.hup, log))
            if not await self._hold(role, "config", refusal, fixed):
                return const.EXIT_OK  # SIGTERM while refusing
            self.settings = fixed.result()
        settings = self.settings
        try:
            self.iface = await asyncio.to_thread(choose_interface, settings.mdns.interface)
        except InterfaceError as err:
            log.event("interface_unusable", "error" if role is None else "warning", error=str(err))
            if role is None:
                return const.EXIT_UNAVAILABLE  # a fresh node cannot form without one
            found = asyncio.ensure_future(self._interface_found())
            if not await self._hold(role, "interface", f"{err}; waiting for one", found):
                return const.EXIT_OK  # SIGTERM while waiting
            self.iface = found.result()
        self.hostname = socket.gethostname()
        code = await (self._open_dbus() if settings.mdns.dbus else self._open_fallback())
        if code is not None:
            return code
        self.metrics = Metrics(__version__, settings.cluster, settings.env)
        self.state = DaemonState()
        await self._serve_metrics()
        self.runner = FormationRunner(
            settings=settings, log=log, publisher=self.publisher, browse=self.browse,
            avahi=self.bus.state if self.bus else defs.ServerState.RUNNING, iface=self.iface,
            hostname=self.hostname, state=self.state, metrics=self.metrics,
            status_note="" if self.bus else " (mDNS without D-Bus: static service file)",
        )
        self._closers.append(self.runner.close)
        control = ControlServer(self.state, wipe=self.runner.wipe)
        await control.start()
        self._closers.append(control.close)
        if self.bus is not None:
            undo = self.bus.on_presence(self.runner.avahi_changed)
            self._closers.append(lambda: asyncio.sleep(0, undo()))
        log.event(
            "started", cluster=settings.cluster, env=settings.env, host=self.hostname,
            interface=self.iface.name, dbus=settings.mdns.dbus,
            avahi=(self.bus.state.name.lower() if self.bus.state else "absent") if self.bus
            else None,
            ms_elapsed=round((time.monotonic() - self.started) * 1000),
        )
        self.notifier.ready()
        return None

    async def _open_dbus(self) -> int | None:
        """Avahi over D-Bus: the publisher and browser of agent/avahi/."""
        bus = self.bus = AvahiBus(asyncio.get_running_loop(), tap=self._log_signal, log=self.log)
        try:
            await bus.open()
        except AvahiError as err:
            self.log.event("dbus_unavailable", "error", error=str(err))
            return const.EXIT_UNAVAILABLE
        self._closers.append(bus.close)
        stype = service_type(self.settings.cluster, self.settings.env)
        self.publisher: AdvertPublisher = Publisher(bus, self.log)
        # The mDNS interface only, over the protocol of its address (IPv4 when it has one, as
        # the join address prefers): per peer Avahi then keeps one resolver and one TXT browser,
        # not two of each (every one of them queries the LAN; bench/scale.py measured the cost).
        protocol = defs.Protocol.INET if self.iface.ip4 else defs.Protocol.INET6
        self.browse: BrowserFactory = lambda: Browser(
            bus, stype, self.log, interface=self.iface.index, protocol=protocol
        )
        self.prove_alive: Callable[[], Awaitable[None]] = bus.ping_glib
        return None

    def _log_signal(self, path: str, interface: str, member: str, args: tuple[Any, ...]) -> None:
        """SUGARKUBE_DEBUG_MDNS=1: every Avahi signal, one debug line (the log redacts it)."""
        if self.log.debug_enabled:
            self.log.event(
                "avahi_signal", "debug", interface=interface.rsplit(".", 1)[-1], member=member,
                path=path, args=_printable(args),
            )

    async def _open_fallback(self) -> int | None:
        """SUGARKUBE_MDNS_DBUS=0: a static service file for avahi-daemon, live rounds to browse."""
        from agent.mdns.fallback import LiveBrowser, StaticPublisher

        self.bus = None
        stype, addr = service_type(self.settings.cluster, self.settings.env), self.iface.mdns_addr
        self.publisher = StaticPublisher(self.log, interface_addr=addr)
        self.browse = lambda: LiveBrowser(stype, self.log, interface_addr=addr)
        self.prove_alive = _loop_alive  # no GLib thread: the asyncio loop is all there is
        self.log.event("mdns_without_dbus", "notice", services_dir="/etc/avahi/services")
        return None

    async def _run(self) -> bool:
        """The components under one TaskGroup until SIGTERM; True when one of them crashed."""
        crashed = False
        try:
            async with asyncio.TaskGroup() as tasks:
                components = [
                    tasks.create_task(self.publisher.run(), name="publisher"),
                    tasks.create_task(self.runner.run(), name="formation"),
                    tasks.create_task(_watch_bus(self.bus), name="bus"),
                    tasks.create_task(self._verify_and_reload(), name="verifier"),
                    tasks.create_task(self._forward_status(), name="status"),
                    tasks.create_task(self._watch_interface(), name="netlink"),
                    tasks.create_task(self._retry_metrics(), name="metrics"),
                    tasks.create_task(
                        self.notifier.watchdog(self.prove_alive, self._watchdog_health),
                        name="watchdog",
                    ),
                ]
                await self.stop.wait()
                self.notifier.stopping()
                self.log.event("stopping")
                if not await self.publisher.withdraw(const.SHUTDOWN_GRACE):
                    self.log.event("withdraw_timeout", "warning", seconds=const.SHUTDOWN_GRACE)
                for task in components:
                    task.cancel()
        except* Exception as group:
            for failure in group.exceptions:
                self.log.event("crashed", "error", error=f"{type(failure).__name__}: {failure}")
            crashed = True
        return crashed

    async def _shutdown(self) -> None:
        """Close what start-up opened, newest first, each bounded."""
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(close(), const.SHUTDOWN_GRACE)

    async def _hold(self, role: Role, what: str, reason: str, task: asyncio.Future[Any]) -> bool:
        """Released from local state (local.py) until `task` is done; False on SIGTERM."""
        listen = self.settings.metrics
        try:
            await local.hold_released(
                role, what, reason, log=self.log, notifier=self.notifier,
                until=_first(task, self.stop.wait()), metrics_at=(listen.host, listen.port),
            )
        finally:
            task.cancel()
        return task.done() and not task.cancelled()

    async def _serve_metrics(self) -> bool:
        """The metrics endpoint; when it cannot bind, the daemon goes on without it (degraded:
        Prometheus is no reason to keep k3s gated) and _retry_metrics tries again."""
        listen = self.settings.metrics
        try:
            server = await serve_metrics(self.metrics, listen.host, listen.port)
        except MetricsError as err:
            await self._degrade("metrics", str(err))
            return False
        self._closers.append(server.close)
        await self._degrade("metrics", None)
        return True

    async def _retry_metrics(self) -> None:
        """Soon at first (the port held for a moment by a process on its way out), then every
        METRICS_RETRY s."""
        pause = 1.0
        while "metrics" in self.state.snapshot.degraded:
            await asyncio.sleep(pause)
            await self._serve_metrics()
            pause = min(pause * 2, const.METRICS_RETRY)

    async def _degrade(self, what: str, reason: str | None) -> None:
        """`what` fails for `reason` (None: it works again): event, STATUS, `status`, metric."""
        degraded = dict(self.state.snapshot.degraded)
        if reason is None:
            if degraded.pop(what, None) is None:
                return
            self.log.event("degraded_recovered", what=what)
        else:
            if degraded.get(what) != reason:
                self.log.event("degraded", "warning", what=what, reason=reason)
            degraded[what] = reason
        self.metrics.degraded(what, reason is not None)
        await self.state.update(degraded=degraded)

    async def _interface_found(self) -> Interface:
        """Poll for a usable interface (a member waits for its network without holding k3s)."""
        while True:
            await asyncio.sleep(const.INTERFACE_RETRY)
            with contextlib.suppress(InterfaceError):
                iface = await asyncio.to_thread(choose_interface, self.settings.mdns.interface)
                self.log.event("interface_found", interface=iface.name)
                return iface

    async def _watch_interface(self) -> None:
        """Address and link changes of the mDNS interface reach the advert."""
        async for event in watch_interface(self.iface.name, self.iface.index):
            self.runner.interface_changed(event)

    async def _forward_status(self) -> None:
        """STATUS= follows the daemon's status line (systemctl status shows it)."""
        while True:
            snapshot = self.state.snapshot
            degraded = f" [degraded: {', '.join(sorted(snapshot.degraded))}]" * bool(
                snapshot.degraded)
            self.notifier.status(snapshot.status + degraded)
            await self.state.wait_change(const.GATE_REPORT_INTERVAL)

    def _watchdog_health(self, reason: str | None) -> None:
        if reason is None:
            self.log.event("watchdog_recovered")
        else:
            self.log.event("watchdog_withheld", "error", reason=reason)

    async def _verify_and_reload(self) -> None:
        """Verify once per boot after the gate opened (k3s up, or a bounded wait); on SIGHUP
        reload the configuration (a bad one is logged and the old one kept) and verify again."""
        release = asyncio.ensure_future(self.runner.released.wait())
        hangup = asyncio.ensure_future(self.hup.wait())
        await asyncio.wait({release, hangup}, return_when=asyncio.FIRST_COMPLETED)
        if release.done() and due_this_boot():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(const.VERIFIER_WAIT_FOR_K3S):
                    await self.runner.k3s_up.wait()
            await self._verify()
        release.cancel()
        while True:
            await self.hup.wait()
            self.hup.clear()
            self._reload()
            await self._verify()

    async def _verify(self) -> None:
        results = await run_verifier(self.settings, self.log, self.hostname)
        self.metrics.verifier([(r.name, r.status.value) for r in results])

    def _reload(self) -> None:
        try:
            fresh = load_settings(self.config_path)
        except ConfigError as err:
            self.log.event(
                "config_reload_failed", "error", error=str(err), kept="the running config"
            )
            return
        changed = [f for f in ("cluster", "env", "servers", "mdns", "metrics")
                   if getattr(fresh, f) != getattr(self.settings, f)]
        self.log.debug_enabled = fresh.mdns.debug
        self.log.event(
            "config_reloaded", changed=",".join(changed) or None,
            restart_needed=bool(set(changed) - {"mdns"}) or None,
        )


def _printable(args: tuple[Any, ...]) -> str:
    """Signal arguments as one bounded line: TXT byte lists shown as text."""
    def text(value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(x, list) for x in value):
            try:
                return [bytes(x).decode(errors="replace") for x in value]
            except (TypeError, ValueError):
                return value
        return value

    return repr([text(a) for a in args])[: const.DEBUG_ARGS_MAX]


async def _loop_alive() -> None:
    await asyncio.sleep(0)


async def _first(*waits: Awaitable[object]) -> None:
    """Return once any of `waits` is done; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()


async def serve_unconfigured(
    config_path: Path | None,
    error: str,
    role: Role,
    make_log: Callable[[Settings | None], EventLog],
) -> int:
    """A member whose configuration is unreadable: released from local state until SIGHUP
    brings a configuration that loads, then the daemon whole; the exit code."""
    log = make_log(None)
    loop = asyncio.get_running_loop()
    stop, hup = asyncio.Event(), asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, hup.set)
    notifier = Notifier(on_error=lambda line: log.event("notify_failed", "warning", error=line))
    reason = f"{error}; fix it, then `systemctl reload sugarkube-agent`"
    fixed = asyncio.ensure_future(local.reloaded(config_path, hup, log))
    await local.hold_released(
        role, "config", reason, log=log, notifier=notifier, until=_first(fixed, stop.wait())
    )
    if not fixed.done() or fixed.cancelled():
        log.event("stopped")
        return const.EXIT_OK
    settings = fixed.result()
    return await Daemon(settings, make_log(settings), config_path).serve()


async def _watch_bus(bus: AvahiBus | None) -> None:
    if bus is None:
        return
    await bus.closed.wait()
    raise Fatal("the system bus connection closed (dbus-daemon stopped?)")
