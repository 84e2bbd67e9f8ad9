"""The no-D-Bus path: static service file rendering and writing, round diffing, and both classes
against a fake wire (the seam is wire.live_round)."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import const
from agent.log import EventLog
from agent.mdns import fallback
from agent.mdns.fallback import (
    BrowseEvent,
    LiveBrowser,
    RoundState,
    ServiceFileError,
    StaticPublisher,
    diff_round,
    heard_name,
    remove_file,
    render_service_file,
    to_service_record,
    write_atomically,
)
from agent.mdns.records import Advertisement, ServiceRecord
from agent.mdns.wire import LiveRecord, WireError

K3S = "_k3s-sugar-dev._tcp"
NAME = "k3s-sugar-dev@node1.local (server)"
TXT = (b"k3s=1", b"cluster=sugar", b"env=dev", b"role=server")
ADVERT = Advertisement(NAME, (K3S, const.HTTPS_SERVICE_TYPE), 6443, TXT)

# Characters XML 1.0 can carry (§2.2), surrogates excluded (they are not UTF-8 either).
xml_chars = st.characters(blacklist_categories=("Cs",)).filter(fallback._xml_allowed)


def parsed(text: str) -> tuple[str, list[tuple[str, int, list[str]]]]:
    """(name, [(type, port, txt strings)]) as an XML parser reads a rendered service file."""
    root = ET.fromstring(text.split("\n", 2)[2])  # past the declaration and the DOCTYPE
    name = root.find("name")
    assert name is not None and name.get("replace-wildcards") == "no"
    services = [
        (s.findtext("type", ""), int(s.findtext("port", "0")),
         [t.text or "" for t in s.findall("txt-record")])
        for s in root.findall("service")
    ]  # fmt: skip
    return name.text or "", services


def test_the_fallback_never_loads_dbus_or_glib() -> None:
    code = "import sys, agent.mdns.fallback; print(sorted({'pydbus', 'gi'} & set(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"


def test_its_browse_event_is_the_browsers() -> None:
    with warnings.catch_warnings():  # gi's importer warns under Python 3.11; not ours to fix
        warnings.simplefilter("ignore", ImportWarning)
        from agent.avahi import browser
    assert BrowseEvent is browser.BrowseEvent  # one type, from agent.mdns.records


# -- rendering ------------------------------------------------------------------------------------


def test_render_publishes_the_name_under_both_types_with_txt_in_order() -> None:
    name, services = parsed(render_service_file(ADVERT))
    txt = [t.decode() for t in TXT]
    assert name == NAME
    assert services == [(K3S, 6443, txt), (const.HTTPS_SERVICE_TYPE, 6443, txt)]


def test_render_escapes_markup_and_keeps_whitespace_exact() -> None:
    txt = (b'note=a&b <c> "d" ]]>', b"tabs=\t|\r\n|", b"empty=", b"")
    text = render_service_file(Advertisement('a<b>&"c" #1', (K3S,), 6443, txt))
    assert "<c>" not in text and "\r" not in text and "\t" not in text
    name, [(_, _, strings)] = parsed(text)
    assert name == 'a<b>&"c" #1'
    assert strings == [t.decode() for t in txt]


@given(st.text(xml_chars, min_size=1, max_size=63), st.lists(st.text(xml_chars, max_size=60)))
def test_render_round_trips_any_xml_text(name: str, strings: list[str]) -> None:
    txt = tuple(s.encode() for s in strings)
    got_name, services = parsed(render_service_file(Advertisement(name, (K3S,), 1, txt)))
    assert (got_name, services) == (name, [(K3S, 1, strings)])


@given(st.binary(min_size=1, max_size=40).filter(lambda b: not _is_utf8(b)))
def test_render_refuses_txt_that_is_not_utf8(item: bytes) -> None:
    with pytest.raises(ServiceFileError, match="not UTF-8"):
        render_service_file(Advertisement(NAME, (K3S,), 6443, (b"k3s=1", item)))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("bad", ["\x00", "\x01", "\x0b", "\x1f", "\ufffe", "\uffff"])
def test_render_refuses_characters_xml_cannot_carry(bad: str) -> None:
    with pytest.raises(ServiceFileError, match="XML service file cannot carry"):
        render_service_file(Advertisement(NAME, (K3S,), 6443, (f"x={bad}".encode(),)))
    with pytest.raises(ServiceFileError):
        render_service_file(Advertisement(f"n{bad}", (K3S,), 6443, ()))


@pytest.mark.parametrize(
    "advert", [Advertisement(NAME, (), 6443, ()), Advertisement(NAME, (K3S,), 0, ()),
               Advertisement(NAME, (K3S,), 65536, ())],
)  # fmt: skip
def test_render_refuses_an_advert_without_type_or_port(advert: Advertisement) -> None:
    with pytest.raises(ServiceFileError):
        render_service_file(advert)


# -- writing --------------------------------------------------------------------------------------


def test_write_is_0644_whatever_the_umask_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "sugarkube.service"
    old = os.umask(0o077)
    try:
        assert write_atomically(path, "one\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_text() == "one\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sugarkube.service"]


def test_write_replaces_by_rename_and_skips_an_identical_file(tmp_path: Path) -> None:
    path = tmp_path / "sugarkube.service"
    write_atomically(path, "one\n")
    before = path.stat().st_ino
    assert not write_atomically(path, "one\n")  # unchanged: avahi-daemon need not reload
    assert path.stat().st_ino == before
    assert write_atomically(path, "two\n")
    assert path.stat().st_ino != before  # a new inode renamed over the old: never half-written
    assert path.read_text() == "two\n"


def test_write_fixes_a_wrong_mode_even_when_the_text_is_equal(tmp_path: Path) -> None:
    path = tmp_path / "sugarkube.service"
    path.write_text("one\n")
    path.chmod(0o600)
    assert write_atomically(path, "one\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sugarkube.service"
    write_atomically(path, "one\n")

    def fail(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fallback.os, "replace", fail)
    with pytest.raises(OSError):
        write_atomically(path, "two\n")
    assert path.read_text() == "one\n"
    assert [p.name for p in tmp_path.iterdir()] == ["sugarkube.service"]


def test_remove_says_whether_the_file_was_there(tmp_path: Path) -> None:
    path = tmp_path / "sugarkube.service"
    path.write_text("x")
    assert remove_file(path)
    assert not path.exists()
    assert not remove_file(path)


# -- hearing our own advert -----------------------------------------------------------------------


def live(name: str = NAME, txt: tuple[bytes, ...] = TXT, host: str = "node1.local",
         addresses: tuple[str, ...] = ("10.0.0.1",), port: int = 6443) -> LiveRecord:  # fmt: skip
    return LiveRecord(name, K3S, host, port, txt, addresses)


def test_heard_name_is_ours_or_avahis_alternative_with_our_txt() -> None:
    assert heard_name([live()], ADVERT) == NAME
    assert heard_name([live("other"), live(f"{NAME} #2")], ADVERT) == f"{NAME} #2"
    assert heard_name([live(txt=TXT[:-1])], ADVERT) is None  # the old TXT: not yet reloaded
    assert heard_name([live(f"{NAME} #x"), live(f"{NAME}x")], ADVERT) is None
    assert heard_name([], ADVERT) is None


# -- round diffing --------------------------------------------------------------------------------


def test_to_service_record_needs_srv_txt_and_address_and_knows_our_host() -> None:
    record = to_service_record(live(host="Node1.LOCAL."), "node1.local")
    assert record == ServiceRecord(
        name=NAME,
        stype=K3S,
        domain="local",
        host="Node1.LOCAL.",
        address="10.0.0.1",
        port=6443,
        txt=TXT,
        interface=-1,
        protocol=-1,
        local=True,
    )
    assert to_service_record(live(), "node2.local") is not None
    assert not to_service_record(live(), "node2.local").local  # type: ignore[union-attr]
    for partial in (live(host="", port=0), live(txt=()), live(addresses=())):
        assert to_service_record(partial, "node2.local") is None


def test_one_lost_answer_does_not_flap_and_two_remove() -> None:
    state = RoundState(own_host="node2.local", started=10.0)
    state, events = diff_round(state, [live()], 11.0)
    assert [e.kind for e in events] == ["added", "all_for_now"]
    assert events[0].ms_elapsed == pytest.approx(1000.0)
    state, events = diff_round(state, [], 12.0)
    assert events == []
    state, events = diff_round(state, [live()], 13.0)
    assert events == []
    state, _ = diff_round(state, [], 14.0)
    state, events = diff_round(state, [], 15.0)
    assert [(e.kind, e.record and e.record.name) for e in events] == [("removed", NAME)]
    assert state.emitted == {} and state.missed == {}


def test_a_partial_answer_keeps_a_record_present_but_adds_nothing() -> None:
    state = RoundState(own_host="node2.local", started=0.0)
    state, events = diff_round(state, [live(txt=())], 1.0)
    assert [e.kind for e in events] == ["all_for_now"]
    state, _ = diff_round(state, [live()], 2.0)
    for now in (3.0, 4.0, 5.0):
        state, events = diff_round(state, [live(addresses=())], now)
        assert events == []
    assert [r.name for r in state.emitted.values()] == [NAME]


def test_a_changed_txt_is_an_update() -> None:
    state, _ = diff_round(RoundState(own_host="n", started=0.0), [live()], 1.0)
    state, events = diff_round(state, [live(txt=(*TXT, b"phase=2"))], 2.0)
    assert [(e.kind, e.record and e.record.txt[-1]) for e in events] == [("updated", b"phase=2")]


# A small universe so that rounds repeat names, change TXT and lose parts.
round_records = st.lists(
    st.builds(
        live,
        name=st.sampled_from(["a", "b", "c"]),
        txt=st.sampled_from([TXT, (b"k3s=1",), ()]),
        host=st.sampled_from(["node1.local", "node2.local", ""]),
        addresses=st.sampled_from([("10.0.0.1",), ("10.0.0.2", "fe80::1"), ()]),
    ),
    max_size=4,
)


@settings(max_examples=300)
@given(st.lists(round_records, min_size=1, max_size=12))
def test_round_diff_events_replay_to_its_state(rounds: list[list[LiveRecord]]) -> None:
    state = RoundState(own_host="node2.local", started=100.0)
    replayed: dict[tuple[str, str, str], ServiceRecord] = {}
    absent: dict[tuple[str, str, str], int] = {}  # consecutive rounds without the name at all
    for index, records in enumerate(rounds):
        now = 101.0 + index
        state, events = diff_round(state, records, now)
        kinds = [e.kind for e in events]
        assert kinds.count("all_for_now") == (1 if index == 0 else 0)
        if index == 0:
            assert kinds[-1] == "all_for_now"
        assert all(e.ms_elapsed == pytest.approx((now - 100.0) * 1000) for e in events)
        first = {}
        for live_record in records:
            first.setdefault((live_record.name, K3S, "local"), live_record)
        for identity in {*replayed, *first}:
            absent[identity] = 0 if identity in first else absent.get(identity, 0) + 1
        for event in events:
            if event.kind == "all_for_now":
                assert event.record is None
                continue
            assert event.record is not None
            key = event.record.key
            if event.kind == "removed":
                assert absent[key] == const.FALLBACK_BROWSE_MISSES
                assert replayed.pop(key) == event.record
            else:
                assert (key in replayed) == (event.kind == "updated")
                assert event.record == to_service_record(first[key], "node2.local")
                assert replayed.get(key) != event.record
                replayed[key] = event.record
        assert dict(state.emitted) == replayed
        for identity, record in first.items():
            complete = to_service_record(record, "node2.local")
            if complete is not None:
                assert state.emitted[identity] == complete
        for identity in state.emitted:
            assert absent[identity] < const.FALLBACK_BROWSE_MISSES


# -- the classes against a fake wire --------------------------------------------------------------


class FakeWire:
    """wire.live_round's stand-in: returns what `answer()` gives, counting rounds."""

    def __init__(self, answer: Callable[[], list[LiveRecord] | Exception]) -> None:
        self.answer = answer
        self.rounds: list[tuple[str, str]] = []

    async def live_round(self, stype: str, *, interface_addr: str, **_: Any) -> list[LiveRecord]:
        self.rounds.append((stype, interface_addr))
        await asyncio.sleep(0.01)
        result = self.answer()
        if isinstance(result, Exception):
            raise result
        return result


@pytest.fixture
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(const, "FALLBACK_CONFIRM_RETRY", 0.01)
    monkeypatch.setattr(const, "AVAHI_RECONNECT_DELAY", 0.01)


def wire_of(monkeypatch: pytest.MonkeyPatch, answer: Callable[[], Any]) -> FakeWire:
    fake = FakeWire(answer)
    monkeypatch.setattr(fallback.wire, "live_round", fake.live_round)
    return fake


def text_file(tmp_path: Path) -> str:
    return (tmp_path / "sugarkube.service").read_text()


@pytest.mark.usefixtures("fast")
def test_publisher_writes_then_confirms_on_the_wire_then_withdraws(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    heard: list[LiveRecord] = []
    fake = wire_of(monkeypatch, lambda: list(heard))
    out = io.StringIO()
    names: list[str] = []

    async def main() -> None:
        pub = StaticPublisher(EventLog(out), tmp_path, interface_addr="10.0.0.1")
        pub.on_established = names.append
        task = asyncio.get_running_loop().create_task(pub.run())
        pub.set(ADVERT)
        assert pub.name == NAME
        assert await pub.settled(1)
        assert parsed(text_file(tmp_path))[0] == NAME
        await asyncio.sleep(0.1)
        assert not pub.established.is_set()  # written is not published: nothing heard yet
        heard.append(live(f"{NAME} #2"))  # Avahi renamed it after a collision
        await asyncio.wait_for(pub.established.wait(), 1)
        assert (pub.name, names) == (f"{NAME} #2", [f"{NAME} #2"])
        assert await pub.withdraw(1)
        assert not (tmp_path / "sugarkube.service").exists()
        task.cancel()
        await asyncio.wait([task])

    asyncio.run(main())
    assert fake.rounds[0] == (K3S, "10.0.0.1")
    assert "event=advert_renamed" in out.getvalue()
    assert f'event=advert_withdrawn name="{NAME}"' in out.getvalue()
    # The long wait was logged at rounds 1, 2, 4, 8...: a bounded number of lines.
    unconfirmed = out.getvalue().count("event=advert_unconfirmed")
    assert 0 < unconfirmed <= len(fake.rounds).bit_length()


@pytest.mark.usefixtures("fast")
def test_publisher_refuses_non_utf8_txt_with_one_clear_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wire_of(monkeypatch, list)
    out = io.StringIO()

    async def main() -> None:
        pub = StaticPublisher(EventLog(out), tmp_path, interface_addr="10.0.0.1")
        task = asyncio.get_running_loop().create_task(pub.run())
        pub.set(Advertisement(NAME, (K3S,), 6443, (b"host=\xff",)))
        assert not await pub.settled(0.2)
        task.cancel()
        await asyncio.wait([task])

    asyncio.run(main())
    assert out.getvalue().count("event=advert_refused") == 1
    assert "not UTF-8" in out.getvalue()
    assert not (tmp_path / "sugarkube.service").exists()


@pytest.mark.usefixtures("fast")
def test_publisher_retries_an_unwritable_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wire_of(monkeypatch, lambda: [live()])
    services = tmp_path / "services"  # missing at first, as before avahi-daemon is installed
    out = io.StringIO()

    async def main() -> None:
        pub = StaticPublisher(EventLog(out), services, interface_addr="10.0.0.1")
        task = asyncio.get_running_loop().create_task(pub.run())
        pub.set(ADVERT)
        assert not await pub.settled(0.05)
        services.mkdir()
        await asyncio.wait_for(pub.established.wait(), 1)
        task.cancel()
        await asyncio.wait([task])

    asyncio.run(main())
    assert "event=advert_error" in out.getvalue()
    assert stat.S_IMODE((services / "sugarkube.service").stat().st_mode) == 0o644


def test_browser_turns_rounds_into_events_and_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    script: list[list[LiveRecord] | Exception] = [
        [],
        [live()],
        WireError("no sockets"),
        WireError("no sockets"),
        [],
        [live()],
        [],
        [],
    ]
    fake = wire_of(monkeypatch, lambda: script.pop(0) if script else [])
    out = io.StringIO()

    async def main() -> list[BrowseEvent]:
        events = []
        async with LiveBrowser(K3S, EventLog(out), interface_addr="10.0.0.2", every=0) as browser:
            async for event in browser:
                events.append(event)
                if event.kind == "removed":
                    assert browser.records == []
                    break
                if event.kind == "added":
                    assert [r.name for r in browser.records] == [NAME]
        return events

    events = asyncio.run(main())
    assert [e.kind for e in events] == ["all_for_now", "added", "removed"]
    # Failed rounds are no evidence: [live()], fail, fail, [], [live()] keeps it; [], [] removes.
    assert len(fake.rounds) == 8
    assert out.getvalue().count("event=browse_failed") == 1
    assert out.getvalue().count("event=browse_resumed") == 1


def test_browser_hands_an_unexpected_error_to_the_consumer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wire_of(monkeypatch, lambda: RuntimeError("bug"))

    async def main() -> None:
        async with LiveBrowser(K3S, EventLog(io.StringIO()), interface_addr="10.0.0.2") as browser:
            with pytest.raises(RuntimeError, match="bug"):
                await asyncio.wait_for(anext(browser), 1)

    asyncio.run(main())


def test_browser_close_does_not_swallow_its_callers_cancellation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wire_of(monkeypatch, list)

    async def consumer(started: asyncio.Event) -> None:
        async with LiveBrowser(K3S, EventLog(io.StringIO()), interface_addr="10.0.0.2") as browser:
            started.set()
            async for _ in browser:
                pass

    async def main() -> None:
        started = asyncio.Event()
        task = asyncio.get_running_loop().create_task(consumer(started))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1)

    asyncio.run(main())
