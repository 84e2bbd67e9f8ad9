"""Live-round parts that need no network: packets to LiveRecords, follow-up questions, adverts."""

from __future__ import annotations

import asyncio
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from zeroconf._dns import DNSQuestion, DNSRecord
from zeroconf._protocol.incoming import DNSIncoming

from agent import const
from agent.cluster.view import NodeAdvert, to_node_adverts
from agent.mdns.records import Role, split_txt
from agent.mdns.wire import (
    LiveRecord,
    RoundCollector,
    WireError,
    _query,
    live_round,
)

STYPE = "_k3s-sugar-dev._tcp"
NODE1 = "k3s-sugar-dev@node1.local (server)"  # one DNS label holding dots, as Avahi sends it
TXT = (b"k3s=1", b"cluster=sugar", b"env=dev", b"role=server")
FLUSH = 0x8000  # cache-flush bit of a unique record's class (RFC 6762 §10.2)
A, PTR, HINFO, TXT_TYPE, AAAA, SRV = 1, 12, 13, 16, 28, 33


# --- raw packets, built label by label as avahi-daemon sends them ----------------------------


def name(*labels: str) -> bytes:
    """A DNS name from its labels (a label may hold dots), uncompressed."""
    return b"".join(bytes([len(raw)]) + raw for raw in (lab.encode() for lab in labels)) + b"\0"


def instance(label: str, stype: str = STYPE) -> bytes:
    return name(label, *stype.split("."), "local")


def rr(owner: bytes, rtype: int, rdata: bytes, ttl: int = 120, flush: bool = True) -> bytes:
    klass = 1 | (FLUSH if flush else 0)
    return owner + struct.pack("!HHIH", rtype, klass, ttl, len(rdata)) + rdata


def txt_rdata(*items: bytes) -> bytes:
    return b"".join(bytes([len(item)]) + item for item in items)


def srv_rdata(target: bytes, port: int = 6443) -> bytes:
    return struct.pack("!HHH", 0, 0, port) + target


def response(answers: list[bytes], additional: tuple[bytes, ...] | list[bytes] = ()) -> bytes:
    header = struct.pack("!HHHHHH", 0, 0x8400, 0, len(answers), 0, len(additional))
    return header + b"".join(answers) + b"".join(additional)


def avahi_answer(label: str = NODE1, host: str = "node1", ip4: bytes = bytes([10, 0, 0, 1]),
                 txt: tuple[bytes, ...] = TXT, ttl: int = 120) -> bytes:
    """What avahi-daemon multicasts for a PTR question: PTR, then SRV, TXT, A, AAAA."""
    target = name(host, "local")
    return response(
        [rr(name(*STYPE.split("."), "local"), PTR, instance(label), ttl, flush=False)],
        [
            rr(instance(label), SRV, srv_rdata(target), ttl),
            rr(instance(label), TXT_TYPE, txt_rdata(*txt), ttl),
            rr(target, AAAA, bytes.fromhex("fe800000000000000000000000000001"), ttl),
            rr(target, A, ip4, ttl),
        ],
    )


def parsed(packet: bytes) -> list[DNSRecord]:
    """The records zeroconf hands a listener for this packet."""
    return list(DNSIncoming(packet).answers)


def collect(*packets: bytes, stype: str = STYPE) -> RoundCollector:
    collector = RoundCollector(stype)
    for packet in packets:
        for record in parsed(packet):
            collector.add(record)
    return collector


# --- TXT rdata -----------------------------------------------------------------------------------


def test_split_txt_keeps_wire_order_and_drops_a_string_cut_short() -> None:
    assert split_txt(txt_rdata(*TXT)) == TXT
    assert split_txt(b"") == ()
    assert split_txt(b"\x00") == (b"",)  # RFC 6763 §6.1: the empty TXT record
    assert split_txt(b"\x05k3s=1\x09cut") == (b"k3s=1",)


@given(st.lists(st.binary(max_size=255), max_size=20))
def test_split_txt_reads_back_any_strings(items: list[bytes]) -> None:
    assert split_txt(txt_rdata(*items)) == tuple(items)


@given(st.binary(max_size=600))
def test_split_txt_of_any_bytes_is_a_prefix_of_them(data: bytes) -> None:
    items = split_txt(data)
    assert data.startswith(txt_rdata(*items))


# --- what a round makes of responses -------------------------------------------------------------


def test_an_avahi_answer_gives_host_port_txt_in_order_and_ipv4_first() -> None:
    records = collect(avahi_answer()).records()
    assert records == [
        LiveRecord(
            name=NODE1, stype=STYPE, host="node1.local", port=6443, txt=TXT,
            addresses=("10.0.0.1", "fe80::1"),
        )
    ]


def test_type_and_names_compare_case_insensitively_in_ascii() -> None:
    packet = avahi_answer().replace(b"_k3s-sugar-dev", b"_K3S-Sugar-DEV").replace(
        b"\x05node1", b"\x05NODE1"
    )
    (record,) = collect(packet).records()
    assert (record.name, record.host, record.port, record.txt) == (NODE1, "NODE1.local", 6443, TXT)
    assert record.addresses[0] == "10.0.0.1"


def test_other_types_and_pointers_outside_the_type_are_ignored() -> None:
    other = response([rr(name("_http", "_tcp", "local"), PTR, instance("web", "_http._tcp"))])
    stray = response([rr(name(*STYPE.split("."), "local"), PTR, name("elsewhere", "local"))])
    bare = response([rr(name(*STYPE.split("."), "local"), PTR, name(*STYPE.split("."), "local"))])
    assert collect(other, stray, bare).records() == []


def test_srv_or_txt_of_an_instance_counts_without_its_ptr() -> None:
    # Another node resolving the instance makes avahi multicast its SRV and TXT, no PTR.
    packet = response([rr(instance(NODE1), TXT_TYPE, txt_rdata(*TXT))])
    (record,) = collect(packet).records()
    assert (record.name, record.txt, record.host, record.port) == (NODE1, TXT, "", 0)


def test_a_goodbye_in_the_round_removes_the_instance() -> None:
    assert collect(avahi_answer(), avahi_answer(ttl=0)).records() == []


def test_instances_come_in_the_order_first_heard_and_once() -> None:
    two = avahi_answer("k3s-sugar-dev@node3.local (server)", "node3", bytes([10, 0, 0, 3]))
    records = collect(avahi_answer(), two, avahi_answer()).records()
    assert [(r.name, r.addresses[0]) for r in records] == [
        (NODE1, "10.0.0.1"), ("k3s-sugar-dev@node3.local (server)", "10.0.0.3"),
    ]


def test_a_later_txt_replaces_the_earlier_one() -> None:
    changed = (*TXT[:3], b"role=candidate")
    later = response([rr(instance(NODE1), TXT_TYPE, txt_rdata(*changed))])
    (record,) = collect(avahi_answer(), later).records()
    assert record.txt == changed


def test_missing_asks_srv_and_txt_then_the_target_address() -> None:
    ptr_only = response([rr(name(*STYPE.split("."), "local"), PTR, instance(NODE1), flush=False)])
    collector = collect(ptr_only)
    asked = [(q.name, q.type) for q in collector.missing()]
    full = f"{NODE1}.{STYPE}.local."
    assert asked == [(full, SRV), (full, TXT_TYPE)]
    srv = response([rr(instance(NODE1), SRV, srv_rdata(name("node1", "local")))])
    for record in parsed(srv):
        collector.add(record)
    asked = [(q.name, q.type) for q in collector.missing()]
    assert asked == [("node1.local.", A), (full, TXT_TYPE)]
    assert collect(avahi_answer()).missing() == []


def test_the_round_keeps_at_most_max_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(const, "LIVE_ROUND_MAX_NAMES", 2)
    packets = [avahi_answer(f"n{i}", f"h{i}", bytes([10, 0, 0, i])) for i in range(5)]
    assert [r.name for r in collect(*packets).records()] == ["n0", "n1"]


def test_queries_ask_qu_questions_with_no_known_answers() -> None:
    collector = RoundCollector(STYPE)
    question = DNSQuestion(collector.ptr_name, PTR, 1)
    (packet,) = _query([question]).packets()
    assert packet[-4:] == struct.pack("!HH", PTR, 0x8001)  # QU bit: RFC 6762 §5.4
    incoming = DNSIncoming(packet)
    assert incoming.is_query() and incoming.num_answers == 0
    assert [(q.name, q.unicast) for q in incoming.questions] == [(f"{STYPE}.local.", True)]


# --- junk never breaks a round --------------------------------------------------------------------


def _records_or_none(data: bytes) -> list[DNSRecord] | None:
    """What zeroconf would hand the listener; None where zeroconf itself fails to parse (it raises
    UnicodeDecodeError from its HINFO reader in 0.47.3), which never reaches our code."""
    try:
        return parsed(data)
    except UnicodeDecodeError:
        return None


def _feed(collector: RoundCollector, data: bytes) -> None:
    records = _records_or_none(data)
    assume(records is not None)
    for record in records or []:
        collector.add(record)
    for live in collector.records():
        assert live.stype == STYPE and live.name
    collector.missing()


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=700))
def test_random_bytes_never_raise(data: bytes) -> None:
    _feed(RoundCollector(STYPE), data)


@settings(max_examples=400)
@given(st.data())
def test_damaged_answers_never_raise(data: st.DataObject) -> None:
    packet = bytearray(avahi_answer())
    for _ in range(data.draw(st.integers(1, 6))):
        packet[data.draw(st.integers(0, len(packet) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(12, len(packet)))
    _feed(RoundCollector(STYPE), bytes(packet[:cut]))


labels = st.text(min_size=1, max_size=20).filter(lambda s: len(s.encode()) <= 63)


@settings(max_examples=300)
@given(
    st.lists(
        st.tuples(labels, st.lists(st.binary(max_size=40), max_size=5)),
        max_size=6, unique_by=lambda advert: advert[0].lower(),
    )
)
def test_any_instance_names_and_txt_read_back(adverts: list[tuple[str, list[bytes]]]) -> None:
    packets = [
        response([rr(instance(label), TXT_TYPE, txt_rdata(*items))]) for label, items in adverts
    ]
    records = collect(*packets).records()
    assert [(r.name, r.txt) for r in records] == [(label, tuple(items)) for label, items in adverts]


# --- adverts ------------------------------------------------------------------------------------


def live(name: str = NODE1, host: str = "node1.local", txt: tuple[bytes, ...] = TXT,
         addresses: tuple[str, ...] = ("10.0.0.1",)) -> LiveRecord:
    return LiveRecord(name=name, stype=STYPE, host=host, port=6443, txt=txt, addresses=addresses)


def test_to_node_adverts_fills_the_advert_from_txt_and_the_first_address() -> None:
    txt = (*TXT, b"phase=server", b"host=node1.local", b"ip4=10.9.9.9", b"key=00000000000000ab",
           b"ca=" + b"a" * 64)
    assert to_node_adverts([live(txt=txt)], "00000000000000ff")[0] == [
        NodeAdvert(name=NODE1, host="node1.local", role=Role.SERVER, key="00000000000000ab",
                   ca="a" * 64, address="10.0.0.1", phase="server")
    ]


def test_without_an_address_the_txt_ip4_is_used() -> None:
    (advert,), _ = to_node_adverts(
        [live(txt=(*TXT, b"ip4=10.9.9.9"), addresses=())], "00000000000000ff"
    )
    assert advert.address == "10.9.9.9"
    (advert,), _ = to_node_adverts([live(addresses=())], "00000000000000ff")
    assert advert.address == ""


def test_unparsable_txt_and_our_own_key_are_skipped() -> None:
    records = [
        live(txt=()),  # PTR heard, TXT never came
        live(txt=(b"k3s=2", *TXT[1:])),
        live(name="mine", host="node2.local", txt=(*TXT, b"key=00000000000000aa")),  # ours, by key
        # Same host name, another key: another node (Avahi renamed one of the twins' hosts).
        live(name="twin", host="node2-2.local",
             txt=(*TXT, b"host=node2.local", b"key=00000000000000bb")),
        live(name="other", host="node3.local"),
    ]
    adverts, ignored = to_node_adverts(records, "00000000000000aa")
    assert [a.name for a in adverts] == ["twin", "other"]
    assert set(ignored) == {NODE1}  # the unparsable ones, by name (both named NODE1)


def test_host_comes_from_txt_then_from_the_srv_target() -> None:
    (by_txt,), _ = to_node_adverts([live(txt=(*TXT, b"host=node9.local"))], "00000000000000ff")
    (by_srv,), _ = to_node_adverts([live(host="Node1.local")], "00000000000000ff")
    assert (by_txt.host, by_srv.host) == ("node9.local", "node1.local")


keys = st.text("0123456789abcdef", min_size=16, max_size=16)


@given(st.lists(st.tuples(st.lists(st.binary(max_size=30), max_size=8), keys), max_size=5), keys)
def test_to_node_adverts_never_raises_and_never_returns_our_key(
    txts: list[tuple[list[bytes], str]], own: str
) -> None:
    records = [
        live(name=f"n{i}", txt=(*items, f"key={key}".encode()))
        for i, (items, key) in enumerate(txts)
    ]
    for advert in to_node_adverts(records, own)[0]:
        assert advert.key != own and advert.role in Role


def test_without_a_key_of_our_own_nothing_is_taken_for_ours() -> None:
    assert [a.name for a in to_node_adverts([live(), live(name="b")], "")[0]] == [NODE1, "b"]


# --- what live_round refuses before it opens a socket ---------------------------------------------


@pytest.mark.parametrize(
    ("stype", "addr"),
    [("", "10.0.0.1"), ("_k3s", "10.0.0.1"), ("k3s._tcp", "10.0.0.1"), ("_a._sctp", "10.0.0.1"),
     ("_" + "x" * 63 + "._tcp", "10.0.0.1"), (STYPE, "node1"), (STYPE, "")],
)
def test_live_round_refuses_bad_input_with_wire_error(stype: str, addr: str) -> None:
    with pytest.raises(WireError):
        asyncio.run(live_round(stype, interface_addr=addr))


# --- a round that may count as absence must be complete (issue 12 point 4) ---------------------


def test_a_round_over_the_cap_is_incomplete(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(const, "LIVE_ROUND_MAX_NAMES", 2)
    full = collect(*[avahi_answer(f"n{i}", f"h{i}", bytes([10, 0, 0, i])) for i in range(2)])
    assert full.incomplete() is None
    flooded = collect(*[avahi_answer(f"n{i}", f"h{i}", bytes([10, 0, 0, i])) for i in range(5)])
    assert "over 2 names" in (flooded.incomplete() or "")


def test_an_instance_heard_without_srv_or_txt_leaves_the_round_incomplete() -> None:
    ptr = rr(name(*STYPE.split("."), "local"), PTR, instance("n1"), flush=False)
    ptr_only = collect(response([ptr]))
    assert ptr_only.incomplete() == "1 instance(s) heard without their SRV or TXT record"
    assert collect(avahi_answer()).incomplete() is None


def test_to_node_adverts_leaves_out_what_the_judge_refuses() -> None:
    def judge(name: str, port: int, txt: tuple[bytes, ...], advert: object) -> str | None:
        return "unauthenticated" if name == "forged" else None

    adverts, ignored = to_node_adverts([live(), live(name="forged")], "", judge)
    assert [a.name for a in adverts] == [NODE1]
    assert ignored == {"forged": "unauthenticated"}


def test_a_round_whose_socket_dropped_datagrams_is_incomplete() -> None:
    assert "2 datagram(s) dropped" in (collect(avahi_answer()).incomplete(dropped=2) or "")
