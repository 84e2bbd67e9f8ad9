"""Browsing one service type: Avahi's browser and resolvers as an async stream of plain records.

Avahi reports an item per (interface, protocol); we resolve each and emit one record per advert
identity (instance name, type, domain), preferring IPv4, then the lowest interface index. A
resolver is kept for the item's lifetime, so TXT changes published in place arrive as `updated`.
Avahi's resolver keeps the TXT it first found until that record leaves the cache, which the
cache-flush rule delays by at least a second (RFC 6762 §10.2; avahi-core/resolve-service.c takes
a new TXT only once the old one is removed); so each item also has a record browser on its TXT,
whose ItemNew brings a record published in place as soon as it arrives.
When avahi-daemon restarts, the known records are kept as stale until the new browser's first
AllForNow: adverts that are still there do not flap, the ones that went away are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

from agent import const
from agent.avahi import defs, rdata
from agent.avahi.bus import AvahiBus, AvahiError
from agent.log import EventLog
from agent.mdns.records import BrowseEvent, EventKind, Identity, ServiceRecord, split_txt

ItemKey = tuple[int, int, str, str, str]  # interface, protocol, name, type, domain


@dataclass
class _Item:
    objects: dict[str, str] = field(default_factory=dict)  # path -> interface: resolver, TXT
    txts: list[bytes] = field(default_factory=list)  # TXT rdata in the cache, newest last
    record: ServiceRecord | None = None
    stale: bool = False
    failures: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


def _item_key(args: tuple[Any, ...]) -> ItemKey:
    interface, protocol, name, stype, domain = args[:5]
    return (interface, protocol, name, stype, domain)


def _preference(item: _Item) -> tuple[bool, int]:
    assert item.record is not None
    return (item.record.protocol != defs.Protocol.INET, item.record.interface)


class Browser:
    """Browse one service type; iterate for BrowseEvents. Use as an async context manager."""

    def __init__(
        self,
        bus: AvahiBus,
        stype: str,
        log: EventLog,
        *,
        interface: int = defs.IF_UNSPEC,
        protocol: int = defs.Protocol.UNSPEC,
        legacy: bool = False,
    ) -> None:
        self._bus = bus
        self._stype = stype
        self._log = log
        self._interface = interface
        self._protocol = protocol
        self._legacy = legacy  # avahi < 0.8 calls (no Server2.*Prepare); tests force it
        self._path: str | None = None
        self._items: dict[ItemKey, _Item] = {}
        self._emitted: dict[Identity, ServiceRecord] = {}
        self._events: asyncio.Queue[BrowseEvent] = asyncio.Queue()
        self._started = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._undo_presence: Callable[[], None] = lambda: None
        self._closed = False

    @property
    def records(self) -> list[ServiceRecord]:
        """The records currently seen, one per advert."""
        return list(self._emitted.values())

    async def __aenter__(self) -> Browser:
        self._started = time.monotonic()
        self._undo_presence = self._bus.on_presence(self._on_presence)
        if self._bus.state == defs.ServerState.RUNNING:
            await self._start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> Browser:
        return self

    async def __anext__(self) -> BrowseEvent:
        return await self._events.get()

    async def close(self) -> None:
        """Free the browser and every resolver (bounded by the call timeouts)."""
        if self._closed:
            return
        self._closed = True
        self._undo_presence()
        for task in list(self._tasks):
            task.cancel()
        objects = [pair for item in self._items.values() for pair in item.objects.items()]
        if self._path:
            objects.append((self._path, defs.IFACE_SERVICE_BROWSER))
        for path, _iface in objects:
            self._bus.unregister(path)
        if self._bus.state is not None:
            await asyncio.gather(
                *(self._free(path, iface) for path, iface in objects), return_exceptions=True
            )

    # -- the browser object -------------------------------------------------------------------

    async def _start(self) -> None:
        args = (self._interface, self._protocol, self._stype, "", 0)
        if not self._legacy:
            try:
                (path,) = await self._bus.call(
                    defs.SERVER_PATH, defs.IFACE_SERVER2, "ServiceBrowserPrepare",
                    defs.SIG_SERVICE_BROWSER_PREPARE, args,
                )
            except AvahiError as err:
                if err.name != defs.ERR_UNKNOWN_METHOD:
                    raise
                self._legacy = True
            else:
                self._path = path
                self._bus.register(path, self._on_browser_signal)
                await self._bus.call(path, defs.IFACE_SERVICE_BROWSER, "Start")
                return
        # avahi < 0.8: the browser starts at creation; signals that beat the reply are kept by
        # the bus (interface-wide match rule) and replayed when we register the path.
        (path,) = await self._bus.call(
            defs.SERVER_PATH, defs.IFACE_SERVER, "ServiceBrowserNew",
            defs.SIG_SERVICE_BROWSER_PREPARE, args,
        )
        self._path = path
        self._bus.register(path, self._on_browser_signal)

    def _on_presence(self, state: defs.ServerState | None) -> None:
        if state is None:
            self._path = None
            for item in self._items.values():
                item.objects.clear()
                item.txts.clear()
                item.stale = True
            self._log.event("browse_interrupted", "warning", stype=self._stype)
        elif state == defs.ServerState.RUNNING and self._path is None and not self._closed:
            self._spawn(self._restart())

    async def _restart(self) -> None:
        try:
            await self._start()
        except AvahiError as err:
            self._log.event("browse_failed", "warning", stype=self._stype, error=str(err))

    def _on_browser_signal(self, member: str, args: tuple[Any, ...]) -> None:
        if member == "ItemNew":
            self._item_new(_item_key(args))
        elif member == "ItemRemove":
            self._item_remove(_item_key(args))
        elif member == "AllForNow":
            self._drop_stale()
            self._emit("all_for_now", None)
        elif member == "Failure":
            self._log.event("browse_failed", "warning", stype=self._stype, error=args[0])

    def _item_new(self, key: ItemKey) -> None:
        item = self._items.get(key)
        if item is None:
            item = self._items[key] = _Item()
        item.stale = False
        if not item.objects and not item.tasks:
            task = self._spawn(self._resolve(key, item))
            item.tasks.add(task)
            task.add_done_callback(item.tasks.discard)

    def _item_remove(self, key: ItemKey) -> None:
        item = self._items.pop(key, None)
        if item is None:
            return
        for task in item.tasks:
            task.cancel()
        for path, iface in item.objects.items():
            self._bus.unregister(path)
            self._spawn(self._free(path, iface))
        self._sync(key[2:])

    def _drop_stale(self) -> None:
        for key in [k for k, item in self._items.items() if item.stale]:
            self._item_remove(key)

    # -- resolvers --------------------------------------------------------------------------

    async def _resolve(self, key: ItemKey, item: _Item) -> None:
        interface, protocol, name, stype, domain = key
        # aprotocol = the item's protocol: the address reached over the link it was seen on.
        resolver_args = (interface, protocol, name, stype, domain, protocol, 0)
        owner = f"{rdata.escape_label(name)}.{stype}.{domain}"
        txt_args = (interface, protocol, owner, rdata.CLASS_IN, rdata.TYPE_TXT, 0)
        delay = const.AVAHI_RECONNECT_DELAY
        while True:
            try:
                await self._create(
                    key, item, "ServiceResolver", signature=defs.SIG_SERVICE_RESOLVER_PREPARE,
                    args=resolver_args,
                    handler=lambda member, args: self._on_resolver_signal(key, member, args),
                )
                await self._create(
                    key, item, "RecordBrowser", signature=defs.SIG_RECORD_BROWSER_PREPARE,
                    args=txt_args,
                    handler=lambda member, args: self._on_txt_signal(key, member, args),
                )
            except AvahiError as err:
                # A busy daemon (a LAN powering on at once) or its object limit: try again,
                # never leave the peer unresolved for good. Item removal cancels this task.
                self._log.event("resolve_failed", "warning", name=name, error=str(err),
                                retry_in=delay)
                for path, iface in item.objects.items():
                    self._bus.unregister(path)
                    self._spawn(self._free(path, iface))
                item.objects.clear()
                if self._bus.state is None:
                    return  # the daemon left: a new browser's ItemNew resolves it again
            else:
                return
            await asyncio.sleep(delay)
            delay = min(2 * delay, const.AVAHI_RECONNECT_DELAY_MAX)

    async def _create(
        self, key: ItemKey, item: _Item, kind: str, *, signature: tuple[str, str],
        args: tuple[Any, ...], handler: Callable[[str, tuple[Any, ...]], None],
    ) -> None:
        """An Avahi object of kind for the item, kept in item.objects (so that removing the item
        frees it, even mid-start) and started; freed at once if the item went meanwhile."""
        iface = f"org.freedesktop.Avahi.{kind}"
        method, server = (f"{kind}New", defs.IFACE_SERVER) if self._legacy else (
            f"{kind}Prepare", defs.IFACE_SERVER2)
        (path,) = await self._bus.call(defs.SERVER_PATH, server, method, signature, args)
        if self._items.get(key) is not item:  # removed while we were creating it
            self._spawn(self._free(path, iface))
            return
        item.objects[path] = iface
        # avahi < 0.8 starts the object at creation; the bus replays signals that beat us here.
        self._bus.register(path, handler)
        if not self._legacy:
            await self._bus.call(path, iface, "Start")

    def _on_resolver_signal(self, key: ItemKey, member: str, args: tuple[Any, ...]) -> None:
        item = self._items.get(key)
        if item is None:
            return
        if member == "Found":
            iface, proto, name, stype, domain, host, _aproto, address, port, txt, flags = args
            item.failures = 0
            # Avahi builds its string list by prepending, so Found carries the TXT strings in
            # reverse wire order (measured against python-zeroconf in the lab); restore it, as
            # "first occurrence wins" for repeated keys (RFC 6763 §6.4) depends on the order.
            item.record = ServiceRecord(
                name=name, stype=stype, domain=domain, host=host, address=address, port=port,
                txt=tuple(bytes(t) for t in reversed(txt)), interface=iface, protocol=proto,
                local=bool(flags & defs.LookupResultFlags.LOCAL),
            )
            self._take_newest_txt(item)
            self._sync(key[2:])
        elif member == "Failure":
            # Typically a timeout: a cached PTR whose host no longer answers. Logged once; the
            # resolver keeps trying and a later Found revives the item.
            item.failures += 1
            if item.failures == 1:
                self._log.event("resolve_failed", "notice", name=key[2], error=args[0])

    def _on_txt_signal(self, key: ItemKey, member: str, args: tuple[Any, ...]) -> None:
        item = self._items.get(key)
        if item is None or member not in ("ItemNew", "ItemRemove"):
            return
        txt = bytes(args[5])
        if txt in item.txts:
            item.txts.remove(txt)
        if member == "ItemNew":
            item.txts.append(txt)
        if self._take_newest_txt(item):
            self._sync(key[2:])

    @staticmethod
    def _take_newest_txt(item: _Item) -> bool:
        """Give the item's record the newest TXT in the cache; True if that changed it."""
        if item.record is None or not item.txts:
            return False
        txt = split_txt(item.txts[-1])
        if txt == item.record.txt:
            return False
        item.record = replace(item.record, txt=txt)
        return True

    async def _free(self, path: str, interface: str) -> None:
        with contextlib.suppress(AvahiError):  # gone with its daemon already: nothing to free
            await self._bus.call(path, interface, "Free")

    # -- output -----------------------------------------------------------------------------

    def _sync(self, identity: Identity) -> None:
        resolved = [
            item for key, item in self._items.items()
            if key[2:] == identity and item.record is not None
        ]
        best = min(resolved, key=_preference).record if resolved else None
        previous = self._emitted.get(identity)
        if best is None:
            if previous is not None:
                del self._emitted[identity]
                self._emit("removed", previous)
        elif previous is None:
            self._emitted[identity] = best
            self._emit("added", best)
        elif best != previous:
            self._emitted[identity] = best
            self._emit("updated", best)

    def _emit(self, kind: EventKind, record: ServiceRecord | None) -> None:
        elapsed = (time.monotonic() - self._started) * 1000
        self._events.put_nowait(BrowseEvent(kind, record, elapsed))

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
