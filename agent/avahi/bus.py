"""The one owner of the system-bus connection and of the GLib main-loop thread.

python3-gi 3.42 has no asyncio integration, so GLib runs its own loop in one thread and this
module bridges both ways: coroutines schedule D-Bus calls onto that thread and await their
replies; signals are unpacked there and handed to the asyncio loop as plain tuples. Nothing
outside this module sees a GLib or pydbus object.

Signals are taken only from the connection that owns org.freedesktop.Avahi now: any client of the
system bus may send a signal that looks like Avahi's (to our unique name, past every match
rule). GDBus delivers it to a subscription on the well-known name before its fix for
CVE-2024-34397 (GLib 2.80.1, Debian 2.74.6-2+deb12u1) and drops it unseen after. So the
subscriptions name no sender and this module checks each signal against the owner it follows
(GetNameOwner, then NameOwnerChanged in the connection's order): the same on any GLib, and a
forger is counted and logged.

Calls are made with GDBus' asynchronous API and explicit signatures (avahi/defs.py) rather than
pydbus proxies: a proxy introspects its object with a blocking round trip first, and pydbus has
no non-blocking call. Every call has a timeout: GDBus' default is G_MAXINT ms (~25 days).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pydbus
from gi.repository import Gio, GLib

from agent import const
from agent.avahi import defs
from agent.log import EventLog

SignalHandler = Callable[[str, tuple[Any, ...]], None]  # (member, args)
SignalTap = Callable[[str, str, str, tuple[Any, ...]], None]  # (path, interface, member, args)
PresenceHandler = Callable[[defs.ServerState | None], None]  # None: avahi-daemon is gone

_PENDING_PATHS_MAX = 64  # signals kept for objects not yet registered (see _dispatch)
_IGNORED_SENDERS_LOGGED = 16  # forgers named in the log; later ones are only counted


class AvahiError(Exception):
    """A D-Bus call failed; `name` is the D-Bus error name when the peer sent one."""

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name

    @property
    def daemon_gone(self) -> bool:
        """True when the failure means avahi-daemon (or its object) is not there."""
        return self.name in {
            defs.ERR_SERVICE_UNKNOWN,
            defs.ERR_NAME_HAS_NO_OWNER,
            defs.ERR_NO_REPLY,
            defs.ERR_UNKNOWN_OBJECT,
            defs.ERR_UNKNOWN_METHOD,
            None,
        }


def _error_from_glib(err: GLib.Error) -> AvahiError:
    name = Gio.DBusError.get_remote_error(err)
    if name:
        Gio.DBusError.strip_remote_error(err)
    elif err.matches(Gio.io_error_quark(), Gio.IOErrorEnum.TIMED_OUT):
        name = defs.ERR_NO_REPLY
    return AvahiError(err.message, name)


class AvahiBus:
    """The system-bus connection, its GLib thread, and avahi-daemon's presence on the bus."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        address: str | None = None,
        tap: SignalTap | None = None,
        log: EventLog | None = None,
    ) -> None:
        self._loop = loop
        self._address = address
        self._tap = tap  # sees every signal taken, first (SUGARKUBE_DEBUG_MDNS)
        self._log = log
        self._context = GLib.MainContext.new()
        self._glib_loop = GLib.MainLoop.new(self._context, False)
        self._thread: threading.Thread | None = None
        self._con: Gio.DBusConnection | None = None
        self._bus_subscriptions: list[int] = []
        # object path -> handler; avahi-daemon addresses each object's signals to its client.
        self._handlers: dict[str, SignalHandler] = {}
        self._pending: OrderedDict[str, list[tuple[str, tuple[Any, ...]]]] = OrderedDict()
        self._presence_handlers: list[PresenceHandler] = []
        # The unique name owning org.freedesktop.Avahi; read and written on the GLib thread only.
        self._owner: str | None = None
        self._owner_known = False  # until then nothing is taken, and nobody is blamed
        self._ignored_from: set[str] = set()
        self.signals_ignored = 0  # signals dropped because their sender was not the owner
        self.state: defs.ServerState | None = None  # None while avahi-daemon owns no name
        self.closed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, start the GLib thread, and learn whether avahi-daemon runs."""
        address = self._address or Gio.dbus_address_get_for_bus_sync(Gio.BusType.SYSTEM, None)
        try:
            bus = await asyncio.to_thread(pydbus.connect, address)
        except GLib.Error as err:
            raise AvahiError(f"cannot connect to the system bus: {err.message}") from err
        self._con = bus.con
        self._con.set_exit_on_close(False)
        self._thread = threading.Thread(target=self._run_glib, name="glib", daemon=True)
        self._thread.start()
        await self._on_glib(self._subscribe_all)
        await self._learn_owner()
        await self._refresh_presence()

    async def close(self) -> None:
        """Drop the subscriptions, close the connection and stop the GLib thread (bounded)."""
        if self._thread is None:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._on_glib(self._unsubscribe_all), const.DBUS_CALL_TIMEOUT)
        if self._con is not None:
            con = self._con
            self._con = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.to_thread(con.close_sync, None), 2.0)
        self._glib_loop.quit()
        await asyncio.to_thread(self._thread.join, 2.0)
        self._thread = None

    def _run_glib(self) -> None:
        self._context.push_thread_default()
        try:
            self._glib_loop.run()
        finally:
            self._context.pop_thread_default()

    def _on_glib(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run fn on the GLib thread; the future carries its result or exception."""
        fut: asyncio.Future[Any] = self._loop.create_future()

        def run(*_source_args: object) -> bool:
            try:
                result = fn()
            except BaseException as exc:  # handed over to the awaiting coroutine
                self._resolve(fut, None, exc)
            else:
                self._resolve(fut, result, None)
            return False  # GLib.SOURCE_REMOVE: run once

        source = GLib.Idle()
        source.set_callback(run)
        source.attach(self._context)
        return fut

    def _resolve(
        self, fut: asyncio.Future[Any], result: Any, exc: BaseException | None
    ) -> None:
        def settle() -> None:
            if fut.done():  # the awaiting task was cancelled meanwhile
                return
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        with contextlib.suppress(RuntimeError):  # loop already closed at shutdown
            self._loop.call_soon_threadsafe(settle)

    async def ping_glib(self) -> None:
        """A round trip through the GLib thread: proves its loop is dispatching."""
        await self._on_glib(lambda: None)

    # -- calls ------------------------------------------------------------------------------

    async def call(
        self,
        path: str,
        interface: str,
        method: str,
        signature: tuple[str, str] = ("()", "()"),
        args: tuple[Any, ...] = (),
        *,
        destination: str = defs.BUS_NAME,
        timeout: float | None = None,
    ) -> tuple[Any, ...]:
        """Call a method and return its unpacked reply tuple; raises AvahiError."""
        con = self._con
        if con is None:
            raise AvahiError("not connected to the system bus")
        in_sig, out_sig = signature
        params = GLib.Variant(in_sig, args) if in_sig != "()" else None
        timeout_ms = int(1000 * (timeout if timeout is not None else const.DBUS_CALL_TIMEOUT))
        fut: asyncio.Future[Any] = self._loop.create_future()

        def done(source: Gio.DBusConnection, res: Gio.AsyncResult) -> None:
            try:
                reply = source.call_finish(res)
            except GLib.Error as err:
                self._resolve(fut, None, _error_from_glib(err))
            else:
                self._resolve(fut, reply.unpack(), None)

        def start() -> None:
            con.call(
                destination, path, interface, method, params, GLib.VariantType.new(out_sig),
                Gio.DBusCallFlags.NONE, timeout_ms, None, done,
            )

        await self._on_glib(start)
        # GDBus enforces timeout_ms; this outer bound only guards a wedged GLib thread.
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
        # arrives as the call completes (gh-86296), and shutdown cancels calls in flight.
        try:
            async with asyncio.timeout(timeout_ms / 1000 + 1.0):
                result: tuple[Any, ...] = await fut
        except TimeoutError as err:  # callers handle one kind of failure: AvahiError
            raise AvahiError(f"{method}: no reply in time", defs.ERR_NO_REPLY) from err
        return result

    # -- signals ----------------------------------------------------------------------------

    def register(self, path: str, handler: SignalHandler) -> None:
        """Route the signals of one Avahi object to handler, including any that came early."""
        self._handlers[path] = handler
        for member, args in self._pending.pop(path, []):
            handler(member, args)

    def unregister(self, path: str) -> None:
        """Stop routing an object's signals (after Free, or once the daemon is gone)."""
        self._handlers.pop(path, None)
        self._pending.pop(path, None)

    def on_presence(self, handler: PresenceHandler) -> Callable[[], None]:
        """Call handler on every change of avahi-daemon's presence or state; returns the undo."""
        self._presence_handlers.append(handler)
        return lambda: self._presence_handlers.remove(handler)

    def _subscribe_all(self) -> None:
        # One match rule per interface, added before any Avahi object exists: a per-object rule
        # could only be added once the object's path is known, after it may have signalled.
        # No sender: _on_signal checks it against the owner (module docstring).
        assert self._con is not None
        con = self._con
        for interface in (
            defs.IFACE_SERVICE_BROWSER,
            defs.IFACE_SERVICE_RESOLVER,
            defs.IFACE_RECORD_BROWSER,
            defs.IFACE_ENTRY_GROUP,
            defs.IFACE_SERVER,
        ):
            self._bus_subscriptions.append(
                con.signal_subscribe(
                    None, interface, None, None, None,
                    Gio.DBusSignalFlags.NONE, self._on_signal,
                )
            )
        self._bus_subscriptions.append(
            con.signal_subscribe(
                defs.DBUS_NAME, defs.DBUS_IFACE, "NameOwnerChanged", defs.DBUS_PATH,
                defs.BUS_NAME, Gio.DBusSignalFlags.NONE, self._on_signal,
            )
        )
        con.connect("closed", self._on_closed)

    def _unsubscribe_all(self) -> None:
        if self._con is not None:
            for sid in self._bus_subscriptions:
                self._con.signal_unsubscribe(sid)
        self._bus_subscriptions.clear()

    async def _learn_owner(self) -> None:
        """Who owns org.freedesktop.Avahi now (asked after NameOwnerChanged is subscribed)."""
        try:
            (owner,) = await self.call(
                defs.DBUS_PATH, defs.DBUS_IFACE, "GetNameOwner", ("(s)", "(s)"),
                (defs.BUS_NAME,), destination=defs.DBUS_NAME,
            )
        except AvahiError as err:
            if err.name != defs.ERR_NAME_HAS_NO_OWNER:
                raise
            owner = None

        def seed() -> None:
            # A NameOwnerChanged already handled on this thread is at least as new as the reply.
            if not self._owner_known:
                self._owner, self._owner_known = owner, True

        await self._on_glib(seed)

    def _on_signal(
        self,
        _con: Gio.DBusConnection,
        sender: str,
        path: str,
        interface: str,
        member: str,
        params: GLib.Variant,
    ) -> None:
        if sender == defs.DBUS_NAME and interface == defs.DBUS_IFACE:
            # NameOwnerChanged(name, old, new), in the connection's order: it comes before any
            # signal of the new owner, and after every signal of the old one.
            self._owner, self._owner_known = params[2] or None, True
        elif sender != self._owner:
            if self._owner_known:
                self._ignore(sender, path, interface, member)
            return
        args = params.unpack()  # on the GLib thread: only plain Python values cross over
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._dispatch, path, interface, member, args)

    def _ignore(self, sender: str, path: str, interface: str, member: str) -> None:
        """Count a signal that did not come from avahi-daemon; log each sender once."""
        self.signals_ignored += 1
        if self._log is None or sender in self._ignored_from:
            return
        if len(self._ignored_from) < _IGNORED_SENDERS_LOGGED:
            self._ignored_from.add(sender)
            self._log.event(
                "dbus_signal_ignored", "warning", sender=sender, owner=self._owner,
                interface=interface.rsplit(".", 1)[-1], member=member, path=path,
                count=self.signals_ignored,
            )

    def _on_closed(self, _con: Gio.DBusConnection, _remote: bool, _err: Any) -> None:
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self.closed.set)

    def _dispatch(self, path: str, interface: str, member: str, args: tuple[Any, ...]) -> None:
        if self._tap is not None:
            self._tap(path, interface, member, args)
        if interface == defs.DBUS_IFACE:  # NameOwnerChanged(name, old_owner, new_owner)
            _name, old_owner, new_owner = args
            if old_owner:
                # The old daemon is gone, with every object of ours, even if a new one is
                # already up: say so first, so that owners re-create what they had.
                self._set_state(None)
            if new_owner:
                task = self._loop.create_task(self._refresh_presence())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        if interface == defs.IFACE_SERVER and member == "StateChanged":
            self._set_state(defs.ServerState(args[0]))
            return
        handler = self._handlers.get(path)
        if handler is not None:
            handler(member, args)
            return
        # Only avahi < 0.8 (no *Prepare) signals before its object's path is known to us; keep a
        # few such paths until registered. Freed objects' stragglers age out the same way.
        self._pending.setdefault(path, []).append((member, args))
        while len(self._pending) > _PENDING_PATHS_MAX:
            self._pending.popitem(last=False)

    async def _refresh_presence(self) -> None:
        """Ask the daemon's state; a daemon too busy to answer in time is asked again (it owns
        its name, so it is there: NameOwnerChanged says when it goes), never taken for gone."""
        delay = const.AVAHI_RECONNECT_DELAY
        while True:
            try:
                (state,) = await self.call(
                    defs.SERVER_PATH, defs.IFACE_SERVER, "GetState", ("()", "(i)")
                )
            except AvahiError as err:
                if err.name != defs.ERR_NO_REPLY or self._con is None:
                    self._set_state(None)
                    return
                await asyncio.sleep(delay)
                delay = min(2 * delay, const.AVAHI_RECONNECT_DELAY_MAX)
            else:
                self._set_state(defs.ServerState(state))
                return

    def _set_state(self, state: defs.ServerState | None) -> None:
        if state is None:
            # Every object of ours died with the daemon: forget them and their signals.
            self._handlers.clear()
            self._pending.clear()
        if state == self.state:
            return
        self.state = state
        for handler in list(self._presence_handlers):
            handler(state)
