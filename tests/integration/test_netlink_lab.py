"""The netlink watch and the interface choice inside a lab node, against the real kernel.

The node's eth0 is renumbered and its link flipped with `ip`, as a DHCP client or an unplugged
cable would; the probe prints each InterfaceEvent with its arrival time. Latencies are measured on
CLOCK_REALTIME, which lab nodes share with the host (run with -s to see the figures).
"""

from __future__ import annotations

import json
import queue
import statistics
from collections.abc import Iterator
from typing import Any

import pytest

from agent import const
from tests.integration.helpers import PYTHON, Probe, node_env, wait_for
from tests.lab import Node

pytestmark = pytest.mark.lab

DEADLINE = 1.0  # s from a change to its event (issue 5: the peer sees the new ip4 within 2 s)
DAD = 5.0  # s for IPv6 duplicate address detection to clear the link-local address after up
FLIPS = 20


@pytest.fixture
def node(lab_factory: Any) -> Node:
    """A fresh lab node whose eth0 link-local address has passed DAD (no event still to come)."""
    node = lab_factory(1).node(1)

    def settled() -> bool:
        done = node.run("ip", "-6", "-o", "addr", "show", "dev", "eth0", check=True).stdout
        return "fe80:" in done and "tentative" not in done

    wait_for("eth0's IPv6 link-local address to pass DAD", settled, DAD)
    return node


@pytest.fixture
def watcher(node: Node) -> Iterator[Probe]:
    probe = Probe(node, "netlink_probe", "watch", "eth0")
    yield probe
    probe.close()


def change(node: Node, *commands: str) -> tuple[float, float]:
    """Run the `ip` commands in NODE; CLOCK_REALTIME just before the first and after the last."""
    script = "set -e; date +%s.%N; " + "; ".join(commands) + "; date +%s.%N"
    done = node.run("sh", "-c", script, check=True)
    before, after = (float(t) for t in done.stdout.split())
    return before, after


def event(probe: Probe, timeout: float = DEADLINE, **match: Any) -> dict[str, Any]:
    """The next event line whose fields equal MATCH, within timeout."""
    return probe.expect(
        lambda line: line.get("kind") == "event" and all(line[k] == v for k, v in match.items()),
        timeout,
    )


def assert_quiet(probe: Probe, seconds: float) -> None:
    """Nothing more arrives for SECONDS."""
    try:
        line = probe.lines.get(timeout=seconds)
    except queue.Empty:
        return
    raise AssertionError(f"unexpected line from the probe: {line}")


def choose(node: Node, *name: str) -> dict[str, Any]:
    done = node.run(
        PYTHON, "-m", "tests.integration.netlink_probe", "choose", *name, env=node_env()
    )
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    (line,) = (json.loads(raw) for raw in done.stdout.splitlines())
    return line


def test_the_first_event_is_the_current_state(node: Node, watcher: Probe) -> None:
    ready = watcher.seen[-1]
    index = int(node.run("cat", "/sys/class/net/eth0/ifindex", check=True).stdout)
    assert (ready["name"], ready["index"], ready["ip4"], ready["link_up"]) == (
        "eth0", index, node.addr, True,
    )  # fmt: skip


def test_an_address_flip_is_one_event_with_the_new_ip4(node: Node, watcher: Probe) -> None:
    new = node.addr.rsplit(".", 1)[0] + ".201"
    _, after = change(
        node, f"ip addr del {node.addr}/24 dev eth0", f"ip addr add {new}/24 dev eth0"
    )
    line = event(watcher, ip4=new)
    assert line["link_up"] and line["wall"] - after < DEADLINE
    assert_quiet(watcher, const.NETLINK_SETTLE + 0.4)  # no event for the moment without ip4
    # A second address beside the first is not what the advert carries: no event either.
    change(node, f"ip addr add {node.addr}/24 dev eth0")
    assert_quiet(watcher, const.NETLINK_SETTLE + 0.4)


def test_link_down_and_up_are_reported_and_ip6_returns(node: Node, watcher: Probe) -> None:
    _, after = change(node, "ip link set eth0 down")
    down = event(watcher, link_up=False)
    print(f"link down reported {(down['wall'] - after) * 1000:.0f} ms after `ip link set down`")
    assert down["ip4"] == node.addr  # IPv4 addresses stay on a downed link
    assert down["ip6"] == ""  # the kernel removes IPv6 ones
    _, after = change(node, "ip link set eth0 up")
    up = event(watcher, link_up=True)
    print(f"link up reported {(up['wall'] - after) * 1000:.0f} ms after `ip link set up`")
    assert up["ip4"] == node.addr
    back = event(watcher, DAD, link_up=True, ip4=node.addr)
    assert back["ip6"].startswith("fe80:"), back
    print(f"ip6 back {(back['wall'] - after) * 1000:.0f} ms after up (IPv6 DAD)")


def test_event_latency_over_address_flips(node: Node, watcher: Probe) -> None:
    prefix = node.addr.rsplit(".", 1)[0]
    current, from_last, from_first = node.addr, [], []
    for i in range(FLIPS):
        new = f"{prefix}.{201 + i % 2}"
        before, after = change(
            node, f"ip addr del {current}/24 dev eth0", f"ip addr add {new}/24 dev eth0"
        )
        line = event(watcher, ip4=new)
        from_last.append((line["wall"] - after) * 1000)
        from_first.append((line["wall"] - before) * 1000)
        current = new
    assert_quiet(watcher, const.NETLINK_SETTLE + 0.4)
    events = [line for line in watcher.seen if line["kind"] == "event"]
    assert len(events) == FLIPS and all(line["ip4"] for line in events)  # one per flip, no gap
    for what, values in (("after the last `ip`", from_last), ("after the first", from_first)):
        p95 = statistics.quantiles(values, n=20)[-1]
        print(
            f"event latency {what}, N={FLIPS}: median {statistics.median(values):.1f} ms, "
            f"p95 {p95:.1f} ms, max {max(values):.1f} ms (settle {const.NETLINK_SETTLE * 1000:g})"
        )
    assert max(from_first) < DEADLINE * 1000


def test_a_removed_interface_ends_the_watch_with_one_line(node: Node) -> None:
    node.run("ip", "link", "add", "t0", "type", "veth", "peer", "name", "t1", check=True)
    probe = Probe(node, "netlink_probe", "watch", "t0")
    try:
        assert probe.seen[-1]["link_up"] is False
        change(node, "ip link set t1 up", "ip link set t0 up")
        event(probe, link_up=True, name="t0")
        _, after = change(node, "ip link del t0")
        error = probe.expect(lambda line: line.get("kind") == "error", DEADLINE)
        assert "t0" in error["error"] and "disappeared" in error["error"]
        assert "\n" not in error["error"] and error["wall"] - after < DEADLINE
        assert probe.proc.wait(5) == 1
    finally:
        probe.close()


def test_cancelling_a_watch_closes_its_socket(node: Node) -> None:
    done = node.run(
        PYTHON, "-m", "tests.integration.netlink_probe", "cancel", "eth0", env=node_env()
    )
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    line = json.loads(done.stdout)
    assert line["propagated"] and line["tasks_left"] == 0
    assert line["netlink_during"] == line["netlink_before"] + 1
    assert line["netlink_after"] == line["netlink_before"]
    assert line["fds_after"] == line["fds_before"]


def test_the_choice_follows_the_default_route_and_skips_a_bridge(node: Node) -> None:
    assert choose(node) == {**choose(node, "eth0"), "kind": "chose"}
    assert (choose(node)["name"], choose(node)["ip4"]) == ("eth0", node.addr)
    # A bridge whose name no prefix catches, on the better default route, is still skipped.
    change(
        node, "ip link add lan0 type bridge", "ip link set lan0 up",
        "ip route del default dev eth0", "ip route add default dev lan0 metric 5",
        "ip route add default dev eth0 metric 50",
    )  # fmt: skip
    assert choose(node)["name"] == "eth0"
    change(node, "ip route del default dev eth0 metric 50")
    error = choose(node)
    assert error["kind"] == "error" and "SUGARKUBE_MDNS_INTERFACE" in error["error"]
    assert choose(node, "lan0")["name"] == "lan0"  # the operator's choice is not second-guessed
    missing = choose(node, "nope0")
    assert missing["kind"] == "error" and "'nope0' does not exist" in missing["error"]
