"""`verify` on this very machine: no fakes, the real /proc, /sys and tools; report in a tmp dir."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.verify import checks, command
from tests.lab import Lab, Node

REPO = Path(__file__).resolve().parents[2]

NAMES = [name for name, _ in checks.BUILTIN_CHECKS]


def run_verify(argv: list[str], report: Path) -> int:
    parser = argparse.ArgumentParser()
    command.configure_parser(parser)
    return command.run(parser.parse_args(argv), report)


def test_verify_for_real_prints_a_sensible_table_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "first-boot-report.txt"
    started = time.monotonic()
    assert run_verify(["--full", "--log", str(report)], tmp_path / "unused.txt") == 0
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert err == ""
    assert elapsed < 120  # every tool is bounded; nothing here waits for the worst case
    table, _, document = out.rpartition("\n{")
    rows = [line.split(None, 2) for line in table.splitlines()[1:] if line.strip()]
    by_name = {row[0]: row for row in rows if len(row) >= 2 and row[0] != "overall:"}
    for name in NAMES:
        assert by_name[name][1] in ("pass", "fail", "skip"), by_name[name]
        assert len(by_name[name]) == 3 and by_name[name][2].strip(), f"{name} has no detail"
        assert "crashed" not in by_name[name][2], by_name[name]
    parsed = json.loads("{" + document)
    assert [c["name"] for c in parsed["checks"]][: len(NAMES)] == NAMES
    text = report.read_text()
    assert text.startswith("## ")
    for name in NAMES:
        assert f"\n| {name} | " in text
    assert "### Migration Steps" in text


# Against real avahi-daemons: the lab's nodes (tests/lab/), each with its own bus and daemon.

LAB_CHECKS = """
import json
from agent.verify import mdns
from agent.verify.probe import Probe
from agent.verify.result import contain
probe = Probe.system()
checks = (mdns.avahi_dbus, mdns.mdns_advertised, mdns.hostname_unique)
results = [contain(check.__name__, lambda check=check: check(probe)) for check in checks]
print(json.dumps({r.name: [r.status.value, r.detail] for r in results}))
"""


def lab_verify(node: Node) -> dict[str, list[str]]:
    """The three Avahi checks run inside NODE by /usr/bin/python3: name -> [status, detail]."""
    done = node.run(
        "/usr/bin/python3", "-c", LAB_CHECKS, env={"PYTHONPATH": str(REPO)}, timeout=60, check=True
    )
    result: dict[str, list[str]] = json.loads(done.stdout)
    return result


def advertise(node: Node) -> None:
    """Publish this node's `_https._tcp` advert on 6443 as the agent does, via avahi-publish."""
    log = node.root / "verify-publish.log"
    instance = f"k3s-sugar-dev@{node.name}.local (server)"
    proc = node.spawn("avahi-publish", "-s", instance, "_https._tcp", "6443", "k3s=1", log=log)
    deadline = time.monotonic() + 10
    while "Established under name" not in log.read_text(errors="replace"):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@pytest.mark.lab
def test_avahi_checks_against_real_daemons(lab_factory: Callable[..., Lab]) -> None:
    one, two = lab_factory(2).nodes
    advertise(one)
    first = lab_verify(one)
    assert first["avahi_dbus"] == ["pass", "avahi-daemon owns org.freedesktop.Avahi and is RUNNING"]
    assert first["mdns_advertised"][0] == "pass", first
    assert "'k3s-sugar-dev@node1.local (server)'" in first["mdns_advertised"][1]
    assert first["hostname_unique"] == ["pass", f"node1.local resolves to {one.addr}, this host's"]
    second = lab_verify(two)
    assert second["mdns_advertised"][0] == "fail", second
    assert "no _https._tcp advert for node2.local" in second["mdns_advertised"][1]

    two.run("hostname", "node1", check=True)  # a second node1 on the LAN
    two.restart_avahi()  # avahi loses the name to the first node1 and picks node1-2
    clash = lab_verify(two)
    assert clash["hostname_unique"][0] == "fail", clash
    assert f"answers with {one.addr}, not an address of this host" in clash["hostname_unique"][1]
    assert clash["mdns_advertised"][0] == "fail", clash  # node1's advert is not ours
    assert lab_verify(one)["hostname_unique"][0] == "pass"  # the first node1 keeps its name
    two.stop_avahi()
    stopped = lab_verify(two)
    assert stopped["avahi_dbus"][0] == "fail"
    assert "nothing owns org.freedesktop.Avahi" in stopped["avahi_dbus"][1]
    assert stopped["hostname_unique"][0] == "skip"
