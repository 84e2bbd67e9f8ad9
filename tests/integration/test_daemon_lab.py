"""The daemon's own duties on a lab node: the verifier once per boot, SIGHUP reload."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.integration.formation import PiNode, wait_formed
from tests.integration.helpers import wait_for

pytestmark = pytest.mark.lab

REPORT = "/boot/firmware/first-boot-report.txt"


def test_verifier_runs_once_after_release_and_again_on_sighup(
    lab_factory, tmp_path: Path
) -> None:
    lab = lab_factory(1)
    node = lab.node(1)
    pi = PiNode(node, tmp_path, SUGARKUBE_SERVERS="1").start()
    wait_formed([pi], 30)
    assert pi.agent is not None
    done = pi.agent.wait_event("verifier_done", 60)
    assert int(done["passed"]) + int(done["failed"]) + int(done["skipped"]) >= 12
    report = node.path(REPORT)
    text = report.read_text()
    assert text.count("### Verifier Checks") == 1
    assert "| avahi_dbus | pass |" in text
    assert "| k3s_check_config | skip |" in text  # no k3s binary in the lab

    # A broken config on reload: logged once, the old one kept, the daemon keeps running.
    node.path("/etc/sugarkube/agent.yaml").write_text("servers: [unclosed\n")
    pi.agent.proc.send_signal(signal.SIGHUP)
    failed = pi.agent.wait_event("config_reload_failed", 10)
    assert "agent.yaml" in failed["error"] and "line" in failed["error"]
    assert pi.agent.proc.poll() is None
    blocks = lambda: report.read_text().count("### Verifier Checks")  # noqa: E731
    wait_for("the rerun's report block", lambda: blocks() == 2, 60)

    node.path("/etc/sugarkube/agent.yaml").write_text("mdns:\n  debug: true\n")
    pi.agent.proc.send_signal(signal.SIGHUP)
    reloaded = pi.agent.wait_event("config_reloaded", 10)
    assert reloaded["changed"] == "mdns"
    assert len(pi.agent.events("config_reload_failed")) == 1
    assert pi.agent.stop() == 0
