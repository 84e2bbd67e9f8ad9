"""WATCHDOG=1 proves the GLib thread alive: a real AvahiBus in a lab node, its thread blocked.

The process runs with writable-and-executable memory refused, as the unit's
MemoryDenyWriteExecute=yes has it, so this also shows GLib's callbacks need none.

The node's process sends to a NOTIFY_SOCKET the test owns: a datagram socket bound under the
node's private /var/lib/sugarkube, which is a host directory bind-mounted into the node (its /run
is a tmpfs of its own). A path socket reaches across mount and network namespaces.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import time
from pathlib import Path

import pytest

from tests.integration.helpers import PYTHON, node_env

pytestmark = pytest.mark.lab

WATCHDOG_USEC = 400_000  # pings every 0.2 s; a proof gets 0.1 s
INTERVAL = 0.2
BLOCK = 2.0  # s the GLib thread sleeps
RACE = 0.05  # s: a proof answered just before the block may still be pinged after it began
INNER_SOCKET = "/var/lib/sugarkube/notify-test.sock"

# Runs in the node: the watchdog over a real system-bus connection, and the block.
# A second Notifier sends the markers from the GLib thread itself, so they are ordered with
# the pings on the one socket; bus._on_glib is private, used here as the only way to run a
# callback on the bus's own thread.
SCRIPT = """
import asyncio, ctypes, sys, time

# As the unit's MemoryDenyWriteExecute=yes, before GLib and libffi load: PR_SET_MDWE (Linux 6.3).
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
mdwe = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0)

from agent.avahi.bus import AvahiBus
from agent.daemon.notify import Notifier

BLOCK = float(sys.argv[1])

async def main():
    bus = AvahiBus(asyncio.get_running_loop())
    await bus.open()
    notifier, marker = Notifier(), Notifier()
    assert notifier.watchdog_interval() is not None, "no watchdog configured"

    def health(reason):
        notifier.status(f"watchdog: {reason or 'ok'}")

    dog = asyncio.create_task(notifier.watchdog(bus.ping_glib, health))
    notifier.ready()
    notifier.status("mdwe: " + ("on" if mdwe == 0 else "unsupported by this kernel"))
    await asyncio.sleep(1.5)

    def block():
        marker.status("glib blocked")
        time.sleep(BLOCK)
        marker.status("glib free")

    await asyncio.wait_for(bus._on_glib(block), BLOCK + 5)
    await asyncio.sleep(1.5)
    dog.cancel()
    await asyncio.wait([dog], timeout=2)
    notifier.stopping()
    await bus.close()
    return 0 if dog.cancelled() else 3

sys.exit(asyncio.run(main()))
"""


def _kernel_has_mdwe() -> bool:
    """Linux >= 6.3 has PR_SET_MDWE, the kernel's own form of MemoryDenyWriteExecute=."""
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return match is not None and (int(match[1]), int(match[2])) >= (6, 3)


def _collect(sock: socket.socket, proc_done: object, timeout: float) -> list[tuple[float, str]]:
    """(host monotonic time, message) of every datagram until the process exits or TIMEOUT."""
    got: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    sock.settimeout(0.1)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(8192)
        except TimeoutError:
            if proc_done():  # type: ignore[operator]
                break
            continue
        got.append((time.monotonic(), data.decode()))
    return got


def test_blocking_the_glib_thread_stops_the_watchdog_pings(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(1)
    node = lab.node(1)
    host_path = node.path(INNER_SOCKET)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(host_path))
        proc = node.spawn(
            PYTHON, "-c", SCRIPT, str(BLOCK), log=tmp_path / "watchdog.log",
            env=node_env(NOTIFY_SOCKET=INNER_SOCKET, WATCHDOG_USEC=str(WATCHDOG_USEC)),
        )
        got = _collect(sock, lambda: proc.poll() is not None, 30.0)
        code = proc.wait(10)
    finally:
        sock.close()
        host_path.unlink(missing_ok=True)
    log = (tmp_path / "watchdog.log").read_text(errors="replace")
    assert code == 0, log
    messages = [m for _, m in got]
    assert messages[0] == "READY=1", messages[:4]
    if _kernel_has_mdwe():
        assert messages[1] == "STATUS=mdwe: on"
    assert messages[-1] == "STOPPING=1"
    blocked = next(t for t, m in got if m == "STATUS=glib blocked")
    freed = next(t for t, m in got if m == "STATUS=glib free")
    assert freed - blocked >= BLOCK - 0.05
    pings = [t for t, m in got if m == "WATCHDOG=1"]
    before = [t for t in pings if t < blocked]
    during = [t for t in pings if blocked <= t < freed]
    after = [t for t in pings if t >= freed]

    # Before the block: the rate systemd asked for, through the real GLib thread.
    assert len(before) >= 5
    gaps = [b - a for a, b in itertools.pairwise(before)]
    assert max(gaps) < 0.75 * WATCHDOG_USEC / 1e6
    # During it: silence, so that systemd would restart the daemon.
    assert all(t - blocked < RACE for t in during), [round(t - blocked, 3) for t in during]
    assert len(during) <= 1
    # The watchdog said why once, and that it recovered once the thread answered again.
    health = [(t, m) for t, m in got if m.startswith("STATUS=watchdog:")]
    assert [m for _, m in health] == [
        "STATUS=watchdog: no proof of life within 0.1 s (asyncio loop or GLib thread stuck)",
        "STATUS=watchdog: ok",
    ]
    assert blocked < health[0][0] < freed <= health[1][0]
    # After it: pings resume within one interval and keep the rate.
    assert after
    assert after[0] - freed < INTERVAL + 0.1
    assert len(after) >= 5
