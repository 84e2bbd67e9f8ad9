"""STATUS tells the real reason (issue 11, point 4), against real avahi-daemon and dbus-daemon
and the lab's k3s stand-in."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.faults import wait_status
from tests.integration.formation import PiNode, wait_formed

pytestmark = pytest.mark.lab


def test_a_joiner_whose_clock_is_behind_says_so_in_status(
    lab_factory, tmp_path: Path
) -> None:
    """node2's clock is a day behind node1's (a Pi without an RTC battery before NTP): the
    cluster's certificate is not yet valid there, and node2's STATUS says so. (node1's own
    agent shares the host's clock too, so it never sees its API serve and advertises
    `starting`: the cluster is known either way; that a *serving* server failing so still
    blocks a bootstrap is test_election's.)"""
    lab = lab_factory(2)
    server = PiNode(lab.node(1), tmp_path, SUGARKUBE_SERVERS="1",
                    K3S_STANDIN_CLOCK_AHEAD="86400").start()  # fmt: skip
    wait_formed([server], 30)
    late = PiNode(lab.node(2), tmp_path, SUGARKUBE_SERVERS="1").start()
    wait_status(late, "(last proof: certificate not yet valid: this node's clock is behind", 30)
    time.sleep(12)  # past a retry: still no cluster of its own
    assert late.released() is None
    assert late.agent is not None and not late.agent.events("election_won")
