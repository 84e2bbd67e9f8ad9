"""Real systemd boots the package: one node alone, then three on one bridge (issue 6, items 3-4).

Each node is a Debian bookworm root (tests/image/rootfs.py) into which the pi-gen stage's own
00-run.sh installs the very .deb the stage ships, booted with `systemd-nspawn -b` in a network
namespace of its own on one bridge (tests/image/nspawn.py). k3s is the lab's stand-in as
`k3s.service`, gated by the package's drop-in exactly as the real k3s unit would be; its servers
run Debian's etcd (in the root, its own etcd.service masked: the stand-in starts etcd itself, as
k3s embeds it). Every assertion is made from inside the booted system, through systemctl,
journalctl and the network.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.image import nspawn, rootfs
from tests.image.conftest import REPO, stage_install
from tests.integration.formation import TOKEN

pytestmark = pytest.mark.image

BRIDGE = "br-skimg"
SUBNET = "10.249.0"
K3S_STANDIN = REPO / "tests" / "lab" / "k3s"  # the package, copied as `k3s_standin`
STANDIN_DIR = "/usr/local/lib/k3s-standin/k3s_standin"  # on the unit's PYTHONPATH
GUEST = Path(__file__).with_name("guest")
K3S_UNITS = ("k3s.service", "k3s-agent.service")  # both installed and enabled, as on the image
PACKAGES = (*rootfs.PACKAGES, "etcd-server")
METRICS = ("import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
           "'http://127.0.0.1:9469/metrics', timeout=5).read().decode())")


def node_root(base: Path, tarball: Path, index: int, **env: str) -> Path:
    """A node's root: the base system, the package through the stage, k3s, its settings."""
    name = f"node{index}"
    root = rootfs.make_root(
        # A default route, as a Pi's DHCP lease gives one: the agent's interface is the default
        # route's (without one it exits 69, naming SUGARKUBE_MDNS_INTERFACE, and systemd retries).
        tarball, base / name, [], name, address=f"{SUBNET}.{10 + index}/24",
        gateway=f"{SUBNET}.1",
        units={unit: (GUEST / unit).read_text() for unit in K3S_UNITS},
        files={f"{STANDIN_DIR}/{path.name}": path.read_text()
               for path in sorted(K3S_STANDIN.glob("*.py"))},
        masked=("etcd.service",),
    )
    stage_install(root)
    # The operator's settings, written after the package as an operator edits its conffile.
    settings = {"SUGARKUBE_TOKEN": TOKEN, **env}
    default = root / "etc" / "default" / "sugarkube-agent"
    default.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    (root / "boot" / "firmware").mkdir(parents=True, exist_ok=True)  # the Pi's boot partition
    return root


def _show(node: nspawn.Container, unit: str, prop: str) -> str:
    return node.run("systemctl", "show", unit, "-p", prop, "--value", check=True).stdout.strip()


def _journal(node: nspawn.Container, unit: str) -> list[dict[str, str]]:
    out = node.run("journalctl", "-u", unit, "-o", "json", "--no-pager", check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _event_usec(entries: list[dict[str, str]], event: str) -> int:
    """CLOCK_MONOTONIC of the first journal line of event=<event>, in µs."""
    for entry in entries:
        if f"event={event} " in f"{entry.get('MESSAGE', '')} ":
            return int(entry["__MONOTONIC_TIMESTAMP"])
    raise AssertionError(f"no event={event} in {[e.get('MESSAGE') for e in entries][-10:]}")


def _wait(what: str, check, timeout: float):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (result := check()):
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def _assert_gated_and_serving(node: nspawn.Container, role: str = "server") -> None:
    """The k3s unit of ROLE started only after the agent released the gate, and the unit of the
    other role was skipped cleanly by its gate (no failure, no restart)."""
    unit, other = ("k3s", "k3s-agent") if role == "server" else ("k3s-agent", "k3s")
    assert node.run("systemctl", "is-active", "sugarkube-agent").stdout.strip() == "active"
    _wait(f"{unit} active", lambda: node.run("systemctl", "is-active", unit).stdout.strip()
          == "active", 30)
    released = _event_usec(_journal(node, "sugarkube-agent"), "gate_released")
    k3s_main = int(_show(node, unit, "ExecMainStartTimestampMonotonic"))
    assert k3s_main > released, (k3s_main, released)
    condition = _show(node, unit, "ExecCondition")
    assert f"gate --role {role}" in condition and "status=0 }" in condition, condition
    # `gate --role` said "the other role": ExecCondition= skipped the other unit for this boot.
    _wait(f"{other} skipped", lambda: _show(node, other, "Result") == "exec-condition", 30)
    assert _show(node, other, "ActiveState") == "inactive"
    assert _show(node, other, "NRestarts") == "0"


def _one_etcd_cluster(nodes: list[nspawn.Container], voters: int) -> set[tuple[str, ...]] | None:
    """{(cluster ID, *voter names)} once every node's etcd shows the same VOTERS voters only."""
    views = set()
    for node in nodes:
        out = node.run("env", "PYTHONPATH=/usr/local/lib/k3s-standin", "python3", "-m",
                       "k3s_standin", "query", "members", "https://127.0.0.1:6443").stdout
        try:
            members = json.loads(out)["members"]
        except (ValueError, KeyError):
            return None
        if len(members) != voters or any(m["learner"] for m in members.values()):
            return None
        views.add((json.loads(out)["cluster_id"], *sorted(members)))
    return views if len(views) == 1 else None


def test_one_node_boots_gates_k3s_and_reports(image_tmp: Path, deb: Path) -> None:
    tarball = rootfs.base_tarball(packages=PACKAGES)
    root = node_root(image_tmp, tarball, 1, SUGARKUBE_SERVERS="1")
    with ExitStack() as stack:
        (ns,) = stack.enter_context(nspawn.network(BRIDGE, ["skimg1"]))
        started = time.monotonic()
        node = stack.enter_context(nspawn.boot(root, network_namespace=ns,
                                               log_path=image_tmp / "node1.console"))
        state = node.wait_system_running(90)
        booted = time.monotonic() - started
        assert "sugarkube-agent.service" not in state.failed_units, node.console_tail()
        assert "k3s.service" not in state.failed_units, node.console_tail()
        _assert_gated_and_serving(node)
        # Our STATUS= line: released, then serving once the local k3s answers on 6443.
        _wait("systemctl status to say serving", lambda: 'Status: "serving' in node.run(
            "systemctl", "status", "sugarkube-agent", "--no-pager").stdout, 30)
        report = _wait("the verifier's report", lambda: node.run(
            "cat", "/boot/firmware/first-boot-report.txt").stdout, 30)
        assert "### Verifier Checks" in report and "| avahi_dbus | pass |" in report, report
        metrics = node.run("python3", "-c", METRICS, check=True).stdout
        assert "sugarkube_gate_released 1.0" in metrics
        journal = node.run("journalctl", "-u", "sugarkube-agent", "--no-pager", "-o", "cat").stdout
        assert f"{SUBNET}.11" not in journal and TOKEN not in journal  # sanitized
        print(f"boot to running with k3s released: {booted:.1f} s")
        assert node.poweroff(30)


def _role(node: nspawn.Container) -> str:
    """The role the agent released this node in (`status --json`: release_role)."""
    def released() -> str:
        done = node.run("sugarkube-agent", "status", "--json")
        return json.loads(done.stdout).get("release_role", "") if done.returncode == 0 else ""
    role: str = _wait("the gate released", released, 60)
    return role


def test_three_nodes_boot_together_and_form_one_cluster(image_tmp: Path, deb: Path) -> None:
    """Two servers and an agent (SUGARKUBE_SERVERS=2): k3s.service and k3s-agent.service are
    installed and enabled on every node, and each node runs exactly the unit of its role."""
    tarball = rootfs.base_tarball(packages=PACKAGES)
    roots = [node_root(image_tmp, tarball, i, SUGARKUBE_SERVERS="2") for i in (1, 2, 3)]
    with ExitStack() as stack:
        names = stack.enter_context(nspawn.network(BRIDGE, ["skimg1", "skimg2", "skimg3"]))
        started = time.monotonic()
        nodes = [stack.enter_context(nspawn.boot(root, network_namespace=ns,
                                                 log_path=image_tmp / f"{ns}.console"))
                 for root, ns in zip(roots, names, strict=True)]
        for node in nodes:
            node.wait_system_running(120)
        formed = time.monotonic() - started
        roles = [_role(node) for node in nodes]
        assert sorted(roles) == ["agent", "server", "server"], roles
        for node, role in zip(nodes, roles, strict=True):
            _assert_gated_and_serving(node, role)
        dropins = [node.run("cat", "/etc/rancher/k3s/config.yaml.d/50-sugarkube.yaml",
                            check=True).stdout for node in nodes]
        assert sum("cluster-init: true" in text for text in dropins) == 1, dropins  # one bootstrap
        assert sum("server: https://" in text for text in dropins) == 2, dropins
        print(f"3 nodes: boot to every gate released and k3s active: {formed:.1f} s")
        # One cluster is what etcd says: each server's stand-in reports its etcd's view.
        servers = [node for node, role in zip(nodes, roles, strict=True) if role == "server"]
        views = _wait("one etcd cluster of two voters on every server",
                      lambda: _one_etcd_cluster(servers, 2), 120)
        print(f"3 nodes: one etcd cluster {views} after {time.monotonic() - started:.1f} s")

        # An operator stops the agent on node3: its advert leaves the wire, seen from node1.
        def browse() -> list[str]:
            """Instance names node1's stock avahi-browse resolves (fields: =;if;proto;name;...)."""
            out = nodes[0].run("avahi-browse", "-rpt", "_k3s-sugar-dev._tcp", timeout=20).stdout
            return [line.split(";")[3] for line in out.splitlines() if line.startswith("=;")]

        assert any("node3" in name for name in browse())
        nodes[2].run("systemctl", "stop", "sugarkube-agent", check=True, timeout=30)
        _wait("node3's advert gone from node1's browse",
              lambda: not any("node3" in name for name in browse()), 15)
        for node in nodes:
            node.poweroff(30)
