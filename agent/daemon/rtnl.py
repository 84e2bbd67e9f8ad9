"""Just enough rtnetlink, on the standard library: links, addresses and default routes.

pyroute2 does this and much more, but any import of it loads the whole package: 15 MiB of the
daemon's 45 MiB budget, for four dumps and one message parser. This module reads the same
messages (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h, linux/if_addr.h) and gives them
the shape pyroute2's parsed messages have (`msg["index"]`, `msg.get_attr("IFA_LOCAL")`), so
agent/daemon/netlink.py reads either; the unit tests check it against pyroute2's encoders.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
from collections.abc import Iterator
from typing import Any

NETLINK_ROUTE = 0
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
RT_TABLE_MAIN = 254
RTN_UNICAST = 1

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, proto, scope, type
_RTATTR = struct.Struct("=HH")  # len, type
_RTNEXTHOP = struct.Struct("=HBBi")  # len, flags, hops, ifindex
_U32 = struct.Struct("=I")

# Attribute numbers -> pyroute2's names, and how to decode the payload.
_IFLA = {3: ("IFLA_IFNAME", "str"), 10: ("IFLA_MASTER", "u32"), 18: ("IFLA_LINKINFO", "linkinfo")}
_IFLA_INFO = {1: ("IFLA_INFO_KIND", "str")}
_IFA = {1: ("IFA_ADDRESS", "ip"), 2: ("IFA_LOCAL", "ip"), 8: ("IFA_FLAGS", "u32")}
_RTA = {1: ("RTA_DST", "ip"), 4: ("RTA_OIF", "u32"), 6: ("RTA_PRIORITY", "u32"),
        9: ("RTA_MULTIPATH", "multipath"), 15: ("RTA_TABLE", "u32")}


class NetlinkError(OSError):
    """The kernel answered a request with an error; `code` is its errno."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, message or os.strerror(code))
        self.code = code


class Msg:
    """One parsed message: header fields by name, attributes through get_attr()."""

    def __init__(self, fields: dict[str, Any], attrs: dict[str, Any]) -> None:
        self._fields = fields
        self._attrs = attrs

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def get_attr(self, name: str, default: Any = None) -> Any:
        """The first attribute of that name, decoded; default when absent."""
        return self._attrs.get(name, default)


def _attrs(data: bytes, table: dict[int, tuple[str, str]], family: int) -> dict[str, Any]:
    found: dict[str, Any] = {}
    offset = 0
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > len(data):
            raise ValueError("truncated rtattr")
        payload = data[offset + _RTATTR.size:offset + length]
        offset += (length + 3) & ~3
        known = table.get(kind & 0x3FFF)  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
        if known is None or known[0] in found:
            continue
        name, how = known
        found[name] = _decode(how, payload, family)
    return found


def _decode(how: str, payload: bytes, family: int) -> Any:
    if how == "str":
        return payload.split(b"\0", 1)[0].decode(errors="replace")
    if how == "u32":
        return _U32.unpack_from(payload)[0]
    if how == "ip":
        return socket.inet_ntop(socket.AF_INET6 if len(payload) == 16 else socket.AF_INET,
                                payload) if len(payload) in (4, 16) else ""
    if how == "linkinfo":
        return Msg({}, _attrs(payload, _IFLA_INFO, family))
    hops = []  # multipath: rtnexthop structs, each followed by its own attributes
    offset = 0
    while offset + _RTNEXTHOP.size <= len(payload):
        length, _flags, _hops, ifindex = _RTNEXTHOP.unpack_from(payload, offset)
        if length < _RTNEXTHOP.size:
            raise ValueError("truncated rtnexthop")
        hops.append({"oif": ifindex})
        offset += (length + 3) & ~3
    return hops


def parse(data: bytes) -> list[Msg]:
    """Every message of one datagram; ValueError when it is truncated or malformed."""
    messages = []
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise ValueError("truncated netlink message")
        body = data[offset + _NLMSGHDR.size:offset + length]
        offset += (length + 3) & ~3
        header: dict[str, Any] = {"type": kind, "sequence_number": seq, "error": None}
        if kind == NLMSG_ERROR:
            header["error"] = -struct.unpack_from("=i", body)[0]
            messages.append(Msg({"header": header}, {}))
        elif kind in (RTM_NEWLINK, RTM_DELLINK):
            family, _type, index, flags, _change = _IFINFOMSG.unpack_from(body)
            fields = {"header": header, "family": family, "index": index, "flags": flags}
            messages.append(Msg(fields, _attrs(body[_IFINFOMSG.size:], _IFLA, family)))
        elif kind in (RTM_NEWADDR, RTM_DELADDR):
            family, prefixlen, flags, scope, index = _IFADDRMSG.unpack_from(body)
            fields = {"header": header, "family": family, "prefixlen": prefixlen,
                      "flags": flags, "scope": scope, "index": index}
            messages.append(Msg(fields, _attrs(body[_IFADDRMSG.size:], _IFA, family)))
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE):
            family, dst_len, _src, _tos, table, _proto, scope, rtype, _f = _RTMSG.unpack_from(body)
            fields = {"header": header, "family": family, "dst_len": dst_len, "table": table,
                      "scope": scope, "type": rtype}
            messages.append(Msg(fields, _attrs(body[_RTMSG.size:], _RTA, family)))
        else:
            messages.append(Msg({"header": header}, {}))  # NLMSG_DONE and others
    return messages


class Marshal:
    """pyroute2's MarshalRtnl interface: parse(datagram) -> messages."""

    def parse(self, data: bytes) -> list[Msg]:
        """The datagram's messages."""
        return parse(data)


class IPRoute:
    """The few pyroute2 IPRoute calls the daemon makes, over one netlink socket."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self._sock.settimeout(5.0)  # the kernel answers at once; never hang on it
        self._seq = itertools.count(1)

    def __enter__(self) -> IPRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def link_lookup(self, ifname: str) -> list[int]:
        """[index] of the named link, or []."""
        try:
            return [socket.if_nametoindex(ifname)]
        except OSError:
            return []

    def get_links(self, index: int) -> list[Msg]:
        """The link with that index; NetlinkError(ENODEV) when there is none."""
        return self._request(RTM_GETLINK, NLM_F_REQUEST, _IFINFOMSG.pack(0, 0, index, 0, 0))

    def get_all_links(self) -> list[Msg]:
        """Every link (IFLA_IFNAME, IFLA_MASTER: the bridge a veth is attached to)."""
        body = _IFINFOMSG.pack(0, 0, 0, 0, 0)
        return self._request(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, body)

    def link_del(self, index: int) -> None:
        """Delete the link with that index (`ip link delete`); NetlinkError when refused."""
        self._request(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, _IFINFOMSG.pack(0, 0, index, 0, 0))

    def get_addr(self, index: int) -> list[Msg]:
        """Every address of the link with that index."""
        body = _IFADDRMSG.pack(0, 0, 0, 0, 0)
        dump = self._request(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP, body)
        return [m for m in dump if m["index"] == index]

    def get_default_routes(self, family: int) -> list[Msg]:
        """The main table's default routes of that family."""
        body = _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)
        return [
            m for m in self._request(RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP, body)
            if m["dst_len"] == 0 and m["type"] == RTN_UNICAST
            and (m.get_attr("RTA_TABLE") or m["table"]) == RT_TABLE_MAIN
        ]

    def _request(self, kind: int, flags: int, body: bytes) -> list[Msg]:
        seq = next(self._seq)
        self._sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body)
        found: list[Msg] = []
        for msg in self._replies(seq):
            if msg["header"]["type"] == NLMSG_ERROR:
                if msg["header"]["error"]:
                    raise NetlinkError(msg["header"]["error"])
                break  # an ACK
            if msg["header"]["type"] == NLMSG_DONE:
                break
            found.append(msg)
            if not flags & NLM_F_DUMP:
                break
        return found

    def _replies(self, seq: int) -> Iterator[Msg]:
        while True:
            for msg in parse(self._sock.recv(65536)):
                if msg["header"]["sequence_number"] == seq:
                    yield msg
