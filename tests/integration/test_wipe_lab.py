"""`wipe --yes` on a joined server of three, against real avahi, dbus and the etcd stand-in.

The node leaves etcd first (another server removes its member, as k3s does for a deleted node),
and its gate stays closed afterwards: the k3s unit, restarted as systemd restarts k3s.service,
waits in `sugarkube-agent gate` instead of starting a standalone server from an empty config,
until the agent is restarted and the node joins again as a new member.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.integration.formation import (
    RESTART_SEC,
    PiNode,
    assert_one_cluster,
    etcd_status,
    form,
    wait_formed,
)
from tests.integration.helpers import PYTHON, node_env, wait_for

pytestmark = pytest.mark.lab


def _released_at(pi: PiNode) -> float:
    """When PI's gate released, on the monotonic clock."""
    released = pi.released()
    assert pi.agent is not None and released is not None
    return pi.agent.started_at + int(released["ms_elapsed"]) / 1000


def test_wipe_of_a_joined_server_removes_its_etcd_member_and_keeps_its_gate_closed(
    lab_factory, tmp_path: Path
) -> None:
    lab = lab_factory(3)
    pis = form(lab, tmp_path, jitter=1.0, seed=7)
    releases = wait_formed(pis, 60)
    assert_one_cluster(pis, 3)
    modes = {r["mode"] for r in releases}
    assert modes == {"cluster-init", "join-server"}, releases
    # The last server joiner: the admitting server's grant to it was its last, and a grant
    # left over from before the wipe once held the node's rejoin for ~95 s (the first joiner's
    # was replaced by the next grant).
    joined = max(
        (pi for pi in pis if pi.released() and pi.released()["mode"] == "join-server"),
        key=_released_at,
    )
    survivors = [pi for pi in pis if pi is not joined]
    name = joined.node.name
    starts, restarts = len(joined.k3s_events("start")), len(joined.k3s_events("restarting"))
    # As an operator finds it: a member the others see serving (a joiner wiped seconds after
    # its join, still advertised as `joining`, is waited for by the admitting server instead).
    watcher = survivors[0].agent
    assert watcher is not None
    wait_for(f"{name} advertised as a serving server", lambda: [
        e for kind in ("peer_added", "peer_updated") for e in watcher.events(kind)
        if e.get("name") == f"k3s-sugar-dev@{name}.local (server)" and e.get("phase") == "serving"
    ], 30)  # fmt: skip

    started = time.monotonic()
    done = joined.node.run(PYTHON, "-m", "agent", "wipe", "--yes", env=node_env(), timeout=120)
    elapsed = time.monotonic() - started
    print(f"wipe took {elapsed:.1f} s:\n{done.stdout}{done.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr

    # The remaining servers' etcd no longer lists it: one cluster of two voters.
    for pi in survivors:
        status = etcd_status(pi.node)
        assert status is not None, pi.node.name
        assert not [m for m in status[1] if m.rsplit("-", 1)[0] == name], status
    assert_one_cluster(survivors, 2)

    # Its gate does not release: `gate` times out naming the wipe, and the restarted k3s unit
    # waits in its ExecCondition rather than starting a server (sqlite) from no config.
    gate = joined.node.run(PYTHON, "-m", "agent", "gate", "--timeout", "3", env=node_env(),
                           timeout=20)  # fmt: skip
    assert gate.returncode == 1, gate.stdout + gate.stderr
    assert "wiped" in gate.stderr
    wait_for("the k3s unit to restart (its etcd member was removed, so it exited)",
             lambda: len(joined.k3s_events("restarting")) > restarts, RESTART_SEC + 15)  # fmt: skip
    time.sleep(RESTART_SEC + 3)  # a start the gate let through would have logged by now
    assert len(joined.k3s_events("start")) == starts, joined.k3s_log.read_text()[-2000:]
    assert not joined.node.path("/var/lib/rancher/k3s").exists()
    assert not joined.node.path("/run/sugarkube/gate-released").exists()

    # What the operator read, in the order it was done.
    lines = done.stdout.splitlines()
    assert lines[0].startswith("gate: closed by the daemon"), lines
    assert lines[1].startswith(f"etcd: left the cluster: member {name}-"), lines
    assert "2 voting members remain" in lines[1]

    # `systemctl restart sugarkube-agent`: it forms again, fresh, and its k3s (waiting in the
    # gate all along) joins as a new member: the old one is gone, so its node name is free.
    joined.restart_agent()
    restarted = time.monotonic()
    (again,) = wait_formed([joined], 150)
    rejoined = time.monotonic() - restarted
    print(f"released again {rejoined:.1f} s after the agent's restart")
    assert again["mode"] == "join-server", again
    # Admitted at once, not held by the grant its old key took before the wipe (~95 s, it was
    # kept until JOIN_ORDER_WAIT after it was given when this node had taken the last slot).
    assert rejoined < 30, joined.agent.tail(25) if joined.agent is not None else ""
    assert_one_cluster(pis, 3)
