"""A liar on the LAN (issue 12): honest lab nodes beside tests/lab/adversary.py, a scapy host
that forges, replays and floods adverts, answers for others' names and serves a fake 6443
that records any token it receives. Real avahi-daemon, dbus-daemon and k3s stand-in per node.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.integration.formation import PiNode, assert_one_cluster, wait_formed
from tests.integration.helpers import PYTHON, node_env, wait_for
from tests.integration.hostile import (
    FORGED,
    FORM_TIMEOUT,
    Adversary,
    form_beside_a_forger,
    ignored,
    split_brains,
    still_a_peer,
)


def test_three_nodes_form_one_cluster_beside_a_forger_and_give_it_no_token(
    lab_factory, tmp_path: Path
) -> None:
    """Before: the forged lowest-key candidate stalled the election, and the forged serving
    server passed the wire proof against its own CA, so joiners sent it the short token."""
    outcome, liar, pis = form_beside_a_forger(lab_factory(4), tmp_path)
    for pi in pis:
        assert set(FORGED) <= ignored(pi, "unauthenticated"), pi.node.name
    assert (outcome.tokens, outcome.split_brains) == (0, 0), "a token leaked or two clusters"
    assert outcome.forged > 0 and liar.counts()["captured"] > 0

    # Replay: node2's agent restarts (a new start: boot= counts up); the liar replays what it
    # captured of the earlier start. The others ignore it and keep node2 as it is now.
    liar.command("freeze")
    time.sleep(0.5)
    pis[1].restart_agent()
    assert pis[1].agent is not None
    pis[1].agent.wait_event("advert_published", 30)
    time.sleep(2.0)
    others = (pis[0], pis[2])
    liar.command("replay")
    wait_for("the liar replayed", lambda: liar.counts()["replayed"] > 0, 10)
    time.sleep(3.0)
    assert all(any("@node2.local (" in n for n in ignored(pi, "replayed")) for pi in others)
    # The peer stays (node2's avahi-daemon may rename its service on the replay's conflicting
    # records: Avahi's own defence, and the MAC covers the name without Avahi's ` #2`).
    assert all(still_a_peer(pi, "k3s-sugar-dev@node2.local (server)") for pi in others)
    assert_one_cluster(pis, 3)
    assert (len(liar.tokens()), split_brains(pis)) == (0, 0)


def test_joiners_with_the_k10_token_join_the_real_server_not_the_forger(
    lab_factory, tmp_path: Path
) -> None:
    lab = lab_factory(4)
    real = PiNode(lab.node(1), tmp_path, SUGARKUBE_SERVERS="1").start()
    wait_formed([real], 60)
    k10 = real.node.path("/var/lib/rancher/k3s/server/token").read_text().strip()
    assert k10.startswith("K10")
    liar = Adversary(lab.node(4), tmp_path / "adversary", "--forge")
    time.sleep(3.0)  # the forged adverts in every Avahi cache first
    joiners = [PiNode(lab.node(i), tmp_path, token=k10, SUGARKUBE_SERVERS="1").start()
               for i in (2, 3)]  # fmt: skip
    for released in wait_formed(joiners, FORM_TIMEOUT):
        assert released["leader"] == "node1.local"
    for pi in joiners:
        assert pi.ca() == real.ca()
        assert set(FORGED) <= ignored(pi, "unauthenticated"), pi.node.name
    assert (len(liar.tokens()), split_brains([real, *joiners])) == (0, 0)


def test_a_flooded_live_round_is_no_round_of_absence(lab_factory, tmp_path: Path) -> None:
    """More instances than a round keeps: before, the capped round still counted as absence
    (a live server beyond the cap went unheard, and a second cluster formed beside it)."""
    lab = lab_factory(2)
    liar = Adversary(lab.node(2), tmp_path / "adversary", "--flood", "1100")
    fresh = PiNode(lab.node(1), tmp_path, SUGARKUBE_SERVERS="1").start()
    assert fresh.agent is not None
    failed = fresh.agent.wait_event("absence_round_failed", 30)
    assert "IncompleteRound" in failed["error"]
    time.sleep(10.0)
    assert fresh.released() is None, "a flooded round counted as absence"
    assert liar.counts()["flooded"] >= 1100
    liar.stop()
    (released,) = wait_formed([fresh], 60)
    assert released["mode"] == "single"


def test_two_clusters_under_one_token_raise_the_split_brain_alarm(
    lab_factory, tmp_path: Path
) -> None:
    """Two nodes form apart (an mDNS partition at power-on), each a cluster of its own; once
    they hear each other, both say so: STATUS, the event, the verifier's single_cluster."""
    lab = lab_factory(2)
    lab.node(2).partition()
    pis = [PiNode(lab.node(i), tmp_path, SUGARKUBE_SERVERS="1").start() for i in (1, 2)]
    for released in wait_formed(pis, 60):
        assert released["mode"] == "single"
    assert pis[0].ca() != pis[1].ca()
    lab.node(2).heal()
    pis[1].restart_agent()  # publishes anew: its advert (and CA) reaches node1
    for pi in pis:
        assert pi.agent is not None
        alarm = pi.agent.wait_event("split_brain", 30)
        assert alarm["cas"] == "2" and "node1.local" in alarm["where"]
        assert pi.node.path("/run/sugarkube/split-brain").exists()
    status = lab.node(1).run(PYTHON, "-m", "agent", "status", "--json", env=node_env(),
                             timeout=20)  # fmt: skip
    assert "SPLIT BRAIN: 2 clusters advertised" in json.loads(status.stdout)["status"]
    verify = lab.node(1).run(PYTHON, "-m", "agent", "verify", "--json", env=node_env(),
                             timeout=120)  # fmt: skip
    (check,) = [c for c in json.loads(verify.stdout)["checks"] if c["name"] == "single_cluster"]
    assert check["status"] == "fail" and "split brain" in check["detail"]
