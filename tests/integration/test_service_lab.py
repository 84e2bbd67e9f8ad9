"""The agent as systemd runs it: notify messages in order, SIGTERM in each phase, the network
changing under it. Real avahi-daemon and dbus-daemon in lab nodes."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration.formation import TOKEN, PiNode, wait_formed
from tests.integration.helpers import PYTHON, Agent, Probe, node_env, wait_for
from tests.lab import Node

pytestmark = pytest.mark.lab

K3S = "_k3s-sugar-dev._tcp"
NODE1 = "k3s-sugar-dev@node1.local ("


class NotifySocket:
    """A datagram socket standing in for systemd's, reachable from inside the node.

    A thread reads it from the start, as systemd does: the kernel queues only
    net.unix.max_dgram_qlen (10) datagrams, and the agent drops a message it cannot send
    rather than block, so a reader that waits lets STATUS lines fall on the floor."""

    def __init__(self, host_path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(host_path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def drain(self) -> list[str]:
        time.sleep(0.3)  # whatever is in flight has been read
        return [m for _, m in list(self.messages)]

    def close(self) -> None:
        self._closed.set()
        self._reader.join(2)
        self.sock.close()


def test_notify_ready_status_watchdog_stopping(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(1)
    node = lab.node(1)
    notify = NotifySocket(node.path("/var/lib/sugarkube/notify.sock"))
    try:
        agent = Agent(node, tmp_path / "agent.log", env={
            "SUGARKUBE_TOKEN": TOKEN, "NOTIFY_SOCKET": "/var/lib/sugarkube/notify.sock",
            "WATCHDOG_USEC": "400000", "SUGARKUBE_SERVERS": "1",
        })
        agent.wait_event("election_won", 20)
        messages = notify.drain()
        assert messages[0] == "READY=1"
        statuses = [m for m in messages if m.startswith("STATUS=")]
        assert any("absence" in s for s in statuses), statuses
        pings = [t for t, m in notify.messages if m == "WATCHDOG=1"]
        assert len(pings) >= 5
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.4  # every half WATCHDOG_USEC (0.2 s), with slack
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(10) == 0
        assert "STOPPING=1" in notify.drain()
    finally:
        notify.close()


@pytest.mark.parametrize("phase", ["discover", "elect", "serving"])
def test_sigterm_in_each_phase_exits_0_with_adverts_withdrawn(
    lab_factory, tmp_path: Path, phase: str
) -> None:
    lab = lab_factory(2)
    probe = Probe(lab.node(2), "browse_probe", K3S, "60")
    pi = PiNode(lab.node(1), tmp_path, SUGARKUBE_SERVERS="1").start()
    assert pi.agent is not None
    if phase == "discover":
        pi.agent.wait_event("started", 10)
    elif phase == "elect":
        pi.agent.wait_event("phase", 15, phase="elect")
    else:
        wait_formed([pi], 30)
        pi.agent.wait_event("phase", 15, phase="serving")
    present: set[str] = set()
    time.sleep(1.5)  # whatever the node advertised by now has reached node2
    while not probe.lines.empty():
        line = probe.lines.get()
        if str(line.get("name", "")).startswith(NODE1):
            (present.add if line["kind"] != "removed" else present.discard)(line["name"])
    sent = time.monotonic()
    pi.agent.proc.send_signal(signal.SIGTERM)
    assert pi.agent.proc.wait(10) == 0
    assert time.monotonic() - sent < 6.0  # the grace period
    while present:
        line = probe.expect(lambda ln: ln.get("kind") == "removed"
                            and str(ln.get("name", "")).startswith(NODE1), 3)
        present.discard(line["name"])
    assert "Traceback" not in pi.agent.text()


def test_address_change_reaches_the_peer_and_link_flap_reannounces(
    lab_factory, tmp_path: Path
) -> None:
    lab = lab_factory(2)
    node1 = lab.node(1)
    probe = Probe(lab.node(2), "browse_probe", K3S, "60")
    pi = PiNode(node1, tmp_path, SUGARKUBE_SERVERS="1").start()  # settle: formed, serving
    wait_formed([pi], 30)
    agent = pi.agent
    assert agent is not None
    agent.wait_event("advert_published", 10, name="k3s-sugar-dev@node1.local (server)")
    probe.expect(lambda ln: ln.get("kind") == "added"
                 and str(ln.get("name", "")).startswith(f"{NODE1}server"), 15)
    # Let Avahi finish announcing the fresh "(server)" record (RFC 6762 §8.3, 1 s apart); an
    # update inside that schedule waits for it, as any record multicast within 1 s must (§6).
    time.sleep(3)
    # The new address first, then the old one goes (as a DHCP lease moving would do it). Had
    # the interface no IPv4 address at all for a moment, avahi-daemon would drop it and probe
    # every record again when one returns: 2-3 s measured here, Avahi's doing, not ours.
    prefix, last = node1.addr.rsplit(".", 1)
    new = f"{prefix.rsplit('.', 1)[0]}.{int(prefix.rsplit('.', 1)[1]) + 1}.{last}"
    node1.run("ip", "addr", "add", f"{new}/24", "dev", "eth0", check=True)
    node1.run("ip", "addr", "del", f"{node1.addr}/24", "dev", "eth0", check=True)
    changed = time.monotonic()
    want = f"ip4={new}".encode().hex()
    line = probe.expect(lambda ln: ln.get("kind") in ("added", "updated")
                        and want in ln.get("txt", []), 5)
    # Issue 5 asks for 2 s; measured here 0.12-0.28 s (N=8): netlink's 0.1 s debounce, the TXT
    # replaced in place, and the peer's record browser on that TXT (its resolver alone would
    # wait out the old record's cache-flush second, 1.1-2.5 s). The advert never left meanwhile:
    # Avahi re-registering host records for the new address no longer resets our groups.
    assert line["t"] - changed < 2.0
    assert not [ln for ln in probe.seen if ln.get("kind") == "removed" and ln["t"] > changed]
    assert new not in agent.text()  # addresses are pseudonyms in the log
    agent.wait_event("address_changed", 2)

    # Link down: no goodbye can leave, so the peer's Avahi cache keeps the advert; the wire
    # (a live round from the peer) no longer hears it, and the node says why it waits.
    node1.run("ip", "link", "set", "eth0", "down", check=True)
    agent.wait_event("link_down", 5)
    assert not _heard(lab.node(2), NODE1)
    status = node1.run(PYTHON, "-m", "agent", "status", env=node_env())
    assert "link down on eth0" in status.stdout
    node1.run("ip", "link", "set", "eth0", "up", check=True)
    agent.wait_event("link_up", 5)
    wait_for("the advert answered again on the wire", lambda: _heard(lab.node(2), NODE1), 10)
    assert agent.proc.poll() is None


def _heard(node: Node, prefix: str) -> bool:
    """Whether one live round from node hears an advert whose name starts with prefix."""
    done = node.run(PYTHON, "-m", "tests.integration.wire_probe", K3S, node.addr,
                    env=node_env(), timeout=20)
    line = json.loads(done.stdout.splitlines()[-1])
    return any(r["name"].startswith(prefix) for r in line["records"])


def test_debug_mdns_logs_avahi_signals_redacted_and_the_scrape_passes_promtool(
    lab_factory, tmp_path: Path
) -> None:
    lab = lab_factory(1)
    node = lab.node(1)
    pi = PiNode(node, tmp_path, SUGARKUBE_SERVERS="1", SUGARKUBE_DEBUG_MDNS="1").start()
    wait_formed([pi], 30)
    agent = pi.agent
    assert agent is not None
    found = agent.wait_event("avahi_signal", 5, member="Found")
    assert "k3s=1" in found["args"]
    assert node.addr not in agent.text()  # the resolved address is a pseudonym
    agent.wait_event("k3s_serving", 20)
    scrape = node.run(PYTHON, "-c", (
        "import urllib.request, sys; "
        "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9469/metrics', timeout=5)"
        ".read().decode())"
    ), env=node_env(), timeout=15)
    assert scrape.returncode == 0, scrape.stderr
    assert 'sugarkube_node_phase{phase="serving"} 1.0' in scrape.stdout
    assert "sugarkube_gate_released 1.0" in scrape.stdout
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    check = subprocess.run([promtool, "check", "metrics"], input=scrape.stdout,
                           capture_output=True, text=True, timeout=30, check=False)
    assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr
