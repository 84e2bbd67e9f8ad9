"""The no-D-Bus path against real avahi-daemons: a static service file published, seen, withdrawn.

node1 runs StaticPublisher in a script (its /etc/avahi/services is its own); node2 checks with
the stock `avahi-browse -rpt` and with LiveBrowser. avahi-daemon must pick the file's creation,
replacement and removal up by itself (inotify): nothing here signals it.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import PYTHON, node_env, unescape_browse, wait_for
from tests.lab import Node

pytestmark = pytest.mark.lab

K3S = "_k3s-sugar-dev._tcp"
NAME = "k3s-sugar-dev@node1.local (server)"
TXT = ["k3s=1", "cluster=sugar", "env=dev", "role=server", 'note=a&b <c> "d"', "host=node1.local"]

# Publishes NAME under K3S and _https._tcp; prints {"established": name}, then on a line on stdin
# sets TXT + "phase=2" ("update") or withdraws ("withdraw") and prints what it did.
PUBLISH = """
import asyncio, json, sys
from pathlib import Path
from agent.avahi.publisher import Advertisement
from agent.log import EventLog
from agent.mdns.fallback import StaticPublisher

async def main(addr, name, stype, *txt):
    pub = StaticPublisher(EventLog(stream=sys.stderr), interface_addr=addr)
    advert = Advertisement(name, (stype, "_https._tcp"), 6443, tuple(t.encode() for t in txt))
    task = asyncio.get_running_loop().create_task(pub.run())
    pub.set(advert)
    await asyncio.wait_for(pub.established.wait(), 20)
    print(json.dumps({"established": pub.name}), flush=True)
    loop = asyncio.get_running_loop()
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        if line == "update":
            advert = Advertisement(name, advert.stypes, 6443, advert.txt + (b"phase=2",))
            pub.set(advert)
            await asyncio.wait_for(pub.established.wait(), 20)
            print(json.dumps({"updated": pub.name}), flush=True)
        elif line == "withdraw":
            print(json.dumps({"withdrawn": await pub.withdraw(5)}), flush=True)
    task.cancel()

asyncio.run(main(*sys.argv[1:]))
"""

# Browses K3S with LiveBrowser for SECONDS; one JSON line per event.
BROWSE = """
import asyncio, json, sys
from agent.log import EventLog
from agent.mdns.fallback import LiveBrowser

async def main(addr, stype, seconds):
    async with LiveBrowser(stype, EventLog(stream=sys.stderr), interface_addr=addr) as browser:
        try:
            async with asyncio.timeout(float(seconds)):
                async for event in browser:
                    r = event.record
                    print(json.dumps({
                        "kind": event.kind, "ms": event.ms_elapsed,
                        "name": r and r.name, "txt": r and [t.decode() for t in r.txt],
                        "host": r and r.host, "port": r and r.port, "local": r and r.local,
                    }), flush=True)
        except TimeoutError:
            pass

asyncio.run(main(*sys.argv[1:]))
"""


def browse_now(node: Node) -> list[list[str]]:
    """Resolved `=` lines of a one-shot `avahi-browse -rpt` of K3S in NODE, fields unescaped."""
    done = node.run("avahi-browse", "-rpt", K3S, env=node_env(), timeout=30)
    return [
        [unescape_browse(f) for f in line.split(";")]
        for line in done.stdout.splitlines() if line.startswith("=")
    ]  # fmt: skip


def txt_of(line: list[str]) -> list[str]:
    """The TXT strings of an avahi-browse -p line (quoted, space separated), in its order."""
    field = line[9] if len(line) > 9 else ""
    return field[1:-1].split('" "') if len(field) >= 2 else []


class Publisher:
    """The PUBLISH script in a node, driven over its stdin."""

    def __init__(self, node: Node, log: Path) -> None:
        self.log = log
        self.proc = node.spawn(
            PYTHON, "-c", PUBLISH, node.addr, NAME, K3S, *TXT, log=log, env=node_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip

    def reply(self, timeout: float = 30) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = self.proc.stdout.readline()
        assert line, f"publisher ended: {self.log.read_text(errors='replace')[-3000:]}"
        assert time.monotonic() < deadline
        return dict(json.loads(line))

    def send(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self.reply()


def test_static_file_is_published_seen_updated_and_withdrawn(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(2)
    node1, node2 = lab.node(1), lab.node(2)
    service_file = node1.path("/etc/avahi/services/sugarkube.service")
    publisher = Publisher(node1, tmp_path / "publish.log")
    started = time.monotonic()
    assert publisher.reply() == {"established": NAME}
    print(f"established (heard on the wire by node1) after {time.monotonic() - started:.2f} s")
    assert service_file.stat().st_mode & 0o7777 == 0o644
    assert not [p for p in service_file.parent.iterdir() if p.name.endswith(".tmp")]

    lines = wait_for("node2's avahi-browse to resolve NAME", lambda: browse_now(node2), 15)
    (line,) = {tuple(entry) for entry in lines if entry[2] == "IPv4"}
    assert line[3] == NAME and line[8] == "6443"
    # avahi-browse -p prints the TXT strings in reverse wire order (its string list is prepended).
    assert list(reversed(txt_of(list(line)))) == TXT

    publisher.send("update")
    wait_for(
        "node2 to see phase=2",
        lambda: any(txt_of(e)[:1] == ["phase=2"] for e in browse_now(node2)),
        15,
    )
    assert publisher.send("withdraw") == {"withdrawn": True}
    assert not service_file.exists()
    gone_at = time.monotonic()
    wait_for("NAME gone from node2's avahi-browse", lambda: not browse_now(node2), 15)
    print(f"withdrawal seen by node2's avahi-browse after {time.monotonic() - gone_at:.2f} s")


def test_live_browser_sees_the_static_advert_come_and_go(lab_factory, tmp_path: Path) -> None:
    lab = lab_factory(2)
    node1, node2 = lab.node(1), lab.node(2)
    events_log = tmp_path / "browse.out"
    with events_log.open("wb") as out:
        browser = node2.spawn(
            PYTHON, "-c", BROWSE, node2.addr, K3S, "40", log=tmp_path / "browse.log",
            env=node_env(), stdout=subprocess.PIPE,
        )  # fmt: skip
        assert browser.stdout is not None
        events: list[dict[str, Any]] = []

        def next_event() -> dict[str, Any]:
            assert browser.stdout is not None
            line = browser.stdout.readline()
            assert line, (tmp_path / "browse.log").read_text(errors="replace")[-3000:]
            out.write(line)
            events.append(json.loads(line))
            return events[-1]

        assert next_event()["kind"] == "all_for_now"  # nothing published yet
        publisher = Publisher(node1, tmp_path / "publish.log")
        assert publisher.reply() == {"established": NAME}
        added = next_event()
        assert (added["kind"], added["name"], added["txt"]) == ("added", NAME, TXT)
        assert (added["host"], added["port"], added["local"]) == ("node1.local", 6443, False)
        publisher.send("update")
        updated = next_event()
        assert (updated["kind"], updated["txt"]) == ("updated", [*TXT, "phase=2"])
        withdrawn_at = time.monotonic()
        assert publisher.send("withdraw") == {"withdrawn": True}
        removed = next_event()
        assert (removed["kind"], removed["name"]) == ("removed", NAME)
        print(
            f"LiveBrowser removed the advert {time.monotonic() - withdrawn_at:.2f} s after it went"
        )
        assert [e["kind"] for e in events] == ["all_for_now", "added", "updated", "removed"]
