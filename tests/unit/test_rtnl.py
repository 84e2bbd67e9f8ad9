"""The stdlib rtnetlink reader against pyroute2's encoders and parser, and the real kernel."""

from __future__ import annotations

import contextlib
import errno
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from agent.daemon import rtnl
from tests.unit.test_netlink import addr_bytes, link_bytes, route_bytes


def both(data: bytes) -> tuple[object, object]:
    (ours,) = rtnl.parse(data)
    (theirs,) = MarshalRtnl().parse(data)
    return ours, theirs


@pytest.mark.parametrize("kind", [None, "bridge", "veth"])
def test_links_read_as_pyroute2_reads_them(kind: str | None) -> None:
    ours, theirs = both(link_bytes(7, "eth1", kind=kind))
    for field in ("index", "family", "flags"):
        assert ours[field] == theirs[field]  # type: ignore[index]
    assert ours["header"]["type"] == theirs["header"]["type"]  # type: ignore[index]
    assert ours.get_attr("IFLA_IFNAME") == "eth1"  # type: ignore[attr-defined]
    info = ours.get_attr("IFLA_LINKINFO")  # type: ignore[attr-defined]
    assert (info.get_attr("IFLA_INFO_KIND") if info else None) == kind


@pytest.mark.parametrize(
    "address", ["10.1.2.3", "fe80::1", "2001:db8::42", "192.0.2.200"]
)
def test_addresses_read_as_pyroute2_reads_them(address: str) -> None:
    ours, theirs = both(addr_bytes(address, index=4, prefixlen=24, flags=0x80, scope=253))
    for field in ("index", "family", "prefixlen", "flags", "scope"):
        assert ours[field] == theirs[field]  # type: ignore[index]
    for attr in ("IFA_ADDRESS", "IFA_LOCAL", "IFA_FLAGS"):
        assert ours.get_attr(attr) == theirs.get_attr(attr)  # type: ignore[attr-defined]


@pytest.mark.parametrize("oifs", [[3], [3, 5]])
def test_default_routes_read_as_pyroute2_reads_them(oifs: list[int]) -> None:
    ours, _ = both(route_bytes(oifs, priority=100))
    assert ours["dst_len"] == 0 and ours.get_attr("RTA_TABLE") == 254  # type: ignore[index,attr-defined]
    assert ours.get_attr("RTA_PRIORITY") == 100  # type: ignore[attr-defined]
    if len(oifs) == 1:
        assert ours.get_attr("RTA_OIF") == 3  # type: ignore[attr-defined]
    else:
        assert [h["oif"] for h in ours.get_attr("RTA_MULTIPATH")] == oifs  # type: ignore[attr-defined]


def test_an_error_reply_carries_its_errno() -> None:
    body = struct.pack("=i", -errno.ENODEV) + bytes(16)
    data = struct.pack("=IHHII", 16 + len(body), rtnl.NLMSG_ERROR, 0, 1, 0) + body
    (msg,) = rtnl.parse(data)
    assert msg["header"]["error"] == errno.ENODEV


@given(st.binary(max_size=512))
def test_junk_raises_only_value_or_struct_errors(data: bytes) -> None:
    with contextlib.suppress(ValueError, struct.error):
        rtnl.parse(data)


def test_the_real_kernel_answers_for_loopback() -> None:
    index = socket.if_nametoindex("lo")
    with rtnl.IPRoute() as ipr:
        assert ipr.link_lookup("lo") == [index]
        assert ipr.link_lookup("no-such-link0") == []
        (link,) = ipr.get_links(index)
        assert link.get_attr("IFLA_IFNAME") == "lo"
        addrs = {m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS") for m in ipr.get_addr(index)}
        assert "127.0.0.1" in addrs
        assert all(m["dst_len"] == 0 for m in ipr.get_default_routes(socket.AF_INET))
        with pytest.raises(rtnl.NetlinkError) as err:
            ipr.get_links(999_999)
        assert err.value.code == errno.ENODEV
