"""The lab itself: separate nodes, real mDNS between them, loss and partitions, clean-up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import LAB_PREFIX, LAB_SUBNET
from tests.lab import Lab, LabError, Node, find_leftovers, netns, sweep_leftovers
from tests.lab.procs import read_first_lines, start_time

REPO = Path(__file__).resolve().parents[2]
HTTP = "_http._tcp"
SEEN_TIMEOUT = 10.0  # s for a publish to show up on another node
UNSEEN_WINDOW = 3.0  # s a blocked publish must stay invisible

MakeLab = Callable[..., Lab]


def browse(node: Node, stype: str = HTTP) -> dict[str, list[str]]:
    """One `avahi-browse -rpt` on NODE: resolved IPv4 services by instance name, as fields."""
    out = node.run("avahi-browse", "-rpt", stype, timeout=15, check=True).stdout
    rows = [line.split(";") for line in out.splitlines()]
    return {row[3]: row for row in rows if row[0] == "=" and row[2] == "IPv4"}


def seen(node: Node, name: str, timeout: float, stype: str = HTTP) -> list[str] | None:
    """The resolved fields of service NAME once NODE sees it, browsing up to TIMEOUT s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = browse(node, stype).get(name)
        if found:
            return found
        time.sleep(0.1)
    return None


def publish(node: Node, name: str, *txt: str, port: int = 8080) -> subprocess.Popen[bytes]:
    """Publish _http._tcp instance NAME with TXT from NODE; return once avahi established it."""
    log = node.root / f"publish-{name}.log"
    proc = node.spawn("avahi-publish", "-s", name, HTTP, str(port), *txt, log=log)
    deadline = time.monotonic() + 10
    while "Established under name" not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"avahi-publish exited: {log.read_text()}"
        assert time.monotonic() < deadline, f"avahi-publish not established: {log.read_text()}"
        time.sleep(0.05)
    return proc


def host_name(node: Node) -> str:
    """The host name NODE's avahi-daemon holds now (it differs from the hostname on conflict)."""
    out = node.run(
        "dbus-send", "--system", "--print-reply", "--dest=org.freedesktop.Avahi", "/",
        "org.freedesktop.Avahi.Server.GetHostName", check=True,
    ).stdout  # fmt: skip
    return out.split()[-1].strip('"')


@pytest.mark.lab
def test_nodes_have_their_own_hostname_run_dirs_and_daemons(lab_factory: MakeLab) -> None:
    lab = lab_factory(2)
    one, two = lab.nodes
    marker = f"lab-{uuid.uuid4().hex}"
    one.run(
        "sh",
        "-c",
        f"echo node1 > /run/{marker} && echo node1 > /etc/sugarkube/{marker}",
        check=True,
    )

    assert [n.run("hostname").stdout.strip() for n in lab.nodes] == ["node1", "node2"]
    assert one.path(f"/etc/sugarkube/{marker}").read_text() == "node1\n"
    assert one.path(f"/run/{marker}").read_text() == "node1\n"
    assert two.run("test", "-e", f"/run/{marker}").returncode == 1
    assert two.run("test", "-e", f"/etc/sugarkube/{marker}").returncode == 1
    assert not Path(f"/run/{marker}").exists()
    assert not Path(f"/etc/sugarkube/{marker}").exists()
    for node in lab.nodes:
        assert f"inet {node.addr}/24" in node.run("ip", "-4", "addr", "show", "eth0").stdout
        assert "dev eth0" in node.run("ip", "route", "show", "default").stdout
        assert node.avahi_state() == 2
        assert host_name(node) == node.name
    assert one.avahi_pid() != two.avahi_pid()
    assert Path(f"/proc/{one.avahi_pid()}/comm").read_text().strip() == "avahi-daemon"


@pytest.mark.lab
def test_browse_on_one_node_sees_publish_on_another_with_txt(lab_factory: MakeLab) -> None:
    lab = lab_factory(2)
    publish(lab.node(1), "web1", "path=/x", "role=server", port=6443)

    found = seen(lab.node(2), "web1", SEEN_TIMEOUT)

    assert found is not None
    assert found[6:9] == ["node1.local", lab.node(1).addr, "6443"]
    assert '"path=/x"' in found[9] and '"role=server"' in found[9]


@pytest.mark.lab
@pytest.mark.parametrize(
    "block", [lambda n: n.mdns_loss(100), Node.partition], ids=["loss100", "partition"]
)
def test_blocked_mdns_hides_a_publish_until_healed(
    lab_factory: MakeLab, block: Callable[[Node], None]
) -> None:
    lab = lab_factory(2)
    block(lab.node(2))
    publish(lab.node(1), "hidden")

    assert seen(lab.node(2), "hidden", UNSEEN_WINDOW) is None
    lab.node(2).heal()
    assert seen(lab.node(2), "hidden", SEEN_TIMEOUT) is not None


@pytest.mark.lab
def test_partial_loss_installs_one_draw_per_packet_and_heal_is_idempotent(
    lab_factory: MakeLab,
) -> None:
    node = lab_factory(1).node(1)
    node.mdns_loss(30)
    rules = node.run("nft", "list", "table", "inet", netns.NFT_TABLE, check=True).stdout
    assert rules.count("numgen random mod 100 < 30 drop") == 4
    node.heal()
    node.heal()
    assert node.run("nft", "list", "table", "inet", netns.NFT_TABLE).returncode != 0
    with pytest.raises(ValueError, match="0-100"):
        node.mdns_loss(101)


@pytest.mark.lab
def test_avahi_restart_and_hard_kill(lab_factory: MakeLab) -> None:
    lab = lab_factory(2)
    one = lab.node(1)
    before = one.avahi_pid()

    one.restart_avahi()
    assert one.avahi_pid() not in (None, before)
    assert one.avahi_running()

    one.kill_avahi_hard()
    assert one.avahi_pid() is None
    assert not one.avahi_running(timeout=0.3)
    one.start_avahi()  # the SIGKILLed daemon's stale pid file must not stop it
    assert one.avahi_running()
    publish(one, "after-restart")
    assert seen(lab.node(2), "after-restart", SEEN_TIMEOUT) is not None


@pytest.mark.lab
def test_two_nodes_may_share_a_hostname(lab_factory: MakeLab) -> None:
    lab = lab_factory(3, hostnames=["twin", "solo", "twin"])
    assert [n.run("hostname").stdout.strip() for n in lab.nodes] == ["twin", "solo", "twin"]
    assert [host_name(n) for n in lab.nodes] == ["twin", "solo", "twin-2"]


@pytest.mark.lab
def test_run_is_bounded_and_reports_failures(lab_factory: MakeLab) -> None:
    node = lab_factory(1).node(1)
    started = time.monotonic()
    with pytest.raises(LabError, match=r"did not finish within 0\.5 s"):
        node.run("sleep", "30", timeout=0.5)
    assert time.monotonic() - started < 5
    with pytest.raises(LabError, match="exited 3"):
        node.run("sh", "-c", "exit 3", check=True)
    assert node.run("cat", input="in\n").stdout == "in\n"
    assert node.run("sh", "-c", "echo $LABVAR", env={"LABVAR": "v"}).stdout == "v\n"


@pytest.mark.lab
def test_down_kills_spawned_processes_and_leaves_nothing(lab_factory: MakeLab) -> None:
    lab = lab_factory(1)
    node = lab.node(1)
    sleeper = node.spawn("sleep", "600")
    log = node.root / "escapee.log"
    node.spawn("sh", "-c", "setsid sleep 600 & echo $!; wait", log=log)
    deadline = time.monotonic() + 5
    while not log.read_text().splitlines()[1:]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    escapee = int(log.read_text().splitlines()[1])  # a new session: only the netns sweep finds it
    escapee_start = start_time(escapee)
    assert Path(f"/proc/{sleeper.pid}/comm").read_text().strip() == "sleep"

    lab.down()

    assert sleeper.returncode == -signal.SIGTERM
    assert start_time(escapee) != escapee_start
    assert find_leftovers(LAB_PREFIX) == []
    assert not lab.workdir.exists()
    assert lab.archive is not None and (lab.archive / "node1" / "avahi.log").is_file()
    with pytest.raises(LabError, match="is down"):
        node.run("true")


CRASHING_LAB = """
import sys, time
from tests.lab import Lab
Lab(2, prefix=sys.argv[1], subnet=sys.argv[2]).up()
print("up", flush=True)
time.sleep(300)
"""


@pytest.mark.lab
def test_a_killed_lab_is_found_and_swept() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    crashing = subprocess.Popen(
        [sys.executable, "-c", CRASHING_LAB, LAB_PREFIX, LAB_SUBNET],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        read_first_lines({"crashing lab": crashing}, 60, {})
        crashing.kill()
        crashing.wait(10)

        left = find_leftovers(LAB_PREFIX)
        assert f"netns {LAB_PREFIX}2" in left
        assert f"link br-{LAB_PREFIX}" in left
        assert sum(item.startswith("pid ") for item in left) == 6  # holder, bus, avahi per node
        assert sweep_leftovers(LAB_PREFIX) == left
        assert find_leftovers(LAB_PREFIX) == []
    finally:
        if crashing.poll() is None:
            crashing.kill()
        crashing.wait(10)
        sweep_leftovers(LAB_PREFIX)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = [
        sys.executable,
        "-m",
        "tests.lab",
        "--prefix",
        LAB_PREFIX,
        "--subnet",
        LAB_SUBNET,
        *args,
    ]
    return subprocess.run(
        argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=90, check=False
    )


@pytest.mark.lab
def test_cli_up_exec_status_down() -> None:
    try:
        assert _cli("up", "2").returncode == 0
        status = _cli("status")
        assert status.stdout.count("RUNNING") == 2
        assert _cli("exec", "2", "hostname").stdout == "node2\n"
        bad = _cli("exec", "5", "true")
        assert bad.returncode == 1
        assert "no node 5" in bad.stderr and "Traceback" not in bad.stderr
        assert _cli("down").returncode == 0
        assert find_leftovers(LAB_PREFIX) == []
    finally:
        sweep_leftovers(LAB_PREFIX)


def test_cli_rejects_a_bad_prefix_in_one_line() -> None:
    done = _cli("--prefix", "x-1", "status")
    assert done.returncode == 2
    assert done.stderr.strip() == "lab: lab prefix 'x-1' must be 1-8 lowercase letters"


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("skt1", True),
        ("skt12", True),
        ("skt", False),
        ("sktx1", False),
        ("sks1", False),
        ("xskt1", False),
    ],
)
def test_namespace_names_are_matched_exactly(name: str, ours: bool) -> None:
    assert netns.is_lab_namespace("skt", name) is ours


@pytest.mark.parametrize(
    ("name", "ours"),
    [
        ("br-skt", True),
        ("vskt3", True),
        ("br-sktx", False),
        ("vsks3", False),
        ("vskt", False),
        ("eth0", False),
    ],
)
def test_link_names_are_matched_exactly(name: str, ours: bool) -> None:
    assert netns.is_lab_link("skt", name) is ours


@pytest.mark.parametrize("prefix", ["", "skt1", "SKT", "toolongprefix", "s-k"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="1-8 lowercase letters"):
        Lab(1, prefix=prefix)


def test_total_loss_is_a_partition_and_no_loss_is_healed() -> None:
    assert netns.loss_ruleset(100) == netns.partition_ruleset()
    assert netns.loss_ruleset(0) == netns.heal_ruleset()
    with pytest.raises(ValueError, match="0-100"):
        netns.loss_ruleset(-1)


def test_bad_lab_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="nodes"):
        Lab(0)
    with pytest.raises(ValueError, match="hostnames given"):
        Lab(2, hostnames=["a"])
    with pytest.raises(ValueError, match="DNS label"):
        Lab(1, hostnames=["bad_name"])
    with pytest.raises(ValueError, match="three octets"):
        Lab(1, subnet="10.300.0")
