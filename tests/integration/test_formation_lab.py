"""Cluster formation on lab nodes: real avahi-daemon/dbus-daemon, the agent, and gated k3s."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.cluster import k3s
from tests.integration.formation import TOKEN, PiNode, assert_one_cluster, form, wait_formed
from tests.integration.helpers import (
    PYTHON,
    Agent,
    avahi_browse,
    node_env,
    unescape_browse,
    wait_for,
)

pytestmark = pytest.mark.lab

K3S = "_k3s-sugar-dev._tcp"


def _seeds(n: int, quick: int) -> list[object]:
    """n seeds: the first `quick` in `make test`, the rest slow (`make test-all`); the
    simulator (tests/sim) covers the schedules at large, these the real daemons."""
    return [s if s < quick else pytest.param(s, marks=pytest.mark.slow) for s in range(n)]


def _assert_one_cluster(nodes: list[PiNode], released: list[dict[str, str]]) -> None:
    modes = sorted(r["mode"] for r in released)
    assert modes.count("cluster-init") == 1, modes
    assert modes.count("join-server") == len(nodes) - 1, modes
    cas = {pi.ca() for pi in nodes}
    assert len(cas) == 1 and None not in cas, cas
    assert_one_cluster(nodes, len(nodes))  # and etcd agrees: one cluster ID, every one a voter


@pytest.mark.parametrize("seed", _seeds(10, quick=1))
def test_three_fresh_nodes_form_exactly_one_cluster(lab_factory, tmp_path: Path, seed: int) -> None:
    lab = lab_factory(3)
    nodes = form(lab, tmp_path, jitter=1.0 if seed % 2 else 2.0, seed=seed)
    _assert_one_cluster(nodes, wait_formed(nodes, 40))


@pytest.mark.slow  # in make test-all: make test stays under its time budget
@pytest.mark.parametrize("seed", _seeds(10, quick=1))
def test_three_nodes_with_5_percent_mdns_loss_form_one_cluster(
    lab_factory, tmp_path: Path, seed: int
) -> None:
    lab = lab_factory(3)
    for node in lab.nodes:
        node.mdns_loss(5)
    nodes = form(lab, tmp_path, jitter=2.0, seed=100 + seed)
    _assert_one_cluster(nodes, wait_formed(nodes, 60))


def test_a_node_booting_into_a_formed_cluster_joins_as_agent(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(4)
    first = [PiNode(n, tmp_path).start() for n in lab.nodes[:3]]
    _assert_one_cluster(first, wait_formed(first, 40))
    for pi in first:  # an existing cluster: every server advertises as one
        assert pi.agent is not None
        name = f"k3s-sugar-dev@{pi.node.name}.local (server)"
        pi.agent.wait_event("advert_published", 15, name=name)
    late = PiNode(lab.node(4), tmp_path).start()
    (released,) = wait_formed([late], 20)
    assert released["mode"] == "join-agent"
    assert late.agent is not None
    assert not late.agent.events("election_won")
    assert int(released["ms_elapsed"]) < 3000, released
    assert late.ca() == first[0].ca()
    assert_one_cluster([*first, late], 3)  # the agent is no etcd member


def _roles(nodes: list[PiNode]) -> dict[str, str]:
    """Each node's role, from which k3s unit its gate skipped: never both, never neither."""
    roles = {}
    for pi in nodes:
        units = pi.units_run()
        skipped = {unit for unit, events in units.items() if events == ["skipped"]}
        assert len(skipped) == 1, (pi.node.name, units)  # one skip, no restart loop
        roles[pi.node.name] = "agent" if skipped == {"k3s"} else "server"
    return roles


def test_five_nodes_three_servers_agents_run_k3s_agent_across_a_power_cut(
    lab_factory, tmp_path: Path
) -> None:
    """servers=3 on five nodes: two run `k3s agent` (k3s-agent.service; k3s.service skipped
    by its gate), never etcd members; after every node loses power they come back in the
    same roles, released at once as members, and etcd is the same cluster of three."""
    lab = lab_factory(5)
    pis = form(lab, tmp_path, jitter=2.0, seed=5)
    modes = sorted(r["mode"] for r in wait_formed(pis, 120))
    assert modes == ["cluster-init", "join-agent", "join-agent", "join-server", "join-server"]
    roles = _roles(pis)
    assert sorted(roles.values()) == ["agent", "agent", "server", "server", "server"], roles
    for pi in pis:
        expected = k3s.Membership.AGENT if roles[pi.node.name] == "agent" else (
            k3s.Membership.SERVER)
        assert k3s.membership(pi.node.path("/")) is expected, pi.node.name
    cluster = assert_one_cluster(pis, 3)
    for pi in pis:
        pi.power_cut()
    for pi in pis:
        pi.boot()
    assert {r["mode"] for r in wait_formed(pis, 60)} == {"member"}
    assert _roles(pis) == roles
    assert assert_one_cluster(pis, 3) == cluster
    for pi in pis:
        gate = pi.node.run(PYTHON, "-m", "agent", "gate", "--role", "agent", "--timeout", "5",
                           env=node_env())  # fmt: skip
        if roles[pi.node.name] == "agent":
            assert gate.returncode == 0, gate.stderr
        else:
            assert gate.returncode == 3, gate.stderr
            assert "this node runs k3s.service, not k3s-agent.service" in gate.stderr


def test_impostor_without_the_tokens_mac_is_ignored_and_never_joined(
    lab_factory, tmp_path: Path
) -> None:
    lab = lab_factory(3)
    real = PiNode(lab.node(1), tmp_path, SUGARKUBE_SERVERS="1").start()
    wait_formed([real], 30)
    server_token = lab.node(1).path("/var/lib/rancher/k3s/server/token").read_text().strip()
    assert server_token.startswith("K10")
    # The impostor: its own cluster (its own CA), advertised as a server of ours, lower key.
    evil = lab.node(2)
    evil.spawn(PYTHON, "-m", "tests.lab.k3s_standin", "server", "--serve-delay", "0",
               log=tmp_path / "evil-k3s.log", env=node_env())
    evil.spawn(
        "avahi-publish", "-s", "k3s-sugar-dev@evil.local (server)", K3S, "6443", "k3s=1",
        "cluster=sugar", "env=dev", "role=server", "phase=serving", "host=evil.local",
        f"ip4={evil.addr}", "key=0000000000000000",
    )
    wait_for("the impostor's advert", lambda: [
        r for r in avahi_browse(lab.node(3), K3S) if "evil" in unescape_browse(r[3])], 10)
    joiner = PiNode(lab.node(3), tmp_path, token=server_token, SUGARKUBE_SERVERS="1").start()
    (released,) = wait_formed([joiner], 30)
    assert joiner.agent is not None
    # Its advert carries no MAC from the cluster's token: never proven, never joined.
    ignored = [e for e in joiner.agent.events("record_ignored") if "evil" in e["name"]]
    assert [e["reason"] for e in ignored] == ["unauthenticated"]
    assert not joiner.agent.events("join_refused")
    assert released["leader"] == "node1.local"
    assert joiner.ca() == real.ca()


def test_dead_server_in_avahis_cache_is_not_present_for_the_gate(
    lab_factory, tmp_path: Path
) -> None:
    lab = lab_factory(2)
    node1, node2 = lab.node(1), lab.node(2)
    server = PiNode(node1, tmp_path, SUGARKUBE_SERVERS="1").start()
    wait_formed([server], 30)
    wait_for("the server advert in node2's cache", lambda: [
        r for r in avahi_browse(node2, K3S) if "(server)" in unescape_browse(r[3])], 10)
    # Dies without goodbye: the agent, k3s and avahi-daemon all SIGKILLed.
    server.power_cut()
    assert [r for r in avahi_browse(node2, K3S) if "(server)" in unescape_browse(r[3])], (
        "node2's Avahi cache should still list the dead server"
    )
    # It claims to serve and fails its proof: not a cluster that blocks (Joins.cluster_known).
    fresh = PiNode(node2, tmp_path, SUGARKUBE_SERVERS="1").start()
    (released,) = wait_formed([fresh], 30)
    assert released["mode"] == "single"
    assert fresh.ca() not in (None, server.ca())  # a cluster of its own


def test_member_restart_releases_at_once_without_election(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(1)
    pi = PiNode(lab.node(1), tmp_path, SUGARKUBE_SERVERS="1").start()
    wait_formed([pi], 30)
    assert pi.agent is not None
    assert pi.agent.stop() == 0
    again = Agent(lab.node(1), tmp_path / "again.log",
                  env={"SUGARKUBE_TOKEN": TOKEN, "SUGARKUBE_SERVERS": "1"})  # as it joined
    released = again.wait_event("gate_released", 10)
    assert released["mode"] == "member"
    assert int(released["ms_elapsed"]) < 1000
    assert not again.events("election_won")
    done = lab.node(1).run(PYTHON, "-m", "agent", "gate", "--timeout", "5", env=node_env())
    assert done.returncode == 0, done.stderr


def test_gate_times_out_cleanly_when_avahi_is_down(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(1)
    node = lab.node(1)
    node.stop_avahi()
    agent = Agent(node, tmp_path / "agent.log", env={"SUGARKUBE_TOKEN": TOKEN})
    agent.wait_event("started", 10)
    started = time.monotonic()
    done = node.run(PYTHON, "-m", "agent", "gate", "--timeout", "3", env=node_env(), timeout=20)
    assert done.returncode == 1
    assert time.monotonic() - started < 6
    assert "timed out after 3 s" in done.stderr
    assert "avahi-daemon unavailable" in done.stderr + done.stdout
    assert "Traceback" not in done.stderr
    status = node.run(PYTHON, "-m", "agent", "status", env=node_env())
    assert status.returncode == 0 and "avahi: absent" in status.stdout


def test_gate_without_daemon_exits_69(lab_factory) -> None:
    lab = lab_factory(1)
    done = lab.node(1).run(PYTHON, "-m", "agent", "gate", "--timeout", "1", env=node_env())
    assert done.returncode == 69, done.stderr
    assert "not running" in done.stderr


def test_wipe_confirms_the_advert_left_the_wire(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(2)
    node1 = lab.node(1)
    pi = PiNode(node1, tmp_path, SUGARKUBE_SERVERS="1").start()
    wait_formed([pi], 30)
    refused = node1.run(PYTHON, "-m", "agent", "wipe", env=node_env())
    assert refused.returncode == 2 and "--yes" in refused.stderr
    done = node1.run(PYTHON, "-m", "agent", "wipe", "--yes", env=node_env(), timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "confirmed" in done.stdout
    assert not node1.path("/var/lib/rancher/k3s").exists()
    assert not node1.path("/etc/rancher/k3s/config.yaml.d/50-sugarkube.yaml").exists()
    assert not [r for r in avahi_browse(lab.node(2), K3S) if "node1" in unescape_browse(r[3])]
    again = node1.run(PYTHON, "-m", "agent", "wipe", "--yes", env=node_env(), timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr  # idempotent


def test_wipe_fails_while_another_publisher_answers_for_us(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(2)
    node1, node2 = lab.node(1), lab.node(2)
    node2.spawn(
        "avahi-publish", "-s", "k3s-sugar-dev@node1.local (server)", K3S, "6443", "k3s=1",
        "cluster=sugar", "env=dev", "role=server", "host=node1.local",
    )
    wait_for("the second publisher", lambda: avahi_browse(node1, K3S), 10)
    done = node1.run(PYTHON, "-m", "agent", "wipe", "--yes", env=node_env(), timeout=60)
    assert done.returncode == 1
    assert "still answered on the wire: k3s-sugar-dev@node1.local (server)" in done.stderr


def test_operator_k3s_config_is_read_never_written(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(1)
    node = lab.node(1)
    config = node.path("/etc/rancher/k3s/config.yaml")
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("token: operator-token-1234\nnode-label:\n  - zone=a\n")
    before = config.read_bytes()
    pi = PiNode(node, tmp_path, SUGARKUBE_SERVERS="1").start()
    wait_formed([pi], 30)
    assert pi.agent is not None
    notice = pi.agent.wait_event("operator_k3s_config", 5)
    assert notice["keys"] == "token"
    assert config.read_bytes() == before
    dropin = node.path("/etc/rancher/k3s/config.yaml.d/50-sugarkube.yaml")
    assert oct(dropin.stat().st_mode & 0o777) == "0o600"
    assert "operator-token" not in pi.agent.text()
