"""The agent's bus against a real dbus-daemon and avahi-daemon: another client of the system bus
cannot speak for Avahi."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.integration.helpers import PYTHON, Agent, node_env, wait_for

pytestmark = pytest.mark.lab

FAKE = "k3s-sugar-dev@evil.local (server)"
REACTIONS = (  # what an agent that believed the forger would log
    "peer_added", "peer_updated", "resolve_failed", "advert_collision", "advert_renamed",
    "advert_failed", "browse_interrupted",
)


def _paths(agent: Agent, interface: str) -> list[str]:
    return sorted({e["path"] for e in agent.events("avahi_signal") if e["interface"] == interface})


def test_signals_forged_by_another_bus_client_are_ignored(lab_factory, tmp_path: Path) -> None:
    node = lab_factory(1).node(1)
    # Debug lines name the paths of the agent's objects, as a forger on the bus could learn them.
    agent = Agent(node, tmp_path / "agent.log", env={"SUGARKUBE_DEBUG_MDNS": "1"})
    agent.wait_event("advert_published", 15)
    browser = wait_for("the browser's path", lambda: _paths(agent, "ServiceBrowser"), 10)
    groups = _paths(agent, "EntryGroup")
    assert groups, agent.tail()
    time.sleep(1.0)  # let the lone candidate's own changes settle before counting reactions
    before = {name: len(agent.events(name)) for name in REACTIONS}

    done = node.run(PYTHON, "-m", "tests.integration.forge_probe", browser[0], *groups, FAKE,
                    env=node_env(), timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    forger = json.loads(done.stdout)
    assert forger["targets"] >= 2  # the agent's connection, and the bus at large

    ignored = agent.wait_event("dbus_signal_ignored", 5, sender=forger["sender"])
    assert ignored["owner"] != forger["sender"]
    time.sleep(1.0)  # a believer acts within milliseconds (a forged Found is a peer at once)
    assert {name: len(agent.events(name)) for name in REACTIONS} == before, agent.tail(30)
    assert FAKE not in agent.text()
    assert len(agent.events("dbus_signal_ignored")) == 1  # logged once, however many it sent
    status = node.run(PYTHON, "-m", "agent", "status", "--json", env=node_env(), timeout=20)
    assert status.returncode == 0, status.stderr
    assert "evil" not in status.stdout
    assert agent.proc.poll() is None
