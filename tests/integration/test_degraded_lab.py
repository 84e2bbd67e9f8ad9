"""The gate never waits on what k3s does not need (issue 11, point 2): a member whose
configuration does not load, or which has no default route, releases from its local state; a
metrics port that cannot be bound degrades the daemon instead of ending it. Real avahi-daemon
and dbus-daemon in lab nodes, k3s the lab's stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.formation import TOKEN, PiNode, formed_member, wait_formed
from tests.integration.helpers import PYTHON, Agent, node_env, wait_for
from tests.lab import Node

pytestmark = pytest.mark.lab

CONFIG = "/etc/sugarkube/agent.yaml"


def _gate(node: Node, role: str) -> tuple[int, str]:
    done = node.run(PYTHON, "-m", "agent", "gate", "--role", role, "--timeout", "5",
                    env=node_env(), timeout=20)  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def _status(node: Node) -> dict[str, object]:
    done = node.run(PYTHON, "-m", "agent", "status", "--json", env=node_env(), timeout=20)
    assert done.returncode == 0, done.stderr
    snapshot: dict[str, object] = json.loads(done.stdout)
    return snapshot


def test_a_member_whose_config_does_not_load_releases_and_starts_whole_on_reload(
    lab_factory, tmp_path: Path
) -> None:
    pi = formed_member(lab_factory(1).node(1), tmp_path)
    node = pi.node
    config = node.path(CONFIG)
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("servers: three\n")  # a typo on a node that holds state
    env = {"SUGARKUBE_TOKEN": TOKEN, "SUGARKUBE_SERVERS": "1"}
    agent = Agent(node, tmp_path / "typo.log", env=env)
    degraded = agent.wait_event("degraded_release", 10)
    assert degraded["role"] == "server" and degraded["what"] == "config", degraded
    assert agent.proc.poll() is None  # not exit 78: k3s would stay gated after every reboot
    assert _gate(node, "server")[0] == 0
    code, said = _gate(node, "agent")
    assert code == 3 and "this node runs k3s.service" in said, said
    snapshot = _status(node)
    assert snapshot["release_role"] == "server"
    assert "servers" in str(snapshot["degraded"]) and CONFIG in str(snapshot["degraded"])
    assert str(snapshot["status"]).startswith("degraded: ")
    # Fixed, and reloaded: the daemon starts whole and advertises the member again.
    config.write_text("servers: 1\n")
    agent.proc.send_signal(1)  # SIGHUP: `systemctl reload sugarkube-agent`
    agent.wait_event("started", 15)
    released = agent.wait_event("gate_released", 15)
    assert released["mode"] == "member"
    agent.wait_event("advert_published", 15)
    assert "Traceback" not in agent.text()


def test_a_fresh_node_whose_config_does_not_load_still_exits_78(lab_factory, tmp_path: Path):
    node = lab_factory(1).node(1)
    config = node.path(CONFIG)
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("servers: three\n")
    done = node.run(PYTHON, "-m", "agent", "run", env=node_env(SUGARKUBE_TOKEN=TOKEN), timeout=20)
    assert done.returncode == 78, done.stderr
    assert "servers" in done.stderr and "Traceback" not in done.stderr


def test_a_member_without_a_default_route_releases_then_forms_when_one_appears(
    lab_factory, tmp_path: Path
) -> None:
    pi = formed_member(lab_factory(1).node(1), tmp_path)
    node = pi.node
    node.run("ip", "route", "del", "default", check=True)
    agent = Agent(node, tmp_path / "noroute.log",
                  env={"SUGARKUBE_TOKEN": TOKEN, "SUGARKUBE_SERVERS": "1"})  # fmt: skip
    degraded = agent.wait_event("degraded_release", 10)
    assert degraded["what"] == "interface", degraded
    assert _gate(node, "server")[0] == 0
    assert "interface" in _status(node)["degraded"]  # type: ignore[operator]
    node.run("ip", "route", "add", "default", "dev", "eth0", check=True)
    agent.wait_event("interface_found", 10)
    agent.wait_event("advert_published", 15)
    assert agent.proc.poll() is None


def test_a_metrics_port_taken_degrades_the_daemon_and_is_bound_once_free(
    lab_factory, tmp_path: Path
) -> None:
    node = lab_factory(1).node(1)
    squatter = node.spawn(PYTHON, "-c", (
        "import socket, time; s = socket.socket(); s.bind(('0.0.0.0', 9469)); s.listen(); "
        "time.sleep(8)"
    ), log=tmp_path / "squatter.log")  # fmt: skip
    wait_for("the squatter's port", lambda: _bound(node, 9469), 10)
    pi = PiNode(node, tmp_path, SUGARKUBE_SERVERS="1").start()
    assert pi.agent is not None
    degraded = pi.agent.wait_event("degraded", 15, what="metrics")
    assert "9469" in degraded["reason"]
    (released,) = wait_formed([pi], 30)  # formed and released all the same
    assert released["mode"] == "single"
    assert "metrics" in _status(node)["degraded"]  # type: ignore[operator]
    squatter.wait(20)
    pi.agent.wait_event("degraded_recovered", 40, what="metrics")
    assert _bound(node, 9469)
    assert _status(node)["degraded"] == {}


def _bound(node: Node, port: int) -> bool:
    """Whether something listens on TCP PORT inside NODE (a connect succeeds)."""
    done = node.run(PYTHON, "-c", (
        f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1).close()"
    ), env=node_env(), timeout=10)  # fmt: skip
    return done.returncode == 0


