"""The unit's capabilities, measured on the daemon in a lab node.

setpriv plays systemd: the bounding set the unit (and the capture drop-in) grants, nothing
inherited or ambient, no new privileges, uid 0. Under exactly that a fresh node stands and
releases; without each grant, the feature that tests/unit/test_units.py says needs it fails.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterable
from pathlib import Path

import pytest

from tests.integration.formation import TOKEN
from tests.integration.helpers import PYTHON, ROOT, Agent, node_env
from tests.lab import Node
from tests.unit.test_units import CAPTURE, UNIT, directives, words

pytestmark = pytest.mark.lab

GRANTED = words(directives(UNIT)["CapabilityBoundingSet"])
WITH_CAPTURE = GRANTED + words(directives(CAPTURE)["CapabilityBoundingSet"])
PROXY_DROPIN = "etc/rancher/k3s/config.yaml.d/10-kube-proxy.yaml"  # nftables, as the runbook
ENV = {"SUGARKUBE_SERVERS": "1", "SUGARKUBE_TOKEN": TOKEN}


def setpriv(caps: Iterable[str]) -> list[str]:
    """setpriv's argv for a root process bounded to CAPS, as the unit's settings make it."""
    bounding = "".join(f",+{cap.removeprefix('CAP_').lower()}" for cap in caps)
    return ["setpriv", f"--bounding-set=-all{bounding}", "--inh-caps=-all",
            "--ambient-caps=-all", "--no-new-privs"]  # fmt: skip


def start(node: Node, log: Path, caps: Iterable[str]) -> tuple[Agent, dict[str, str]]:
    """A fresh node in nftables mode (it runs `nft list tables` before it stands), its agent
    under CAPS, and that agent's verifier run once started (SIGHUP: `systemctl reload`)."""
    target = node.path(f"/{PROXY_DROPIN}")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / PROXY_DROPIN, target)
    agent = Agent(node, log, env=ENV, wrapper=setpriv(caps))
    agent.wait_event("started", 15)
    agent.proc.send_signal(signal.SIGHUP)
    return agent, agent.wait_event("verifier_done", 30)


def test_with_what_the_unit_grants_a_fresh_node_stands_and_releases(
    lab_factory, tmp_path: Path
) -> None:
    agent, verified = start(lab_factory(1).node(1), tmp_path / "agent.log", GRANTED)
    assert "kube_proxy_dataplane" not in verified.get("failing", "")
    agent.wait_event("gate_released", 30)
    assert not agent.events("not_standing"), agent.tail()


@pytest.mark.parametrize("cap", GRANTED)
def test_without_a_grant_of_the_unit_a_fresh_node_does_not_stand(
    lab_factory, tmp_path: Path, cap: str
) -> None:
    assert cap == "CAP_NET_ADMIN"  # any other grant needs its own proof here
    node = lab_factory(1).node(1)
    agent, verified = start(node, tmp_path / "agent.log", (c for c in GRANTED if c != cap))
    assert "kube_proxy_dataplane" in verified["failing"]
    refused = agent.wait_event("not_standing", 5)
    assert "`nft list tables` failed: Operation not permitted" in refused["reason"]
    assert not agent.events("gate_released")


def test_packet_capture_needs_the_capture_dropins_grant(lab_factory) -> None:
    node = lab_factory(1).node(1)
    check = ("from agent.cluster.capture import capture_permitted as p; "
             "print(p())")  # fmt: skip

    def permitted(caps: Iterable[str]) -> str:
        done = node.run(*setpriv(caps), PYTHON, "-c", check, env=node_env(), timeout=20)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert permitted(WITH_CAPTURE) == "True"
    assert permitted(GRANTED) == "False"
