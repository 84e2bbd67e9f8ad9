"""The raw records the publisher hands to Avahi's AddRecord (agent/avahi/rdata.py)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from agent.avahi import rdata
from agent.mdns.records import Advertisement

AD = Advertisement(
    name="k3s-sugar-dev@node1.local (candidate)",
    stypes=("_k3s-sugar-dev._tcp", "_https._tcp"),
    port=6443,
    txt=(b"k3s=1", b"role=candidate"),
)


def test_escape_label_as_avahi_does() -> None:
    assert rdata.escape_label("k3s-sugar-dev@node1.local (candidate)") == (
        "k3s-sugar-dev\\064node1\\.local\\032\\040candidate\\041"
    )
    assert rdata.escape_label("a\\b") == "a\\\\b"
    assert rdata.escape_label("ü") == "\\195\\188"  # UTF-8 bytes, one escape each


@given(st.text(min_size=1, max_size=40))
def test_an_escaped_label_splits_back_to_its_bytes(label: str) -> None:
    assert rdata.split_name(rdata.escape_label(label) + ".local") == [label.encode(), b"local"]


def test_wire_name_and_txt() -> None:
    assert rdata.wire_name([b"node1", b"local"]) == b"\x05node1\x05local\x00"
    assert rdata.txt_rdata((b"k3s=1", b"")) == b"\x05k3s=1\x00"
    assert rdata.txt_rdata(()) == b"\x00"  # RFC 6763 §6.1: never empty rdata


def test_claim_records_are_the_unique_srv_and_txt_of_each_type() -> None:
    records = rdata.claim_records(AD, "node1.local", "local")
    owner = "k3s-sugar-dev\\064node1\\.local\\032\\040candidate\\041._k3s-sugar-dev._tcp.local"
    srv, txt = records[0], records[1]
    assert (srv.name, srv.rtype, srv.ttl, srv.unique) == (owner, rdata.TYPE_SRV, 120, True)
    assert srv.rdata == struct.pack("!HHH", 0, 0, 6443) + b"\x05node1\x05local\x00"
    assert (txt.name, txt.rtype, txt.ttl, txt.unique) == (owner, rdata.TYPE_TXT, 4500, True)
    assert txt.rdata == b"\x05k3s=1\x0erole=candidate"
    assert [r.name.rsplit("._", 2)[-2] for r in records] == ["k3s-sugar-dev", "k3s-sugar-dev",
                                                              "https", "https"]


def test_pointer_records_name_the_instance_and_the_type() -> None:
    records = rdata.pointer_records(AD, "local")
    instance, enumeration = records[0], records[1]
    assert (instance.name, instance.rtype, instance.ttl, instance.unique) == (
        "_k3s-sugar-dev._tcp.local", rdata.TYPE_PTR, 4500, False)
    assert instance.rdata == (bytes([len(AD.name)]) + AD.name.encode()
                              + b"\x0e_k3s-sugar-dev\x04_tcp\x05local\x00")
    assert enumeration.name == "_services._dns-sd._udp.local"
    assert enumeration.rdata == b"\x0e_k3s-sugar-dev\x04_tcp\x05local\x00"
    assert len(records) == 4 and not any(r.unique for r in records)
