"""The mDNS interface and its addresses, read over netlink (pyroute2)."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

# Interfaces that are never the LAN a Pi cluster forms on: loopback, container and overlay links.
_SKIPPED_PREFIXES = ("lo", "cni", "flannel", "veth", "docker", "kube-", "tailscale", "br-", "virbr")


class InterfaceError(Exception):
    """No usable interface: one line for the operator."""


@dataclass(frozen=True)
class Interface:
    """An interface to publish on, with the addresses the advert carries."""

    name: str
    index: int
    ip4: str = ""
    ip6: str = ""


def usable(name: str) -> bool:
    """False for loopback, container, overlay and bridge links."""
    return not name.startswith(_SKIPPED_PREFIXES)


def choose_interface(configured: str | None) -> Interface:
    """The configured interface, else the one the default route leaves through."""
    from pyroute2 import IPRoute  # deferred: ~100 ms of imports a CLI call does not need

    with IPRoute() as ipr:
        if configured:
            found = ipr.link_lookup(ifname=configured)
            if not found:
                raise InterfaceError(f"mdns.interface {configured!r} does not exist on this host")
            index = found[0]
        else:
            index = _default_route_index(ipr)
        name = ipr.get_links(index)[0].get_attr("IFLA_IFNAME")
        ip4, ip6 = _addresses(ipr, index)
    return Interface(name=name, index=index, ip4=ip4, ip6=ip6)


def _default_route_index(ipr: object) -> int:
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.get_default_routes(family=family):  # type: ignore[attr-defined]
            index = route.get_attr("RTA_OIF")
            name = ipr.get_links(index)[0].get_attr("IFLA_IFNAME")  # type: ignore[attr-defined]
            if index and usable(name):
                return int(index)
    raise InterfaceError(
        "no default route on a usable interface: set mdns.interface (SUGARKUBE_MDNS_INTERFACE)"
    )


def _addresses(ipr: object, index: int) -> tuple[str, str]:
    ip4 = ""
    ip6_global = ip6_link = ""
    for msg in ipr.get_addr(index=index):  # type: ignore[attr-defined]
        text = msg.get_attr("IFA_ADDRESS")
        if msg["family"] == socket.AF_INET and not ip4:
            ip4 = text
        elif msg["family"] == socket.AF_INET6:
            if ipaddress.IPv6Address(text).is_link_local:
                ip6_link = ip6_link or text
            else:
                ip6_global = ip6_global or text
    return ip4, ip6_global or ip6_link
