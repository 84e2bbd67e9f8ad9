"""The no-D-Bus path (SUGARKUBE_MDNS_DBUS=0): a static Avahi service file, and live rounds.

StaticPublisher and LiveBrowser are drop-in replacements for avahi.publisher.Publisher and
avahi.browser.Browser with the same public surface, touching neither D-Bus nor GLib.

Publishing writes one static service file (avahi.service(5)) atomically; avahi-daemon watches its
services directory with inotify (avahi-daemon/main.c, also under chroot) and registers, renames on
a collision, re-announces or withdraws (with goodbyes) on its own. Nothing reports "established"
without the bus, so it is confirmed on the wire: a live round that hears our instance with our TXT.

Browsing diffs back-to-back live rounds into the Browser's events. A round is a fresh question to
the wire, so one lost answer would look like a departure: a record is removed only once it is
missing from FALLBACK_BROWSE_MISSES consecutive rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, TracebackType

from agent import const
from agent.log import EventLog
from agent.mdns import wire
from agent.mdns.records import Advertisement, BrowseEvent, EventKind, Identity, ServiceRecord
from agent.mdns.wanted import WantedAdvert
from agent.mdns.wire import LiveRecord, WireError

SERVICE_FILE_NAME = "sugarkube.service"
_XML_ESCAPES = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    '"': "&quot;",
    "\t": "&#9;",
    "\n": "&#10;",
    "\r": "&#13;",
}  # whitespace as references: parsers normalize it


class ServiceFileError(ValueError):
    """An advert a static service file cannot express, or a file we cannot write. One line."""


def _xml_allowed(char: str) -> bool:
    """Whether char may appear in an XML 1.0 document at all, even as a reference (§2.2)."""
    code = ord(char)
    return (
        code in (0x9, 0xA, 0xD)
        or 0x20 <= code <= 0xD7FF
        or 0xE000 <= code <= 0xFFFD
        or 0x10000 <= code <= 0x10FFFF
    )


def _xml_text(what: str, text: str) -> str:
    """Text escaped for XML character data; ServiceFileError for what XML 1.0 cannot carry."""
    bad = next((c for c in text if not _xml_allowed(c)), None)
    if bad is not None:
        raise ServiceFileError(
            f"{what} {text[:40]!r} holds U+{ord(bad):04X}, which an XML service file cannot carry"
        )
    return "".join(_XML_ESCAPES.get(c, c) for c in text)


def _txt_text(item: bytes) -> str:
    """One TXT string as text; ServiceFileError when it is not UTF-8."""
    try:
        return item.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ServiceFileError(
            f"TXT string {item[:40]!r} is not UTF-8: a static Avahi service file cannot carry it "
            "(use the D-Bus path, SUGARKUBE_MDNS_DBUS=1)"
        ) from err


def render_service_file(advert: Advertisement) -> str:
    """avahi.service(5) XML publishing advert's name under each of its types, TXT in order."""
    if not advert.stypes:
        raise ServiceFileError(f"advert {advert.name!r} has no service type")
    if not 0 < advert.port <= 0xFFFF:
        raise ServiceFileError(f"port {advert.port} is not a TCP port")
    name = _xml_text("instance name", advert.name)
    txt = [_xml_text("TXT string", _txt_text(item)) for item in advert.txt]
    lines = [
        '<?xml version="1.0" standalone="no"?>',
        '<!DOCTYPE service-group SYSTEM "avahi-service.dtd">',
        "<!-- written by sugarkube-agent (SUGARKUBE_MDNS_DBUS=0); it removes it at shutdown -->",
        "<service-group>",
        f'  <name replace-wildcards="no">{name}</name>',
    ]
    for stype in advert.stypes:
        lines += [
            "  <service>",
            f"    <type>{_xml_text('service type', stype)}</type>",
            f"    <port>{advert.port}</port>",
            # Avahi publishes <txt-record>s in file order (checked on the wire in the lab).
            *(f"    <txt-record>{item}</txt-record>" for item in txt),
            "  </service>",
        ]
    lines.append("</service-group>")
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str, mode: int = const.FALLBACK_SERVICE_FILE_MODE) -> bool:
    """Make path hold text with mode (temp file, fsync, rename, fsync dir); False if it did."""
    with contextlib.suppress(OSError):
        if path.read_text(encoding="utf-8") == text and path.stat().st_mode & 0o7777 == mode:
            return False
    # The temp name does not end in ".service": avahi-daemon loads only "*.service" files.
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            os.fchmod(stream.fileno(), mode)  # mkstemp makes 0600; avahi-daemon reads as its user
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    _fsync_dir(path.parent)
    return True


def remove_file(path: Path) -> bool:
    """Remove path (and make it durable); False if it was not there."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def heard_name(records: Sequence[LiveRecord], advert: Advertisement) -> str | None:
    """The name under which a round heard advert with its TXT: its own or Avahi's "<name> #N"."""
    for record in records:
        if record.txt != advert.txt:
            continue
        if record.name == advert.name:
            return record.name
        base, sep, number = record.name.rpartition(" #")
        if sep and base == advert.name and number.isdigit():
            return record.name
    return None


class StaticPublisher(WantedAdvert):
    """Keeps the static service file equal to the wanted Advertisement (or absent)."""

    def __init__(
        self,
        log: EventLog,
        services_dir: Path = Path("/etc/avahi/services"),
        *,
        interface_addr: str,
    ) -> None:
        super().__init__()
        self._log = log
        self._path = services_dir / SERVICE_FILE_NAME
        self._interface_addr = interface_addr
        self._written: str | None = None  # the instance name in the file, for the log

    def set(self, advert: Advertisement | None) -> None:
        """Want advert published (None: withdrawn); established again once a round hears it."""
        if advert != self._wanted:
            self._lost()
        super().set(advert)

    async def run(self) -> None:
        """Reconcile until cancelled."""
        while True:
            await self._kick.wait()
            self._kick.clear()
            wanted = self._wanted
            try:
                await self._reconcile(wanted)
            except ServiceFileError as err:
                # Retrying cannot help: the advert itself is unfit. The next set() tries again.
                self._log.event("advert_refused", "error", name=self._name, error=str(err))
            except OSError as err:
                self._log.event(
                    "advert_error", "warning", path=str(self._path), error=err.strerror or str(err)
                )
                asyncio.get_running_loop().call_later(const.AVAHI_RECONNECT_DELAY, self._kick.set)

    async def _reconcile(self, wanted: Advertisement | None) -> None:
        if wanted is None:
            if await asyncio.to_thread(remove_file, self._path):
                self._log.event("advert_withdrawn", name=self._written, path=str(self._path))
            self._written = None
            self._synced.set()
            return
        text = render_service_file(wanted)
        written_at = time.monotonic()
        if await asyncio.to_thread(write_atomically, self._path, text):
            self._log.event("advert_written", name=wanted.name, path=str(self._path))
        self._written = wanted.name
        self._synced.set()
        await self._confirm(wanted, written_at)

    async def _confirm(self, wanted: Advertisement, since: float) -> None:
        """Live rounds until one hears wanted, or a new wish arrives."""
        misses = 0
        while not self._kick.is_set():
            try:
                records = await wire.live_round(
                    wanted.stypes[0], interface_addr=self._interface_addr
                )
            except WireError as err:
                records = []
                error: str | None = str(err)
            else:
                error = None
            if self._kick.is_set():
                return  # the wish changed during the round: what it heard is stale
            name = heard_name(records, wanted)
            if name is not None:
                if name != wanted.name:
                    self._log.event("advert_renamed", "notice", name=wanted.name, alternative=name)
                self._name = name
                self.established.set()
                elapsed = (time.monotonic() - since) * 1000
                self._log.event("advert_published", name=name, ms_elapsed=round(elapsed))
                if self.on_established is not None:
                    self.on_established(name)
                return
            misses += 1
            if misses & (misses - 1) == 0:  # 1, 2, 4, 8...: bounded logging of a long wait
                self._log.event(
                    "advert_unconfirmed", "notice", name=wanted.name, rounds=misses, error=error
                )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(const.FALLBACK_CONFIRM_RETRY):
                    await self._kick.wait()


# -- browsing -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoundState:
    """What the round diff knows: records emitted and how many rounds each was last missing."""

    own_host: str  # our "<hostname>.local", for ServiceRecord.local
    started: float  # monotonic s the browser started; events' ms_elapsed counts from it
    rounds: int = 0
    emitted: Mapping[Identity, ServiceRecord] = field(default_factory=lambda: MappingProxyType({}))
    missed: Mapping[Identity, int] = field(default_factory=lambda: MappingProxyType({}))


def _fold(name: str) -> str:
    return name.rstrip(".").lower()


def to_service_record(record: LiveRecord, own_host: str) -> ServiceRecord | None:
    """A round's record as the Browser would emit it; None until SRV, TXT and address came."""
    if not (record.host and record.port and record.txt and record.addresses):
        return None
    return ServiceRecord(
        name=record.name,
        stype=record.stype,
        domain="local",
        host=record.host,
        address=record.addresses[0],
        port=record.port,
        txt=record.txt,
        interface=-1,
        protocol=-1,
        local=_fold(record.host) == _fold(own_host),
    )


def diff_round(
    state: RoundState, records: Sequence[LiveRecord], now: float
) -> tuple[RoundState, list[BrowseEvent]]:
    """Fold one round's records into state; the events a Browser would have emitted.

    A record heard without all its parts keeps a known record present but is not added. One
    missing from FALLBACK_BROWSE_MISSES consecutive rounds is removed; all_for_now follows the
    first round.
    """
    ms = (now - state.started) * 1000
    emitted = dict(state.emitted)
    missed = dict(state.missed)
    events: list[BrowseEvent] = []
    heard: set[Identity] = set()

    def emit(kind: EventKind, record: ServiceRecord | None) -> None:
        events.append(BrowseEvent(kind, record, ms))

    for live in records:
        identity = (live.name, live.stype, "local")
        if identity in heard:
            continue
        heard.add(identity)
        missed.pop(identity, None)
        record = to_service_record(live, state.own_host)
        previous = emitted.get(identity)
        if record is None or record == previous:
            continue
        emitted[identity] = record
        emit("added" if previous is None else "updated", record)
    for identity in [i for i in emitted if i not in heard]:
        missed[identity] = missed.get(identity, 0) + 1
        if missed[identity] >= const.FALLBACK_BROWSE_MISSES:
            del missed[identity]
            emit("removed", emitted.pop(identity))
    if state.rounds == 0:
        emit("all_for_now", None)
    return (
        RoundState(
            own_host=state.own_host,
            started=state.started,
            rounds=state.rounds + 1,
            emitted=MappingProxyType(emitted),
            missed=MappingProxyType(missed),
        ),
        events,
    )


class LiveBrowser:
    """Browse one service type with live rounds; iterate for BrowseEvents. Async context manager."""

    def __init__(
        self,
        stype: str,
        log: EventLog,
        *,
        interface_addr: str,
        every: float = const.FALLBACK_BROWSE_INTERVAL,
    ) -> None:
        self._stype = stype
        self._log = log
        self._interface_addr = interface_addr
        self._every = every
        self._state = RoundState(own_host=f"{socket.gethostname()}.local", started=0.0)
        self._events: asyncio.Queue[BrowseEvent | BaseException] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    @property
    def records(self) -> list[ServiceRecord]:
        """The records currently seen, one per advert."""
        return list(self._state.emitted.values())

    async def __aenter__(self) -> LiveBrowser:
        self._state = RoundState(own_host=self._state.own_host, started=time.monotonic())
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def __aiter__(self) -> LiveBrowser:
        return self

    async def __anext__(self) -> BrowseEvent:
        item = await self._events.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        """Stop the rounds; the one in flight closes its sockets before this returns."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])  # not `await task`: our own cancellation must propagate

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failing = False
        try:
            while True:
                started = loop.time()
                try:
                    records = await wire.live_round(
                        self._stype, interface_addr=self._interface_addr
                    )
                except WireError as err:
                    if not failing:  # once per outage: a failed round is no evidence either way
                        self._log.event(
                            "browse_failed", "warning", stype=self._stype, error=str(err)
                        )
                    failing = True
                else:
                    if failing:
                        self._log.event("browse_resumed", stype=self._stype)
                    failing = False
                    self._state, events = diff_round(self._state, records, time.monotonic())
                    for event in events:
                        self._events.put_nowait(event)
                await asyncio.sleep(max(0.0, started + self._every - loop.time()))
        except Exception as err:  # handed to the consumer, who would otherwise wait forever
            self._events.put_nowait(err)
