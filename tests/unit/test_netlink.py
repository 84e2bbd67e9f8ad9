"""The netlink layer's pure parts: kernel messages folded into an interface's state, the settle
timer on an injected clock, and the interface choice against a fake netlink socket.

Messages are built with pyroute2's own encoders and parsed back from bytes, as the kernel's are.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import subprocess
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.marshal import MarshalRtnl
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from agent import const
from agent.daemon import netlink, rtnl
from agent.daemon.netlink import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_NEWADDR,
    RTM_NEWLINK,
    Debounce,
    Interface,
    InterfaceError,
    InterfaceEvent,
    LinkState,
    choose_interface,
    fold,
    parse,
    usable,
)
from tests.integration.helpers import PYTHON, ROOT

UP_RUNNING = 0x1 | 0x40 | 0x10000  # IFF_UP | IFF_RUNNING | IFF_LOWER_UP, as `ip link` shows UP
PERMANENT, OPTIMISTIC, DADFAILED, DEPRECATED, TENTATIVE = 0x80, 0x04, 0x08, 0x20, 0x40
SECONDARY = TEMPORARY = 0x01
LINK, HOST = 253, 254
RTM_NEWROUTE = 24


def wire(msg: Any) -> bytes:
    msg.encode()
    return bytes(msg.data)


def link_bytes(
    index: int = 3, name: str = "eth0", *, flags: int = UP_RUNNING, kind: str | None = None,
    msg_type: int = RTM_NEWLINK, family: int = socket.AF_UNSPEC,
) -> bytes:  # fmt: skip
    msg = ifinfmsg()
    msg["header"]["type"] = msg_type
    msg["family"], msg["index"], msg["flags"] = family, index, flags
    msg["attrs"] = [["IFLA_IFNAME", name]]
    if kind is not None:
        msg["attrs"].append(["IFLA_LINKINFO", {"attrs": [["IFLA_INFO_KIND", kind]]}])
    return wire(msg)


def addr_bytes(
    address: str, *, index: int = 3, prefixlen: int = 24, flags: int = PERMANENT, scope: int = 0,
    msg_type: int = RTM_NEWADDR, peer: str | None = None, header_flags: int | None = None,
) -> bytes:  # fmt: skip
    msg = ifaddrmsg()
    msg["header"]["type"] = msg_type
    v4 = ":" not in address
    msg["family"] = socket.AF_INET if v4 else socket.AF_INET6
    msg["prefixlen"], msg["index"], msg["scope"] = prefixlen, index, scope
    msg["flags"] = (flags & 0xFF) if header_flags is None else header_flags
    msg["attrs"] = [["IFA_ADDRESS", peer or address]]
    if v4:
        msg["attrs"].append(["IFA_LOCAL", address])
    if header_flags is None:
        msg["attrs"].append(["IFA_FLAGS", flags])
    return wire(msg)


def route_bytes(oifs: list[int], priority: int = 0, family: int = socket.AF_INET) -> bytes:
    msg = rtmsg()
    msg["header"]["type"] = RTM_NEWROUTE
    msg["family"], msg["dst_len"], msg["table"] = family, 0, 254
    msg["attrs"] = [["RTA_TABLE", 254], ["RTA_PRIORITY", priority]]
    if len(oifs) == 1:
        msg["attrs"].append(["RTA_OIF", oifs[0]])
    else:
        hops = [{"oif": oif, "hops": 0, "flags": 0, "attrs": []} for oif in oifs]
        msg["attrs"].append(["RTA_MULTIPATH", hops])
    return wire(msg)


def messages(*datagrams: bytes) -> list[Any]:
    parsed = parse(MarshalRtnl(), b"".join(datagrams))
    assert parsed is not None
    return parsed


def state_of(*datagrams: bytes, index: int = 3) -> LinkState:
    state = LinkState("eth0", index)
    for msg in messages(*datagrams):
        state.apply(msg)
    return state


# -- the link ---------------------------------------------------------------------------------


def test_a_link_message_gives_name_kind_and_link_state() -> None:
    state = state_of(link_bytes(name="lan0", kind="bridge"))
    assert (state.name, state.kind, state.link_up) == ("lan0", "bridge", True)
    assert state.event() == InterfaceEvent(Interface("lan0", 3), link_up=True)


@pytest.mark.parametrize(
    "flags", [0, 0x1, 0x40, 0x1 | 0x10000], ids=["down", "up-no-carrier", "running-only", "no-op"]
)
def test_the_link_is_up_only_when_administratively_and_operationally_up(flags: int) -> None:
    assert not state_of(link_bytes(flags=flags)).link_up


def test_a_rename_keeps_the_index_and_changes_the_name() -> None:
    state = state_of(link_bytes(name="eth0"))
    assert state.apply(messages(link_bytes(name="lan7"))[0])
    assert state.event().iface == Interface("lan7", 3)


def test_a_notification_without_linkinfo_keeps_the_kind() -> None:
    state = state_of(link_bytes(kind="bridge"), link_bytes(kind=None, flags=0))
    assert (state.kind, state.link_up) == ("bridge", False)


def test_only_an_af_unspec_dellink_means_the_interface_is_gone() -> None:
    state = state_of(link_bytes())
    state.apply(messages(link_bytes(msg_type=RTM_DELLINK, family=socket.AF_BRIDGE))[0])
    assert not state.gone  # a port leaving a bridge
    state.apply(messages(link_bytes(msg_type=RTM_DELLINK))[0])
    assert state.gone


def test_messages_about_other_interfaces_change_nothing() -> None:
    state = state_of(link_bytes(), addr_bytes("10.0.0.5"))
    before = state.event()
    for data in (link_bytes(index=4, flags=0), addr_bytes("10.9.9.9", index=4),
                 addr_bytes("10.0.0.5", index=4, msg_type=RTM_DELADDR),
                 link_bytes(index=4, msg_type=RTM_DELLINK)):  # fmt: skip
        assert not state.apply(messages(data)[0])
    assert state.event() == before and not state.gone


# -- IPv4 -------------------------------------------------------------------------------------


def test_ip4_is_the_local_address_not_a_point_to_point_peer() -> None:
    state = state_of(addr_bytes("10.0.0.5", prefixlen=32, peer="10.0.0.1"))
    assert state.event().iface.ip4 == "10.0.0.5"


def test_ip4_prefers_a_primary_universe_address_and_keeps_the_one_held_longest() -> None:
    state = state_of(
        addr_bytes("169.254.3.4", prefixlen=16, scope=LINK),
        addr_bytes("10.0.0.9", flags=PERMANENT | SECONDARY),
        addr_bytes("10.0.0.5"),
        addr_bytes("192.168.1.5"),
        addr_bytes("127.0.0.2", prefixlen=8, scope=HOST),
    )
    assert state.event().iface.ip4 == "10.0.0.5"
    state.apply(messages(addr_bytes("10.0.0.5", msg_type=RTM_DELADDR))[0])
    assert state.event().iface.ip4 == "192.168.1.5"


def test_a_deleted_only_address_leaves_ip4_empty() -> None:
    state = state_of(addr_bytes("10.0.0.5"), addr_bytes("10.0.0.5", msg_type=RTM_DELADDR))
    assert state.event().iface.ip4 == ""


def test_a_refreshed_address_is_no_change() -> None:
    state = state_of(addr_bytes("10.0.0.5"))
    assert not state.apply(messages(addr_bytes("10.0.0.5"))[0])


# -- IPv6 -------------------------------------------------------------------------------------


def test_ip6_prefers_global_over_link_local() -> None:
    state = state_of(
        addr_bytes("fe80::1", prefixlen=64, scope=LINK), addr_bytes("2001:db8::5", prefixlen=64)
    )
    assert state.event().iface.ip6 == "2001:db8::5"


def test_ip6_falls_back_to_link_local_and_skips_loopback_scope() -> None:
    state = state_of(
        addr_bytes("::1", prefixlen=128, scope=HOST),
        addr_bytes("fe80::1", prefixlen=64, scope=LINK),
    )
    assert state.event().iface.ip6 == "fe80::1"


def test_a_tentative_address_counts_once_dad_completes() -> None:
    state = state_of(addr_bytes("fe80::1", prefixlen=64, scope=LINK, flags=PERMANENT | TENTATIVE))
    assert state.event().iface.ip6 == ""
    assert state.apply(messages(addr_bytes("fe80::1", prefixlen=64, scope=LINK))[0])
    assert state.event().iface.ip6 == "fe80::1"


@pytest.mark.parametrize(
    ("flags", "usable_"),
    [(TENTATIVE | OPTIMISTIC, True), (TENTATIVE | DADFAILED, False), (DADFAILED, False)],
)
def test_optimistic_addresses_count_failed_ones_do_not(flags: int, usable_: bool) -> None:
    state = state_of(addr_bytes("2001:db8::5", prefixlen=64, flags=flags))
    assert state.event().iface.ip6 == ("2001:db8::5" if usable_ else "")


def test_ip6_prefers_stable_and_preferred_addresses() -> None:
    state = state_of(
        addr_bytes("2001:db8::aaaa", prefixlen=64, flags=TEMPORARY),
        addr_bytes("2001:db8::bbbb", prefixlen=64, flags=DEPRECATED),
        addr_bytes("2001:db8::cccc", prefixlen=64, flags=0),
    )
    assert state.event().iface.ip6 == "2001:db8::cccc"


def test_the_32_bit_ifa_flags_win_over_the_header_byte() -> None:
    # ifa_flags (8 bits) says nothing; IFA_FLAGS carries tentative: the address is not usable yet.
    data = addr_bytes("2001:db8::5", prefixlen=64, flags=TENTATIVE)
    msg = messages(data)[0]
    msg["flags"] = 0
    state = LinkState("eth0", 3)
    state.apply(msg)
    assert state.event().iface.ip6 == ""
    # without IFA_FLAGS (old kernels), the header byte is all there is
    assert state_of(addr_bytes("2001:db8::5", prefixlen=64, header_flags=0)).event().iface.ip6


@settings(max_examples=200)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 6)), max_size=30))
def test_ip4_is_the_oldest_surviving_address(ops: list[tuple[bool, int]]) -> None:
    state = LinkState("eth0", 3)
    model: list[str] = []
    for add, n in ops:
        address = f"10.0.{n}.1"
        kind = RTM_NEWADDR if add else RTM_DELADDR
        state.apply(messages(addr_bytes(address, msg_type=kind))[0])
        if add and address not in model:
            model.append(address)
        elif not add and address in model:
            model.remove(address)
    assert state.event().iface.ip4 == (model[0] if model else "")


# -- malformed input --------------------------------------------------------------------------


def test_an_error_or_undecodable_message_is_ignored() -> None:
    state = state_of(addr_bytes("10.0.0.5"))
    broken = messages(addr_bytes("10.0.0.7"))[0]
    broken["header"]["error"] = ValueError("decode failed")
    assert not state.apply(broken)
    assert not state.apply({"header": {"type": RTM_NEWADDR}})  # type: ignore[arg-type]
    assert state.event().iface.ip4 == "10.0.0.5"


@settings(max_examples=300)
@given(st.binary(max_size=300), st.integers(0, 120))
def test_any_bytes_parse_or_are_refused_and_never_raise(junk: bytes, cut: int) -> None:
    data = (link_bytes() + addr_bytes("10.0.0.5"))[:cut] + junk
    msgs = parse(MarshalRtnl(), data)
    state = LinkState("eth0", 3)
    for msg in msgs or []:
        state.apply(msg)
    state.event()


# -- settling ---------------------------------------------------------------------------------


def test_nothing_is_due_until_a_change() -> None:
    settle = Debounce(0.1, 1.0)
    assert settle.due is None and not settle.fire(100.0)


def test_a_burst_is_due_once_it_has_been_quiet() -> None:
    settle = Debounce(0.1, 1.0)
    settle.changed(10.0)
    settle.changed(10.05)  # the add of a del+add flip
    assert settle.due == pytest.approx(10.15)
    assert not settle.fire(10.14)
    assert settle.fire(10.15)
    assert settle.due is None and not settle.fire(10.2)


def test_a_flapping_link_is_reported_at_the_longest_hold() -> None:
    settle = Debounce(0.1, 1.0)
    now, fired = 0.0, []
    while now < 2.5:
        settle.changed(now)
        if settle.fire(now):
            fired.append(now)
        now = round(now + 0.05, 2)
    assert fired == [1.0, 2.05]  # each burst held its longest, never forever


def test_an_address_flip_in_two_datagrams_is_one_burst_with_the_final_state() -> None:
    state = state_of(link_bytes(), addr_bytes("10.0.0.5"))
    settle = Debounce(0.1, 1.0)
    assert fold(state, settle, [addr_bytes("10.0.0.5", msg_type=RTM_DELADDR)], MarshalRtnl(), 5.0)
    assert fold(state, settle, [addr_bytes("10.0.0.6")], MarshalRtnl(), 5.02)
    assert not settle.fire(5.1)
    assert settle.fire(5.12)
    assert state.event().iface.ip4 == "10.0.0.6"


def test_fold_notes_no_change_for_a_refresh_and_refuses_garbage() -> None:
    state = state_of(addr_bytes("10.0.0.5"))
    settle = Debounce(0.1, 1.0)
    assert fold(state, settle, [addr_bytes("10.0.0.5")], MarshalRtnl(), 1.0)
    assert settle.due is None
    for garbage in (b"\x30\x00\x00\x00\x14", addr_bytes("10.0.0.6")[:30]):
        assert not fold(state, settle, [garbage], MarshalRtnl(), 1.0)


# -- choosing the interface --------------------------------------------------------------------


class FakeIPRoute:
    """The calls choose_interface makes, answered from kernel-shaped messages."""

    def __init__(
        self,
        links: dict[int, bytes],
        addrs: dict[int, list[bytes]] | None = None,
        routes: dict[int, list[bytes]] | None = None,
    ) -> None:
        self.links = {i: messages(b)[0] for i, b in links.items()}
        self.addrs = {i: messages(*b) for i, b in (addrs or {}).items()}
        self.routes = {f: messages(*b) for f, b in (routes or {}).items()}

    def __enter__(self) -> FakeIPRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def link_lookup(self, ifname: str) -> list[int]:
        return [i for i, m in self.links.items() if m.get_attr("IFLA_IFNAME") == ifname]

    def get_links(self, index: int) -> tuple[Any, ...]:
        if index not in self.links:
            raise rtnl.NetlinkError(19, "No such device")
        return (self.links[index],)

    def get_addr(self, index: int) -> tuple[Any, ...]:
        return tuple(self.addrs.get(index, ()))

    def get_default_routes(self, family: int) -> tuple[Any, ...]:
        return tuple(self.routes.get(family, ()))


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(fake: FakeIPRoute | Exception) -> None:
        def make() -> FakeIPRoute:
            if isinstance(fake, Exception):
                raise fake
            return fake

        monkeypatch.setattr(rtnl, "IPRoute", make)

    return install


def test_the_default_route_interface_with_its_addresses(host: Any) -> None:
    host(FakeIPRoute(
        {1: link_bytes(1, "lo", kind=None), 3: link_bytes(3, "eth0")},
        addrs={3: [addr_bytes("192.168.1.20", index=3),
                   addr_bytes("fe80::2", index=3, prefixlen=64, scope=LINK),
                   addr_bytes("2001:db8::20", index=3, prefixlen=64)]},
        routes={socket.AF_INET: [route_bytes([3])]},
    ))  # fmt: skip
    assert choose_interface(None) == Interface("eth0", 3, "192.168.1.20", "2001:db8::20")


def test_a_bridge_is_skipped_by_kind_whatever_its_name(host: Any) -> None:
    host(FakeIPRoute(
        {3: link_bytes(3, "eth0"), 7: link_bytes(7, "lan0", kind="bridge"),
         8: link_bytes(8, "cni0", kind="bridge")},
        routes={socket.AF_INET: [route_bytes([3], priority=100), route_bytes([7], priority=5),
                                 route_bytes([8], priority=1)]},
    ))  # fmt: skip
    assert choose_interface(None).name == "eth0"


def test_the_lowest_metric_usable_route_wins_and_multipath_hops_count(host: Any) -> None:
    host(FakeIPRoute(
        {3: link_bytes(3, "eth0"), 4: link_bytes(4, "wlan0"), 5: link_bytes(5, "flannel.1")},
        routes={socket.AF_INET: [route_bytes([3], priority=600), route_bytes([5, 4], priority=10)]},
    ))  # fmt: skip
    assert choose_interface(None).name == "wlan0"


def test_a_route_whose_link_vanished_since_the_dump_is_passed_over(host: Any) -> None:
    host(FakeIPRoute(
        {3: link_bytes(3, "eth0")},
        routes={socket.AF_INET: [route_bytes([6], priority=1), route_bytes([3], priority=9)]},
    ))  # fmt: skip
    assert choose_interface(None).name == "eth0"


def test_ipv6_default_route_when_there_is_no_ipv4_one(host: Any) -> None:
    host(FakeIPRoute(
        {3: link_bytes(3, "eth0")}, routes={socket.AF_INET6: [route_bytes([3], family=10)]}
    ))  # fmt: skip
    assert choose_interface(None).index == 3


@pytest.mark.parametrize(
    "routes",
    [{}, {socket.AF_INET: [route_bytes([9])]}, {socket.AF_INET: [route_bytes([2])]}],
    ids=["no-default-route", "only-docker", "only-lo"],
)
def test_no_usable_default_route_is_one_line_naming_the_setting(host: Any, routes: Any) -> None:
    host(FakeIPRoute({1: link_bytes(1, "lo"), 2: link_bytes(2, "lo"),
                      9: link_bytes(9, "docker0", kind="bridge")}, routes=routes))  # fmt: skip
    with pytest.raises(InterfaceError) as caught:
        choose_interface(None)
    assert "SUGARKUBE_MDNS_INTERFACE" in str(caught.value) and "\n" not in str(caught.value)


def test_a_configured_interface_is_used_even_where_the_skip_list_would_not(host: Any) -> None:
    host(FakeIPRoute({7: link_bytes(7, "br0", kind="bridge")},
                     addrs={7: [addr_bytes("10.1.1.1", index=7)]}))  # fmt: skip
    assert choose_interface("br0") == Interface("br0", 7, "10.1.1.1", "")


@pytest.mark.parametrize("name", ["eth9", "x" * 40, "a b", "é"])
def test_a_configured_interface_that_does_not_exist_is_one_line(host: Any, name: str) -> None:
    host(FakeIPRoute({3: link_bytes(3, "eth0")}))
    with pytest.raises(InterfaceError) as caught:
        choose_interface(name)
    message = str(caught.value)
    assert repr(name) in message and "does not exist" in message and "\n" not in message


def test_netlink_failing_is_an_interface_error(host: Any) -> None:
    host(PermissionError(1, "Operation not permitted"))
    with pytest.raises(InterfaceError, match="cannot read the interfaces over netlink"):
        choose_interface(None)


@pytest.mark.parametrize(
    ("name", "kind", "expected"),
    [("eth0", "", True), ("wlan0", "", True), ("end0", "veth", True), ("lo", "", False),
     ("cni0", "bridge", False), ("flannel.1", "vxlan", False), ("veth1a2b", "veth", False),
     ("docker0", "", False), ("kube-ipvs0", "", False), ("tailscale0", "tun", False),
     ("br-1234", "", False), ("virbr0", "", False), ("lan0", "bridge", False),
     ("wg0", "wireguard", False)],
)  # fmt: skip
def test_usable(name: str, kind: str, expected: bool) -> None:
    assert usable(name, kind) is expected


def test_the_daemon_never_loads_pyroute2() -> None:
    code = (
        "import sys, agent.daemon.service, agent.daemon.netlink as n; n.choose_interface(None); "
        "print('pyroute2' in sys.modules)"
    )
    done = subprocess.run(
        [PYTHON, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT, timeout=30
    )
    assert done.stdout.strip() == "False"  # 15 MiB of RSS and ~100 ms of imports saved


# -- the watch loop, with the kernel faked at its two seams: the socket and the dump ------------

ENOBUFS = b"ENOBUFS"  # a datagram the fake socket turns into the kernel's overflow error


class FakeKernelSocket:
    """The subscribed socket: datagrams the test sends, ENOBUFS on demand."""

    def __init__(self) -> None:
        self.ours, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.ours.setblocking(False)

    def fileno(self) -> int:
        return self.ours.fileno()

    def recv(self, size: int) -> bytes:
        data = self.ours.recv(size)
        if data == ENOBUFS:
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return data

    def close(self) -> None:
        self.ours.close()
        self.kernel.close()


class FakeKernel:
    """The watch's seams: the subscribed socket, and dumps answered from `dumps_` in turn."""

    def __init__(self) -> None:
        self.sock = FakeKernelSocket()
        self.dumps_: list[list[bytes] | None] = [[link_bytes(), addr_bytes("10.0.0.5")]]
        self.dumps = 0

    def dump(self, name: str, index: int) -> LinkState:
        held = self.dumps_[min(self.dumps, len(self.dumps_) - 1)]
        self.dumps += 1
        if held is None:
            raise InterfaceError(f"interface {name} (index {index}) disappeared")
        return state_of(*held, index=index)

    def send(self, *datagrams: bytes) -> None:
        for data in datagrams:
            self.sock.kernel.send(data)


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> FakeKernel:
    fake = FakeKernel()
    monkeypatch.setattr(const, "NETLINK_SETTLE", 0.02)
    monkeypatch.setattr(const, "NETLINK_SETTLE_MAX", 0.2)
    monkeypatch.setattr(netlink, "_subscribe", lambda: fake.sock)
    monkeypatch.setattr(netlink, "_dump", fake.dump)
    return fake


def watch(
    kernel: FakeKernel, steps: list[list[bytes]], settle: float = 0.1
) -> tuple[list[InterfaceEvent], Any]:
    """Run the watch, sending each step's datagrams `settle` s apart; its events and its end."""

    async def main() -> tuple[list[InterfaceEvent], Any]:
        events: list[InterfaceEvent] = []

        async def consume() -> None:
            async for event in netlink.watch_interface("eth0", 3):
                events.append(event)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)  # the first event
        for step in steps:
            kernel.send(*step)
            await asyncio.sleep(settle)
        task.cancel()
        outcome = await asyncio.gather(task, return_exceptions=True)
        return events, outcome[0]

    return asyncio.run(main())


def test_watch_starts_with_the_dumped_state_and_closes_its_socket_when_cancelled(
    kernel: FakeKernel,
) -> None:
    events, outcome = watch(kernel, [])
    assert events == [InterfaceEvent(Interface("eth0", 3, "10.0.0.5"), link_up=True)]
    assert isinstance(outcome, asyncio.CancelledError)
    assert kernel.sock.ours.fileno() == -1  # closed


def test_watch_gives_one_event_per_settled_burst(kernel: FakeKernel) -> None:
    flip = [addr_bytes("10.0.0.5", msg_type=RTM_DELADDR), addr_bytes("10.0.0.6")]
    events, _ = watch(kernel, [flip, [link_bytes(flags=0)], [addr_bytes("10.0.0.6")]])
    # one event per burst; the refresh of 10.0.0.6 changes nothing, so no event for it
    expected = [("10.0.0.5", True), ("10.0.0.6", True), ("10.0.0.6", False)]
    assert [(e.iface.ip4, e.link_up) for e in events] == expected


def test_watch_ignores_other_interfaces(kernel: FakeKernel) -> None:
    events, _ = watch(kernel, [[link_bytes(index=9, flags=0), addr_bytes("10.9.9.9", index=9)]])
    assert len(events) == 1


@pytest.mark.parametrize("trouble", [ENOBUFS, addr_bytes("10.0.0.6")[:30]], ids=["enobufs", "cut"])
def test_watch_reads_the_state_afresh_when_it_lost_track(
    kernel: FakeKernel, trouble: bytes
) -> None:
    kernel.dumps_.append([link_bytes(), addr_bytes("10.0.0.7")])  # what it holds by then
    events, _ = watch(kernel, [[trouble]])
    assert kernel.dumps == 2
    assert [e.iface.ip4 for e in events] == ["10.0.0.5", "10.0.0.7"]


def test_watch_ends_with_one_line_when_the_interface_is_removed(kernel: FakeKernel) -> None:
    events, outcome = watch(kernel, [[link_bytes(msg_type=RTM_DELLINK)]])
    assert len(events) == 1
    assert isinstance(outcome, InterfaceError)
    assert "eth0" in str(outcome) and "disappeared" in str(outcome)
    assert kernel.sock.ours.fileno() == -1


def test_watch_of_an_interface_gone_before_the_dump_raises(kernel: FakeKernel) -> None:
    kernel.dumps_ = [None]
    events, outcome = watch(kernel, [])
    assert events == [] and isinstance(outcome, InterfaceError)
    assert kernel.sock.ours.fileno() == -1


def test_live_rounds_ask_from_ipv4_else_ipv6_a_link_local_one_scoped() -> None:
    from agent.daemon.netlink import Interface

    assert Interface("eth0", 2, "10.0.0.5", "fd00::5").mdns_addr == "10.0.0.5"
    assert Interface("eth0", 2, "", "fd00::5").mdns_addr == "fd00::5"  # an IPv6-only link
    assert Interface("eth0", 2, "", "fe80::5").mdns_addr == "fe80::5%eth0"
    assert Interface("eth0", 2).mdns_addr == ""
