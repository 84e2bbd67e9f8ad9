"""The mDNS interface and its addresses, read and watched over rtnetlink (agent/daemon/rtnl.py).

`choose_interface()` picks the interface once at start; `watch_interface()` then follows its link
and addresses. Both fold the same kernel messages (RTM_NEWLINK, RTM_NEWADDR, ...) into a
`LinkState`, so the addresses chosen at start and after a change follow the same rules. The
watcher subscribes before it dumps the current state: a change in between waits in the socket and
is applied after the dump, and since every message sets (or removes) one fact, the end state is
the kernel's.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from agent import const
from agent.daemon import rtnl

# Interfaces that are never the LAN a Pi cluster forms on: loopback, container and overlay links.
_SKIPPED_PREFIXES = ("lo", "cni", "flannel", "veth", "docker", "kube-", "tailscale", "br-", "virbr")
# IFLA_INFO_KIND values of the same: bridges whatever their name (cni0, a user's br0), flannel's
# VXLAN backend, WireGuard tunnels. A veth is not skipped by kind: a container's (and the lab
# node's) own end of one is its LAN.
_SKIPPED_KINDS = ("bridge", "vxlan", "wireguard")

# rtnetlink ABI: linux/rtnetlink.h, linux/if.h, linux/if_addr.h.
RTM_NEWLINK, RTM_DELLINK, RTM_NEWADDR, RTM_DELADDR = 16, 17, 20, 21
_RTMGRP_LINK, _RTMGRP_IPV4_IFADDR, _RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
_NETLINK_ROUTE = 0
_IFF_UP, _IFF_RUNNING = 0x1, 0x40  # RUNNING: operstate UP or UNKNOWN (dev_get_flags())
IFA_F_SECONDARY = IFA_F_TEMPORARY = 0x01  # one bit: secondary for IPv4, temporary for IPv6
IFA_F_OPTIMISTIC, IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE = 0x04, 0x08, 0x20, 0x40
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST = 0, 253, 254


class InterfaceError(Exception):
    """No usable interface, or the watched one is gone: one line for the operator."""


@dataclass(frozen=True)
class Interface:
    """An interface to publish on, with the addresses the advert carries."""

    name: str
    index: int
    ip4: str = ""
    ip6: str = ""

    @property
    def mdns_addr(self) -> str:
        """Where live rounds send from: the IPv4 address, else the IPv6 one (an IPv6-only
        link), a link-local one with its %scope; "" when the interface has neither."""
        if self.ip4 or not self.ip6:
            return self.ip4
        if "%" not in self.ip6 and ipaddress.ip_address(self.ip6).is_link_local:
            return f"{self.ip6}%{self.name}"
        return self.ip6


@dataclass(frozen=True)
class InterfaceEvent:
    """The interface as it is now, and whether its link carries traffic (IFF_UP and RUNNING)."""

    iface: Interface
    link_up: bool


class Message(Protocol):
    """What LinkState reads of a parsed rtnetlink message (rtnl.Msg; pyroute2's has it too)."""

    def __getitem__(self, key: str, /) -> Any: ...

    def get_attr(self, attr: str, default: Any = None, /) -> Any: ...


@dataclass(frozen=True)
class _Address:
    text: str
    scope: int
    flags: int


class LinkState:
    """One interface as rtnetlink describes it: name, kind, link flags and addresses (pure)."""

    def __init__(self, name: str, index: int) -> None:
        self.name = name
        self.index = index
        self.kind = ""
        self.flags = 0
        self.gone = False
        self._addrs: dict[tuple[int, str, int], _Address] = {}  # (family, address, prefixlen)

    def apply(self, msg: Message) -> bool:
        """Fold one message in; True if the event changed. Others' and broken ones are ignored."""
        before = self.event()
        try:
            header = msg["header"]
            if header.get("error") is None and msg["index"] == self.index:
                kind = header["type"]
                if kind in (RTM_NEWLINK, RTM_DELLINK):
                    self._link(kind, msg)
                elif kind in (RTM_NEWADDR, RTM_DELADDR):
                    self._address(kind, msg)
        except (KeyError, TypeError, ValueError, AttributeError):
            return False  # a message that could not be decoded: nothing in it can be trusted
        return self.event() != before

    def _link(self, kind: int, msg: Message) -> None:
        if kind == RTM_DELLINK:
            # AF_BRIDGE sends RTM_DELLINK when a port leaves a bridge; only AF_UNSPEC is removal.
            self.gone = self.gone or msg["family"] == socket.AF_UNSPEC
            return
        flags, name = int(msg["flags"]), str(msg.get_attr("IFLA_IFNAME") or self.name)
        info = msg.get_attr("IFLA_LINKINFO")  # absent from some notifications: kind unchanged
        kind_name = self.kind if info is None else str(info.get_attr("IFLA_INFO_KIND") or "")
        self.flags, self.name, self.kind = flags, name, kind_name

    def _address(self, kind: int, msg: Message) -> None:
        family = msg["family"]
        if family not in (socket.AF_INET, socket.AF_INET6):
            return
        # IFA_ADDRESS is the peer on a point-to-point IPv4 link; IFA_LOCAL is ours.
        text = msg.get_attr("IFA_LOCAL") if family == socket.AF_INET else None
        text = str(text or msg.get_attr("IFA_ADDRESS") or "")
        if not text:
            return
        key = (family, text, int(msg["prefixlen"]))
        if kind == RTM_DELADDR:
            self._addrs.pop(key, None)
            return
        flags = msg.get_attr("IFA_FLAGS")  # 32 bits; the header's ifa_flags holds the low 8
        flags = int(msg["flags"] if flags is None else flags)
        self._addrs[key] = _Address(text, int(msg["scope"]), flags)

    @property
    def link_up(self) -> bool:
        """True when the link is administratively up and operationally up (or unknown)."""
        return self.flags & (_IFF_UP | _IFF_RUNNING) == _IFF_UP | _IFF_RUNNING

    def event(self) -> InterfaceEvent:
        """The interface with the addresses the advert should carry, and its link state."""
        ip4, ip6 = self._best(socket.AF_INET), self._best(socket.AF_INET6)
        return InterfaceEvent(Interface(self.name, self.index, ip4, ip6), self.link_up)

    def _best(self, family: int) -> str:
        """Universe scope over link scope, then primary, stable, preferred; then the oldest."""
        usable = [
            a for (fam, _, _), a in self._addrs.items()
            if fam == family and a.scope != RT_SCOPE_HOST and not a.flags & IFA_F_DADFAILED
            and (not a.flags & IFA_F_TENTATIVE or a.flags & IFA_F_OPTIMISTIC)
        ]  # fmt: skip
        if not usable:
            return ""
        return min(
            usable,
            key=lambda a: (
                a.scope != RT_SCOPE_UNIVERSE,
                bool(a.flags & IFA_F_SECONDARY),  # IPv6: a temporary (privacy) address
                bool(a.flags & IFA_F_DEPRECATED),
            ),
        ).text  # min() keeps the first of equals: the address held longest stays chosen


class Debounce:
    """Holds a burst of changes until `quiet` s pass without one, or `longest` s after its first."""

    def __init__(self, quiet: float, longest: float) -> None:
        self.quiet = quiet
        self.longest = longest
        self._first: float | None = None
        self._last = 0.0

    def changed(self, now: float) -> None:
        """Note a change at `now` (a monotonic time in s)."""
        if self._first is None:
            self._first = now
        self._last = now

    @property
    def due(self) -> float | None:
        """When the held burst is to be reported; None while nothing is held."""
        if self._first is None:
            return None
        return min(self._last + self.quiet, self._first + self.longest)

    def fire(self, now: float) -> bool:
        """True, and the burst is released, when one is held and due at `now`."""
        due = self.due
        if due is None or now < due:
            return False
        self._first = None
        return True


def usable(name: str, kind: str = "") -> bool:
    """False for loopback, container, overlay and bridge links (by name, or by link kind)."""
    return not name.startswith(_SKIPPED_PREFIXES) and kind not in _SKIPPED_KINDS


def choose_interface(configured: str | None) -> Interface:
    """The configured interface, else the usable one the default route leaves through."""
    try:
        with rtnl.IPRoute() as ipr:
            if configured:
                found = ipr.link_lookup(ifname=configured)
                if not found:
                    raise InterfaceError(
                        f"mdns.interface {configured!r} does not exist on this host: "
                        "set SUGARKUBE_MDNS_INTERFACE to one `ip link` lists"
                    )
                state = _read_state(ipr, configured, int(found[0]))
            else:
                state = _default_route_state(ipr)
    except OSError as err:  # rtnl.NetlinkError included
        raise InterfaceError(f"cannot read the interfaces over netlink: {err}") from err
    return state.event().iface


def _default_route_state(ipr: Any) -> LinkState:
    for family in (socket.AF_INET, socket.AF_INET6):
        routes = sorted(
            ipr.get_default_routes(family=family), key=lambda r: r.get_attr("RTA_PRIORITY") or 0
        )
        for route in routes:
            for index in _route_oifs(route):
                try:
                    state = _read_state(ipr, "", index)
                except rtnl.NetlinkError:  # the link went away since the route dump: not this one
                    continue
                if usable(state.name, state.kind):
                    return state
    raise InterfaceError(
        "no default route on a usable interface: set mdns.interface (SUGARKUBE_MDNS_INTERFACE)"
    )


def _route_oifs(route: Any) -> list[int]:
    """The interfaces a route leaves through: its RTA_OIF, or each nexthop's of a multipath one."""
    oif = route.get_attr("RTA_OIF")
    if oif:
        return [int(oif)]
    return [int(hop["oif"]) for hop in route.get_attr("RTA_MULTIPATH") or () if hop["oif"]]


def _read_state(ipr: Any, name: str, index: int) -> LinkState:
    """The link and its addresses, dumped now; NetlinkError ENODEV if it does not exist."""
    state = LinkState(name, index)
    for msg in (*ipr.get_links(index), *ipr.get_addr(index=index)):
        state.apply(msg)
    return state


def _dump(name: str, index: int) -> LinkState:
    try:
        with rtnl.IPRoute() as ipr:
            return _read_state(ipr, name, index)
    except rtnl.NetlinkError as err:
        if err.code == errno.ENODEV:
            raise InterfaceError(_gone(name, index)) from err
        raise InterfaceError(f"cannot read interface {name} over netlink: {err}") from err
    except OSError as err:
        raise InterfaceError(f"cannot read interface {name} over netlink: {err}") from err


def _gone(name: str, index: int) -> str:
    return (
        f"interface {name} (index {index}) disappeared: removed, or moved to "
        "another network namespace; the daemon must choose its interface again"
    )


def parse(marshal: Any, data: bytes) -> list[Message] | None:
    """The messages of one netlink datagram; None if the marshal cannot take it all apart."""
    try:
        messages = list(marshal.parse(data))
    except Exception:  # struct.error, ValueError and friends on truncated input
        return None
    if (data and not messages) or any(m["header"].get("error") for m in messages):
        return None  # pyroute2 marks a message it could only partly decode with an error
    return messages


def fold(
    state: LinkState, settle: Debounce, datagrams: Iterable[bytes], marshal: Any, now: float
) -> bool:
    """Apply each datagram's messages, noting changes at `now`; False if one would not parse."""
    for data in datagrams:
        messages = parse(marshal, data)
        if messages is None:
            return False
        for msg in messages:
            if state.apply(msg):
                settle.changed(now)
    return True


def _subscribe() -> socket.socket:
    """A non-blocking rtnetlink socket that receives link and address notifications."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK, _NETLINK_ROUTE)
    try:
        sock.bind((0, _RTMGRP_LINK | _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV6_IFADDR))
    except OSError:
        sock.close()
        raise
    return sock


def _drain(sock: socket.socket) -> list[bytes] | None:
    """The datagrams waiting now (at most NETLINK_DRAIN_MAX); None if the kernel dropped some."""
    datagrams: list[bytes] = []
    while len(datagrams) < const.NETLINK_DRAIN_MAX:
        try:
            datagrams.append(sock.recv(const.NETLINK_RECV_SIZE))
        except BlockingIOError:
            break
        except OSError as err:
            if err.errno == errno.ENOBUFS:  # our queue overflowed: notifications were lost
                return None
            raise InterfaceError(f"the netlink watch failed: {err}") from err
    return datagrams


async def watch_interface(name: str, index: int) -> AsyncIterator[InterfaceEvent]:
    """The interface's state now, then once per settled change of its link or chosen addresses.

    Changes are held until NETLINK_SETTLE s pass without another (an address flip gives one
    event, with the final state). InterfaceError when the interface disappears or netlink fails.
    The socket is closed when the iteration ends, is cancelled or raises.
    """
    loop = asyncio.get_running_loop()
    try:
        sock = _subscribe()
    except OSError as err:
        raise InterfaceError(f"cannot watch interface {name} over netlink: {err}") from err
    readable = asyncio.Event()
    try:
        # Subscribed before the dump: a change in between waits in the socket (module docstring).
        loop.add_reader(sock.fileno(), readable.set)
        state = await asyncio.to_thread(_dump, name, index)
        yield state.event()
        marshal = rtnl.Marshal()
        settle = Debounce(const.NETLINK_SETTLE, const.NETLINK_SETTLE_MAX)
        while True:
            try:
                async with asyncio.timeout_at(settle.due):
                    await readable.wait()
            except TimeoutError:
                pass
            readable.clear()  # level-triggered: a datagram left unread sets it again
            datagrams = _drain(sock)
            if datagrams is None or not fold(state, settle, datagrams, marshal, loop.time()):
                state = await asyncio.to_thread(_dump, state.name, index)  # lost track: re-read
                settle.changed(loop.time())
            if state.gone:
                raise InterfaceError(_gone(state.name, index))
            if settle.fire(loop.time()):
                yield state.event()
    finally:
        loop.remove_reader(sock.fileno())
        sock.close()
