"""Formation on an IPv6-only link (issue 11, point 5): live rounds ask from the link's IPv6
address, proofs dial what the advert offers (its TXT ip6=), the join URL brackets the address
(k3s.api_url, which also escapes a link-local zone: tests/unit/test_k3s.py). Real avahi-daemon
and dbus-daemon; the lab's k3s stand-in listens on IPv6 too."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.cluster import k3s
from tests.integration.formation import PiNode, wait_formed
from tests.integration.helpers import wait_for
from tests.lab import Node

pytestmark = pytest.mark.lab


ULA = "fd53:6b75:6761::"  # a unique local prefix, as a home router's SLAAC hands out


def _ipv6_only(node: Node) -> None:
    """No IPv4 address and no IPv4 route: a unique local IPv6 address and an IPv6 default."""
    node.run("sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0", check=True)
    node.run("ip", "-4", "addr", "flush", "dev", "eth0", check=True)
    node.run("ip", "-6", "addr", "add", f"{ULA}{node.index}/64", "dev", "eth0", "nodad",
             check=True)  # fmt: skip
    node.run("ip", "-6", "route", "replace", "default", "dev", "eth0", check=True)
    wait_for(f"{node.name}: a usable link-local IPv6 address (mDNS sends from it)", lambda: (
        "fe80::" in node.run("ip", "-6", "addr", "show", "dev", "eth0", "scope", "link",
                             "-tentative").stdout), 10)  # fmt: skip


def test_two_nodes_form_on_an_ipv6_only_link(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(2)
    for node in lab.nodes:
        _ipv6_only(node)
    first = PiNode(lab.node(1), tmp_path, SUGARKUBE_SERVERS="1").start()
    (released,) = wait_formed([first], 40)  # two live rounds of absence, asked over IPv6
    assert released["mode"] == "single"
    late = PiNode(lab.node(2), tmp_path, SUGARKUBE_SERVERS="1").start()
    (joined,) = wait_formed([late], 40)
    assert joined["mode"] == "join-agent"
    dropin = late.node.path("/" + k3s.OUR_DROPIN).read_text()
    assert f"server: https://[{ULA}1]:6443" in dropin, dropin
    assert late.ca() == first.ca()
