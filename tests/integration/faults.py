"""The fault suite of issue #8 (tracker issue 10): each scenario on real lab nodes, judged by etcd.

A scenario builds its faults on a lab of real avahi-daemons and dbus-daemons, the agent, and the
k3s stand-in with a real etcd (tests/lab/k3s), and returns an Outcome: how many cluster-inits
ran, how many cluster CAs and etcd cluster IDs the nodes hold, how many joins k3s refused (etcd's
one-learner rule) and how long the nodes took to form once the last fault was over. Every
scenario ends by asking etcd (assert_one_cluster) for one cluster ID and the voters it expects.

The lab tests (test_faults_lab.py) run each scenario once in `make test` and more rounds in
`make test-all`; `make bench` runs them to fill the suite's table (bench/faults.py).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.cluster import k3s
from agent.const import LEARNER_REMOVAL
from tests.integration.formation import (
    ETCDCTL,
    TOKEN,
    PiNode,
    assert_one_cluster,
    etcd_status,
    wait_formed,
)
from tests.integration.helpers import Agent, parse_event, wait_for
from tests.lab import Lab, Node

SLOW_SERVE = 25.0  # s: a Pi's k3s takes 20-60 s to serve; the faults meet it while it starts
FORM_TIMEOUT = 150.0  # s for a formation with serialized joins and slow k3s starts
LOW, MID, HIGH = "0000000000000001", "8000000000000000", "f000000000000000"  # election keys


@dataclass
class Outcome:
    """What one run of a scenario produced."""

    scenario: str
    cluster_inits: int  # cluster-init or single releases, over the whole run
    cas: int  # distinct cluster CAs held on the nodes' disks at the end
    cluster_ids: int  # distinct etcd cluster IDs the servers report at the end
    failed_joins: int  # k3s starts refused or failed (too many learners, ...), but see outcome()
    formed_s: float  # from the end of the last fault to every node formed and etcd agreeing

    @property
    def split_brain(self) -> bool:
        return self.cas > 1 or self.cluster_ids > 1 or self.cluster_inits > 1


def _events(path: Path, name: str) -> list[dict[str, str]]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return [e for e in map(parse_event, text.splitlines()) if e.get("event") == name]


def etcd_settled(pis: list[PiNode], timeout: float = 30.0) -> None:
    """Wait until every server's etcd has persisted that the last membership change is committed.

    A follower learns that an entry is committed from the leader's next message, and persists
    that commit index without fsync (etcd's raft.MustSync) until it next appends an entry: cut
    the power before that and it restarts without it. etcd 3.4 then replays a promotion it never
    applied, takes itself for a learner, and learners cannot vote there (raft.go: "learner may
    need to vote, in case of node down when confchange"): a power cut right after a join can
    leave the cluster without a quorum for good. The stand-in's lease renewals close that window
    within seconds, as k3s's do, but a renewal can be late on a loaded machine; so wait for every
    member to apply the same index, then write once and wait until every member has appended and
    applied that write: the append carried, and fsynced, a commit index past every earlier entry.
    """
    def applied(after: int) -> int | None:
        indexes = set()
        for pi in pis:
            if k3s.membership(pi.node.path("/")) is not k3s.Membership.SERVER:
                continue
            done = pi.node.run(*ETCDCTL, "endpoint", "status", "-w", "json", timeout=15)
            if done.returncode != 0:
                return None
            indexes.add(json.loads(done.stdout)[0]["Status"]["raftAppliedIndex"])
        return indexes.pop() if len(indexes) == 1 and min(indexes) > after else None

    settled = wait_for("every etcd member at the same applied index", lambda: applied(0),
                       timeout, every=0.5)  # fmt: skip
    writer = next(pi for pi in pis if k3s.membership(pi.node.path("/")) is k3s.Membership.SERVER)
    writer.node.run(*ETCDCTL, "put", "/sugarkube-lab/settled", str(settled), timeout=15,
                    check=True)  # fmt: skip
    wait_for("every etcd member applied the settling write", lambda: applied(settled), timeout,
             every=0.5)  # fmt: skip


def outcome(name: str, pis: list[PiNode], started: float, voters: int) -> Outcome:
    """Judge the run once formed: etcd must agree on one cluster of `voters`."""
    assert_one_cluster(pis, voters)
    formed = time.monotonic() - started
    inits = sum(
        e.get("mode") in ("cluster-init", "single")
        for pi in pis for e in _events(pi.agent_log, "gate_released")
    )
    # A re-flashed node's join refused for its old member's name is k3s asking the operator to
    # delete the node: that scenario waits for it on purpose; every other refusal counts.
    refused = sum(
        sum(e.get("reason") != "duplicate_name" for e in _events(pi.k3s_log, "refused"))
        + len(_events(pi.k3s_log, "failed")) for pi in pis
    )
    ids = {s[0] for pi in pis if (s := etcd_status(pi.node)) is not None}
    cas = {ca for pi in pis if (ca := pi.ca()) is not None}
    return Outcome(name, inits, len(cas), len(ids), refused, round(formed, 1))


# -- faults ---------------------------------------------------------------------------------------


def seed_key(node: Node, key: str) -> None:
    """Give a fresh node its election key, as if it had drawn it (keys are random otherwise)."""
    ballot = node.path("/var/lib/sugarkube/ballot.json")
    ballot.parent.mkdir(parents=True, exist_ok=True)
    ballot.write_text(json.dumps({"key": key, "bound": "", "bound_host": "", "released": ""}))


def reflash(node: Node) -> None:
    """A new SD card: no k3s state, no drop-in, no ballot (the node must be powered off)."""
    for inner in ("/etc/rancher", "/var/lib/rancher", "/var/lib/sugarkube"):
        for child in node.path(inner).iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()


def restart_agent(pi: PiNode) -> None:
    """systemctl restart sugarkube-agent: SIGTERM, then a new process; k3s keeps running."""
    assert pi.agent is not None
    assert pi.agent.stop() == 0
    pi.agent = Agent(pi.node, pi.agent_log, env=pi.env)


def memory_cgroup_off(node: Node, tmp: Path) -> None:
    """Make the node's kernel say what Raspberry Pi OS's does by default: no memory controller.

    A file bind-mounted, in the node's own mount namespace, over cgroup v2's cgroup.controllers
    where the host has it, else over /proc/cgroups with memory's `enabled` column at 0.
    """
    v2 = Path("/sys/fs/cgroup/cgroup.controllers")
    if v2.exists():
        target, text = v2, " ".join(w for w in v2.read_text().split() if w != "memory") + "\n"
    else:
        target = Path("/proc/cgroups")
        lines = Path("/proc/cgroups").read_text().splitlines()
        text = "\n".join(
            "\t".join([*f[:3], "0"]) if (f := line.split())[0] == "memory" else line
            for line in lines
        ) + "\n"
    fake = tmp / f"{node.ns}-{target.name}"
    fake.write_text(text)
    node.run("mount", "--bind", str(fake), str(target), check=True)


def delete_node(survivor: PiNode, name: str) -> None:
    """`kubectl delete node NAME` as far as etcd goes: k3s's handler removes its member."""
    done = survivor.node.run(*ETCDCTL, "member", "list", "-w", "json", timeout=15, check=True)
    (member,) = [m for m in json.loads(done.stdout)["members"]
                 if m.get("name", "").rsplit("-", 1)[0] == name]  # fmt: skip
    survivor.node.run(*ETCDCTL, "member", "remove", f"{int(member['ID']):x}", timeout=15,
                      check=True)  # fmt: skip


def released_mode(pi: PiNode) -> str | None:
    released = pi.released()
    return released["mode"] if released else None


def wait_released(pis: list[PiNode], mode: str, timeout: float) -> PiNode:
    """The node that released its gate in `mode`."""
    return wait_for(
        f"a gate released in mode {mode}",
        lambda: next((pi for pi in pis if released_mode(pi) == mode), None), timeout,
    )


def wait_status(pi: PiNode, text: str, timeout: float) -> None:
    """Wait for a STATUS line (phase event) that contains `text`."""
    assert pi.agent is not None
    agent = pi.agent
    wait_for(f"status {text!r} on {pi.node.name}; log tail:\n{agent.tail()}", lambda: any(
        text in e.get("status", "") for e in agent.events("phase")), timeout)


def start_all(lab: Lab, logs: Path, gap: float = 0.3, **env: str) -> list[PiNode]:
    pis = [PiNode(n, logs, **env) for n in lab.nodes]
    for pi in pis:
        pi.start()
        time.sleep(gap)
    return pis


# -- the scenarios --------------------------------------------------------------------------------


def power_cut_reflashed_bootstrapper(lab: Lab, logs: Path) -> Outcome:
    """Three formed nodes lose power together; the bootstrapper comes back re-flashed; all boot
    at once and k3s takes 25 s to serve. Before: the members advertised nothing until their k3s
    answered, so the re-flashed node passed the absence gate and ran cluster-init."""
    pis = start_all(lab, logs)
    wait_formed(pis, FORM_TIMEOUT)
    assert_one_cluster(pis, 3)
    etcd_settled(pis)
    boot = wait_released(pis, "cluster-init", 1)
    for pi in pis:
        pi.power_cut()
    reflash(boot.node)
    started = time.monotonic()
    for pi in pis:
        pi.env["K3S_STANDIN_SERVE_DELAY"] = f"{SLOW_SERVE:g}"
        pi.boot()
    members = [pi for pi in pis if pi is not boot]
    wait_formed(members, FORM_TIMEOUT)
    wait_for("the re-flashed node released to join", lambda: released_mode(boot) in (
        "join-server", "join-agent"), FORM_TIMEOUT)
    if released_mode(boot) == "join-server":
        # etcd still has the node's old member: k3s refuses the join ("duplicate node name
        # found") until the operator runs `kubectl delete node`, whose handler removes it.
        wait_for("the join refused for the old member's name", lambda: any(
            e.get("reason") == "duplicate_name" for e in _events(boot.k3s_log, "refused")), 60)
        delete_node(members[0], boot.node.name)
    wait_formed(pis, FORM_TIMEOUT)
    return outcome("power cut, bootstrapper re-flashed, k3s 25 s", pis, started, 3)


def agent_restart_during_bootstrap(lab: Lab, logs: Path) -> Outcome:
    """The bootstrapper's agent restarts (an upgrade, the watchdog) while its k3s starts.
    Before: nothing was published until the local API answered, and another node bootstrapped."""
    pis = start_all(lab, logs, K3S_STANDIN_SERVE_DELAY=f"{SLOW_SERVE:g}")
    boot = wait_released(pis, "cluster-init", 60)
    restart_agent(boot)
    started = time.monotonic()
    wait_formed(pis, FORM_TIMEOUT + 2 * SLOW_SERVE)
    return outcome("agent restart while the bootstrapper's k3s starts", pis, started, 3)


def avahi_restart_late_lower_key(lab: Lab, logs: Path) -> Outcome:
    """The bootstrapper (a higher key) has released; its avahi-daemon restarts, its adverts are
    gone for seconds, and a late node with a lower key boots meanwhile."""
    seed_key(lab.node(1), MID)
    seed_key(lab.node(2), HIGH)
    seed_key(lab.node(3), LOW)
    first = [PiNode(n, logs) for n in lab.nodes[:2]]
    for pi in first:
        pi.start()
    boot = wait_released(first, "cluster-init", 60)
    boot.node.stop_avahi()
    late = PiNode(lab.node(3), logs).start()
    time.sleep(3.0)  # 2.5-4 s without the bootstrapper's adverts, as measured
    boot.node.start_avahi()
    started = time.monotonic()
    pis = [*first, late]
    wait_formed(pis, FORM_TIMEOUT)
    assert released_mode(late) in ("join-server", "join-agent")
    return outcome("avahi-daemon restart on the bootstrapper, late lower key", pis, started, 3)


def lowest_key_dies_mid_election(lab: Lab, logs: Path) -> Outcome:
    """The lowest-keyed node loses power once its candidate advert is out: the others see it
    in Avahi's cache for up to 75 minutes and must neither wait for it nor count it."""
    for node, key in zip(lab.nodes, (LOW, MID, HIGH), strict=True):
        seed_key(node, key)
    pis = start_all(lab, logs, gap=0.0)
    lowest = pis[0]
    assert lowest.agent is not None
    lowest.agent.wait_event("advert_published", 15)
    lowest.power_cut()
    started = time.monotonic()
    wait_formed(pis[1:], FORM_TIMEOUT)
    assert_one_cluster(pis[1:], 2)
    lowest.boot()  # it comes back: it joins what formed without it
    wait_formed(pis, FORM_TIMEOUT)
    return outcome("lowest key dies mid-election without goodbye", pis, started, 3)


def partition_2_1(lab: Lab, logs: Path) -> Outcome:
    """Node 3's mDNS is cut off at power-on (Wi-Fi client isolation): the majority side forms,
    the lone node waits and says so; healed, it joins."""
    lab.node(3).partition()
    pis = start_all(lab, logs)
    wait_formed(pis[:2], FORM_TIMEOUT)
    wait_status(pis[2], "waiting: 1 of 3 servers visible, 2 needed", 10)
    assert pis[2].released() is None
    lab.node(3).heal()
    started = time.monotonic()
    wait_formed(pis, FORM_TIMEOUT)
    return outcome("partition 2|1 at power-on, healed", pis, started, 3)


def partition_1_1_1(lab: Lab, logs: Path) -> Outcome:
    """Every node alone at power-on: nobody bootstraps; healed, they form one cluster."""
    for node in lab.nodes:
        node.partition()
    pis = start_all(lab, logs)
    for pi in pis:
        wait_status(pi, "waiting: 1 of 3 servers visible, 2 needed", 15)
    time.sleep(3.0)
    assert not any(pi.released() for pi in pis)
    for node in lab.nodes:
        node.heal()
    started = time.monotonic()
    wait_formed(pis, FORM_TIMEOUT)
    return outcome("partition 1|1|1 at power-on, healed", pis, started, 3)


def bootstrapper_cannot_run_k3s(lab: Lab, logs: Path) -> Outcome:
    """The lowest key's memory cgroup is off (Raspberry Pi OS's default): it would have won and
    released while its k3s exits at once; it must not stand, and the others form without it."""
    memory_cgroup_off(lab.node(1), logs)
    for node, key in zip(lab.nodes, (LOW, MID, HIGH), strict=True):
        seed_key(node, key)
    started = time.monotonic()
    pis = start_all(lab, logs)
    wait_formed(pis[1:], FORM_TIMEOUT)
    wait_status(pis[0], "not standing: k3s cannot run here: the memory cgroup controller is off", 5)
    assert pis[0].released() is None
    return outcome("the lowest key cannot run k3s (memory cgroup off)", pis, started, 2)


def concurrent_server_joins(lab: Lab, logs: Path) -> Outcome:
    """Two server joiners ready at the same moment, with etcd promoting learners slowly: etcd
    admits one learner at a time, so they must join in turn (0 refused joins)."""
    pis = start_all(lab, logs, gap=0.0, K3S_STANDIN_LEARNER_TICK="5")
    started = time.monotonic()
    wait_formed(pis, FORM_TIMEOUT)
    joins = sorted(
        (float(e["ms_elapsed"]), pi.node.name)
        for pi in pis for e in _events(pi.agent_log, "gate_released") if e["mode"] == "join-server"
    )
    assert len(joins) == 2, joins
    return outcome("concurrent server joins", pis, started, 3)


def join_cut_short_before_etcd(lab: Lab, logs: Path) -> Outcome:
    """A node released join-server and lost power before its k3s asked etcd to add it: its
    ballot says released, its drop-in names the server, its etcd never started. Before: it was
    a member at boot and its k3s joined at once, past the cluster's one-learner admission."""
    seed_key(lab.node(1), LOW)
    seed_key(lab.node(2), MID)
    first = [PiNode(n, logs) for n in lab.nodes[:2]]
    for pi in first:
        pi.start()
    wait_formed(first, FORM_TIMEOUT)
    boot = wait_released(first, "cluster-init", 1)
    cut = lab.node(3)
    cut.path("/var/lib/sugarkube").mkdir(parents=True, exist_ok=True)
    cut.path("/var/lib/sugarkube/ballot.json").write_text(json.dumps({
        "key": HIGH, "bound": LOW, "bound_host": f"{boot.node.name}.local",
        "released": "join-server",
    }))
    dropin = cut.path(f"/{k3s.OUR_DROPIN}")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(k3s.render_dropin(k3s.Release(
        "join-server", k3s.api_url(boot.node.addr), TOKEN,
        ("sugarkube.io/cluster=sugar",),
    )))
    dropin.chmod(0o600)
    started = time.monotonic()
    late = PiNode(cut, logs).start()
    pis = [*first, late]
    wait_formed(pis, FORM_TIMEOUT)
    assert late.agent is not None and late.agent.events("rejoin"), late.agent.tail()
    assert released_mode(late) == "join-server"  # admitted, not a member at once
    return outcome("a join cut short before etcd started", pis, started, 3)


def joiner_dies_as_a_learner(lab: Lab, logs: Path) -> Outcome:
    """The first server joiner loses power the moment etcd has added it as a learner; k3s
    serves slowly. etcd refuses every other learner until k3s removes the dead one (5 min
    without progress): the next joiner must wait that long, not be refused. Not in SCENARIOS:
    it takes 6 minutes (test_faults_lab.py runs it in `make test-all`)."""
    for node, key in zip(lab.nodes, (LOW, MID, HIGH), strict=True):
        seed_key(node, key)
    pis = start_all(lab, logs, gap=0.0, K3S_STANDIN_SERVE_DELAY=f"{SLOW_SERVE:g}",
                    K3S_STANDIN_LEARNER_TICK="15")  # k3s's own tick  # fmt: skip
    boot, dying, last = pis
    wait_for("node2 added as a learner", lambda: any(
        e.get("name", "").startswith(f"{dying.node.name}-")
        for e in boot.k3s_events("learner_added")), FORM_TIMEOUT)
    dying.power_cut()
    started = time.monotonic()
    wait_status(last, f"waiting for {dying.node.name}.local", 60)
    wait_formed([boot, last], LEARNER_REMOVAL + FORM_TIMEOUT)
    # etcd never heard from it: the member it removes is `unstarted-<ID>`, nameless
    assert boot.k3s_events("learner_removed"), "k3s never removed the dead learner"
    return outcome("a joiner dies as a learner", [boot, last], started, 2)


Scenario = Callable[[Lab, Path], Outcome]
SCENARIOS: dict[str, Scenario] = {
    "power_cut_reflashed": power_cut_reflashed_bootstrapper,
    "agent_restart": agent_restart_during_bootstrap,
    "avahi_restart": avahi_restart_late_lower_key,
    "lowest_dies": lowest_key_dies_mid_election,
    "partition_2_1": partition_2_1,
    "partition_1_1_1": partition_1_1_1,
    "cannot_run_k3s": bootstrapper_cannot_run_k3s,
    "concurrent_joins": concurrent_server_joins,
    "join_cut_short": join_cut_short_before_etcd,
}
