"""The advert and the peer table against real avahi-daemon and dbus-daemon in lab nodes."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from agent.mdns.records import Advert, Role, encode_txt
from tests.integration.helpers import (
    Agent,
    Probe,
    avahi_browse,
    node_ip6,
    txt_of_browse_line,
    unescape_browse,
    wait_for,
)

pytestmark = pytest.mark.lab

K3S = "_k3s-sugar-dev._tcp"
HTTPS = "_https._tcp"
NODE1_NAME = "k3s-sugar-dev@node1.local (candidate)"


def _added(name: str):  # type: ignore[no-untyped-def]
    return lambda line: line.get("kind") in {"added", "updated"} and line.get("name") == name


def test_advert_seen_under_both_types_with_exact_txt(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(2)
    node1, node2 = lab.node(1), lab.node(2)
    agent = Agent(node1, tmp_path / "agent1.log")
    agent.wait_event("advert_published", 15)
    # A fresh namespace's link-local IPv6 is tentative for ~1-2 s (duplicate address
    # detection); the agent leaves ip6= empty until it is usable, then updates the TXT.
    ip6 = f"ip6={node_ip6(node1)}".encode().hex()
    expected: list[str] = []
    for stype in (K3S, HTTPS):
        probe = Probe(node2, "browse_probe", stype, "10")
        line = probe.expect(
            lambda ln: ln.get("kind") in ("added", "updated") and ln.get("name") == NODE1_NAME
            and ip6 in ln["txt"], 8,
        )
        txt = [bytes.fromhex(t).decode() for t in line["txt"]]
        key = txt[10].removeprefix("key=")  # the election key: random, 64 bits in hex
        assert re.fullmatch(r"[0-9a-f]{16}", key), txt
        boot = txt[-1].removeprefix("boot=")  # no token here: no mac= after it
        assert re.fullmatch(r"0{7}1[0-9a-f]{8}", boot), txt  # its first start, then random
        expected = [
            t.decode()
            for t in encode_txt(
                Advert(  # alone, it votes for itself (election.py, rule 2)
                    cluster="sugar", env="dev", role=Role.CANDIDATE, phase="discover",
                    host="node1.local", leader="node1.local", ip4=node1.addr,
                    ip6=node_ip6(node1), key=key, vote=key, servers="3", boot=boot,
                )
            )
        ]
        assert txt == expected
        assert line["port"] == 6443
        assert line["host"] == "node1.local"
        probe.close()
        # The stock client, which we did not write, sees the same record.
        rows = [r for r in avahi_browse(node2, stype) if r[2] == "IPv4"]
        assert [unescape_browse(r[3]) for r in rows] == [NODE1_NAME]
        assert rows[0][7] == node1.addr
        assert rows[0][8] == "6443"
        assert txt_of_browse_line(rows[0]) == expected
    assert agent.proc.poll() is None


def test_sigterm_withdraws_and_peer_sees_removal_within_2s(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(2)
    agent = Agent(lab.node(1), tmp_path / "agent1.log")
    probe = Probe(lab.node(2), "browse_probe", K3S, "30")
    probe.expect(_added(NODE1_NAME), 15)
    sent = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    probe.expect(lambda ln: ln.get("kind") == "removed" and ln.get("name") == NODE1_NAME, 2.0)
    assert time.monotonic() - sent < 2.0
    assert agent.proc.wait(5) == 0
    assert agent.events("advert_withdrawn")
    assert "Traceback" not in agent.text()


def test_kill_9_frees_the_group_and_peer_sees_removal(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(2)
    node1 = lab.node(1)
    agent = Agent(node1, tmp_path / "agent1.log")
    probe = Probe(lab.node(2), "browse_probe", K3S, "30")
    probe.expect(_added(NODE1_NAME), 15)
    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(5)
    # avahi-daemon frees a client's groups when its bus connection drops, with goodbyes.
    probe.expect(lambda ln: ln.get("kind") == "removed" and ln.get("name") == NODE1_NAME, 3.0)
    assert not [r for r in avahi_browse(node1, K3S) if unescape_browse(r[3]) == NODE1_NAME]


def test_avahi_restarts_five_times_advert_returns_each_time(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(2)
    node1, node2 = lab.node(1), lab.node(2)
    agent = Agent(node1, tmp_path / "agent1.log")
    agent.wait_event("advert_published", 15)
    probe = Probe(node2, "browse_probe", K3S, "120")
    probe.expect(_added(NODE1_NAME), 10)
    for attempt in range(5):
        published = len(agent.events("advert_published"))
        node1.restart_avahi()
        wait_for(
            f"advert re-published after restart {attempt + 1}",
            lambda n=published: len(agent.events("advert_published")) > n,  # type: ignore[misc]
            15,
        )
        assert agent.proc.poll() is None, agent.tail()
    # Exactly one entry group's worth: one instance per type (in whichever role the lone node
    # has reached by now), no "#2" left behind.
    for stype in (K3S, HTTPS):
        names = wait_for(
            f"{stype} on node2",
            lambda s=stype: {unescape_browse(r[3]) for r in avahi_browse(node2, s)},  # type: ignore[misc]
            10,
        )
        assert len(names) == 1, names
        (name,) = names
        assert name.startswith("k3s-sugar-dev@node1.local (") and "#" not in name, name
    assert "Traceback" not in agent.text()


def test_same_hostname_both_adverts_visible_under_distinct_names(
    lab_factory, tmp_path: Path
) -> None:
    lab = lab_factory(3, hostnames=["twin", "twin", "observer"])
    agents = [Agent(lab.node(i), tmp_path / f"agent{i}.log") for i in (1, 2)]
    for agent in agents:
        agent.wait_event("advert_published", 20)

    def names() -> set[str] | None:
        seen = {unescape_browse(r[3]) for r in avahi_browse(lab.node(3), K3S)}
        return seen if len(seen) == 2 else None

    seen = wait_for("two distinct adverts on the observer", names, 20)
    assert all(name.startswith("k3s-sugar-dev@twin.local (") for name in seen), seen
    assert any(agent.events("advert_renamed") for agent in agents)
    # Each twin sees the other as a peer, not as itself: one election, not two.
    for agent in agents:
        agent.wait_event("peer_added", 10, local="false")


def test_local_name_collision_takes_avahis_alternative_name(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(2)
    node1 = lab.node(1)
    squatter = node1.spawn("avahi-publish", "-s", NODE1_NAME, K3S, "6443", "k3s=0")
    wait_for(
        "the squatter's advert", lambda: avahi_browse(lab.node(2), K3S), 10
    )
    agent = Agent(node1, tmp_path / "agent1.log")
    renamed = agent.wait_event("advert_renamed", 15)
    assert renamed["alternative"] == f"{NODE1_NAME} #2"
    agent.wait_event("advert_published", 15, name=f"{NODE1_NAME} #2")
    squatter.terminate()


def test_hostile_publisher_is_ignored_or_parsed_and_logged_once(
    lab_factory, tmp_path: Path
) -> None:
    lab = lab_factory(2)
    node1, node2 = lab.node(1), lab.node(2)
    agent = Agent(node2, tmp_path / "agent2.log")
    agent.wait_event("advert_published", 15)
    junk = {
        # binary TXT and no required keys: ignored
        "k3s-sugar-dev@junk.local (candidate)": [b"\xff\xfe\x01\x7f", b"=novalue", b"k3s"],
        # usable despite noise: duplicate keys (first wins), a 255-byte string, an item without =
        "k3s-sugar-dev@noisy.local (candidate)": [
            b"k3s=1", b"cluster=sugar", b"env=dev", b"role=candidate", b"role=server",
            b"phase=discover", b"host=Noisy.local.local.", b"x=" + b"a" * 253, b"flag",
        ],
        # another cluster's advert: ignored
        "k3s-sugar-dev@other.local (candidate)": [b"k3s=1", b"cluster=other", b"env=dev",
                                                   b"role=candidate"],
    }
    for name, txt in junk.items():
        node1.spawn("avahi-publish", "-s", name, K3S, "6443", *[os.fsdecode(t) for t in txt])
    noisy = agent.wait_event("peer_added", 15, name="k3s-sugar-dev@noisy.local (candidate)")
    assert noisy["role"] == "candidate"
    assert noisy["host"] == "noisy.local"  # the TXT host=, normalized
    assert noisy["target"] == "node1.local"  # the SRV target Avahi resolved
    agent.wait_event("record_ignored", 15, name="k3s-sugar-dev@junk.local (candidate)")
    agent.wait_event("record_ignored", 15, name="k3s-sugar-dev@other.local (candidate)")
    time.sleep(2)  # Avahi re-announces; each record is still reported only once
    for name in ("junk", "other"):
        full = f"k3s-sugar-dev@{name}.local (candidate)"
        assert len([e for e in agent.events("record_ignored") if e["name"] == full]) == 1
    assert agent.proc.poll() is None
    assert "Traceback" not in agent.text()


def test_peer_table_converges_and_discover_finds_nodes(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(3)
    agents = [Agent(lab.node(i), tmp_path / f"agent{i}.log") for i in (1, 2, 3)]
    for agent in agents:
        for i in (1, 2, 3):
            agent.wait_event("peer_added", 20, name=f"k3s-sugar-dev@node{i}.local (candidate)")
    done = lab.node(2).run(
        "/usr/bin/python3", "-m", "agent", "discover", "--json", "--timeout", "5",
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert {s["host"] for s in found["servers"]} == {"node1.local", "node2.local", "node3.local"}
    assert all(s["ms_elapsed"] >= 0 for s in found["servers"])
    for agent in agents:
        assert agent.stop() == 0


def test_discover_finds_none_exits_1(lab_factory) -> None:
    lab = lab_factory(1)
    done = lab.node(1).run(
        "/usr/bin/python3", "-m", "agent", "discover", "--timeout", "2",
        env={"PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert done.returncode == 1, done.stderr
    assert "no _k3s-sugar-dev._tcp adverts found" in done.stdout


def test_txt_update_in_place_and_rename_on_role_change(lab_factory) -> None:
    lab = lab_factory(2)
    publisher = Probe(lab.node(1), "publish_probe", K3S, HTTPS, stdin=True)
    browser = Probe(lab.node(2), "browse_probe", K3S, "60")
    base = ["k3s=1", "cluster=sugar", "env=dev"]
    first = "k3s-sugar-dev@node1.local (candidate)"
    publisher.send(name=first, txt=[*base, "role=candidate", "phase=discover"])
    browser.expect(_added(first), 10)
    publisher.send(name=first, txt=[*base, "role=candidate", "phase=elect"])
    browser.expect(lambda ln: ln.get("kind") == "updated" and ln["name"] == first
                   and bytes.fromhex(ln["txt"][-1]) == b"phase=elect", 5)
    assert not [ln for ln in browser.seen if ln.get("kind") == "removed"]  # in place, no rename
    second = "k3s-sugar-dev@node1.local (server)"
    publisher.send(name=second, txt=[*base, "role=server", "phase=server"])
    # Both, in either order: the peer expires the old name 1 s after its goodbye (RFC 6762
    # §10.1) and learns the new one once Avahi has probed it (~1 s).
    wanted = {("added", second), ("removed", first)}
    while wanted:
        line = browser.expect(lambda ln: (ln.get("kind"), ln.get("name")) in wanted, 5)
        wanted.discard((line["kind"], line["name"]))


def test_legacy_browser_path_sees_the_advert(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(2)
    Agent(lab.node(1), tmp_path / "agent1.log").wait_event("advert_published", 15)
    probe = Probe(lab.node(2), "browse_probe", K3S, "8", "--legacy")
    probe.expect(_added(NODE1_NAME), 8)


def test_a_peer_learns_the_name_only_with_its_records(lab_factory) -> None:
    """Avahi answers for a shared PTR while it still probes the SRV and TXT of the same service
    (agent/avahi/rdata.py): a peer asking then would learn a name it cannot resolve. Asked every
    0.1 s from before the publish on, node1 must never name the instance before its SRV."""
    lab = lab_factory(2)
    node2 = lab.node(2)
    answers = Probe(node2, "answer_probe", K3S, node2.addr, "4")
    publisher = Probe(lab.node(1), "publish_probe", K3S, HTTPS, stdin=True)
    publisher.send(name=NODE1_NAME, txt=["k3s=1", "cluster=sugar", "env=dev", "role=candidate"])
    answers.expect(lambda line: line.get("kind") == "done", 10)
    instance = f"{NODE1_NAME}.{K3S}.local."
    heard = [line for line in answers.seen if line.get("kind") == "answer"]

    def first(rtype: int, name: str, target: str = "") -> float:
        times = [line["t"] for line in heard for kind, owner, ttl, alias in line["records"]
                 if (kind, owner) == (rtype, name) and ttl > 0 and (not target or alias == target)]
        assert times, f"never heard type {rtype} for {name}: {heard[-4:]}"
        return min(times)

    assert first(33, instance) <= first(12, f"{K3S}.local.", instance)
