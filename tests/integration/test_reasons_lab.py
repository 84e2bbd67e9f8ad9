"""STATUS tells the real reason (issue 11, point 4), against real avahi-daemon and dbus-daemon
and the lab's k3s stand-in."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.integration.faults import wait_status
from tests.integration.formation import TOKEN, PiNode, formed_member, wait_formed
from tests.integration.helpers import PYTHON, Agent, avahi_browse, node_env, wait_for

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


def test_a_member_restarted_under_another_env_refuses_and_advertises_nothing(
    lab_factory, tmp_path: Path
) -> None:
    lab = lab_factory(2)
    node = formed_member(lab.node(1), tmp_path).node
    config = node.path("/etc/sugarkube/agent.yaml")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("env: prod\nservers: 1\n")
    # Empty variables are unset: the file decides (the lab's Agent sets the env to dev).
    agent = Agent(node, tmp_path / "prod.log", env={
        "SUGARKUBE_TOKEN": TOKEN, "SUGARKUBE_ENV": "", "SUGARKUBE_SERVERS": ""})
    refused = agent.wait_event("settings_refused", 10)
    assert refused["reason"].startswith(
        "this node joined cluster=sugar env=dev servers=1, the configuration says cluster=sugar "
        "env=prod servers=1"), refused
    agent.wait_event("degraded_release", 5)
    done = node.run(PYTHON, "-m", "agent", "gate", "--role", "server", "--timeout", "5",
                    env=node_env())  # fmt: skip
    assert done.returncode == 0, done.stderr  # its k3s is its own: it runs
    time.sleep(2)
    assert not agent.events("advert_published")  # nothing under _k3s-sugar-prod._tcp
    assert not avahi_browse(lab.node(2), "_k3s-sugar-prod._tcp")
    config.write_text("env: dev\nservers: 1\n")
    agent.proc.send_signal(signal.SIGHUP)
    agent.wait_event("started", 15)
    agent.wait_event("advert_published", 15)


def test_a_server_whose_address_changed_since_it_joined_says_so(
    lab_factory, tmp_path: Path
) -> None:
    node = formed_member(lab_factory(1).node(1), tmp_path).node
    old = f"{node.addr}/24"
    new = node.addr.rsplit(".", 1)[0] + ".201/24"
    node.run("ip", "addr", "add", new, "dev", "eth0", check=True)
    node.run("ip", "addr", "del", old, "dev", "eth0", check=True)
    node.run("ip", "route", "replace", "default", "dev", "eth0", check=True)
    agent = Agent(node, tmp_path / "moved.log",
                  env={"SUGARKUBE_TOKEN": TOKEN, "SUGARKUBE_SERVERS": "1"})  # fmt: skip
    wait_for("the moved note", lambda: any(
        "this node's address changed since it joined: etcd's peers know it by the old one"
        in e.get("status", "") for e in agent.events("phase")), 15)


def test_a_peer_with_another_servers_setting_is_reported(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(2)
    first = PiNode(lab.node(1), tmp_path, SUGARKUBE_SERVERS="1").start()
    wait_formed([first], 30)
    other = PiNode(lab.node(2), tmp_path, SUGARKUBE_SERVERS="3").start()
    assert other.agent is not None
    mismatch = other.agent.wait_event("settings_mismatch", 15)
    assert (mismatch["peer"], mismatch["peer_servers"], mismatch["servers"]) == (
        "node1.local", "1", "3")
    wait_status(other, "node1.local runs with servers=1, this node 3: set SUGARKUBE_SERVERS", 15)
