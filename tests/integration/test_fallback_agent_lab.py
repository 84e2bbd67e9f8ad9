"""The agent with SUGARKUBE_MDNS_DBUS=0: static service file and live rounds, no D-Bus at all."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.integration.formation import PiNode, wait_formed
from tests.integration.helpers import PYTHON, avahi_browse, node_env, unescape_browse, wait_for

pytestmark = pytest.mark.lab

K3S = "_k3s-sugar-dev._tcp"
SERVICE = "/etc/avahi/services/sugarkube.service"


def test_two_nodes_without_dbus_form_one_cluster(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(2)
    nodes = [PiNode(n, tmp_path, SUGARKUBE_MDNS_DBUS="0", SUGARKUBE_SERVERS="2").start()
             for n in lab.nodes]
    released = wait_formed(nodes, 60)
    assert sorted(r["mode"] for r in released) == ["cluster-init", "join-server"]
    assert nodes[0].ca() == nodes[1].ca() is not None
    service = lab.node(1).path(SERVICE)
    assert stat.S_IMODE(service.stat().st_mode) == 0o644
    names = {unescape_browse(r[3]) for r in avahi_browse(lab.node(2), K3S)}
    assert any(n.startswith("k3s-sugar-dev@node1.local (") for n in names), names
    status = lab.node(1).run(PYTHON, "-m", "agent", "status", env=node_env())
    assert "mDNS without D-Bus" in status.stdout
    first = nodes[0].agent
    assert first is not None and first.events("mdns_without_dbus")
    assert first.stop() == 0
    assert not service.exists()  # withdrawn: avahi-daemon sends the goodbyes
    wait_for("node1's advert gone from node2's avahi", lambda: not any(
        unescape_browse(r[3]).startswith("k3s-sugar-dev@node1.local (")
        for r in avahi_browse(lab.node(2), K3S)), 10)
