"""A lab node as a Pi runs it, and what etcd says about the cluster such nodes formed.

PiNode: the agent, and k3s (the stand-in, tests/lab/k3s/) as k3s.service and k3s-agent.service,
each gated on `agent gate --role` and restarted as systemd restarts them; power_cut() and
boot() for a node that loses power and comes back with its disk. etcd_status() and
assert_one_cluster(): "one cluster" is what etcd says.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from agent import tokens
from agent.cluster import k3s
from tests.integration.helpers import PYTHON, Agent, node_env, parse_event, wait_for
from tests.lab import Lab, Node
from tests.lab.k3s.const import AGENT_CA, CA_CERT, CLIENT_TIMEOUT

REPO = Path(__file__).resolve().parents[2]
TOKEN = "lab-token-0123456789"
GATE_TIMEOUT = 120  # s, the gate drop-in's `sugarkube-agent gate --timeout`
RESTART_SEC = 5.0  # s, k3s.service's RestartSec=5s (k3s's install.sh writes Restart=always)
UNIT_STARTS = 40  # the lab unit gives up after this many starts (~4 min of 5 s restarts)
# The lab's stand-in timings (a real Pi: 20-60 s to serve, a 15 s learner tick; tests/lab/k3s):
# short enough for many tests, long enough that joins overlap and learners wait their turn.
LAB_SERVE_DELAY = 3.0  # s from the stand-in's start to listening on 6443
LAB_LEARNER_TICK = 2.0  # s between the etcd leader's promotion attempts
KILL_TIMEOUT = 10.0  # s for SIGKILLed processes to be gone
# etcdctl as k3s's docs run it on a server: TLS with k3s's etcd client certificate.
_ETCD_TLS = "/var/lib/rancher/k3s/server/tls/etcd"
ETCDCTL = ("etcdctl", "--endpoints", "https://127.0.0.1:2379", "--dial-timeout", "2s",
           "--command-timeout", "5s", f"--cacert={_ETCD_TLS}/server-ca.crt",
           f"--cert={_ETCD_TLS}/client.crt", f"--key={_ETCD_TLS}/client.key")  # fmt: skip


SKIPPED = 3  # `gate --role`: released in the other role; ExecCondition= skips the unit


def gate_condition(role: str) -> str:
    """The drop-in's ExecCondition= for the unit of ROLE (`agent gate --role ROLE`)."""
    return f"{PYTHON} -m agent gate --role {role} --timeout {GATE_TIMEOUT}"


def k3s_unit(
    start: str, condition: str = "", starts: int = UNIT_STARTS, restart_sec: float = RESTART_SEC,
    name: str = "k3s",
) -> str:
    """A k3s unit for `sh -c`: CONDITION (the gate, as ExecCondition=), then START (`k3s ...`).

    As systemd runs the drop-in's ExecCondition= with Restart=always and RestartSec: CONDITION
    exiting SKIPPED skips the unit for this boot (no restart); any other failure of CONDITION,
    and whatever ends START (k3s refused, or stopped), start again RESTART_SEC s later, STARTS
    times at most. A SIGTERM to the shell or its group stops the start in progress and ends the
    loop; a SIGKILL of the group (the shell is its leader) takes everything, etcd included.
    CONDITION and START must not contain `'`.
    """
    check = f"""  sh -c '{condition}' & child=$!
  wait $child; rc=$?
  if [ -n "$stop" ]; then exit 0; fi
  if [ $rc -eq {SKIPPED} ]; then echo "k3s-unit event=skipped unit={name} start=$n" >&2; exit 0; fi
  if [ $rc -eq 0 ]; then
""" if condition else "  if :; then\n"
    return f"""stop=
trap 'trap "" TERM INT; stop=1; kill -TERM 0' TERM INT
n=0
while :; do
  n=$((n + 1))
{check}    sh -c 'exec {start}' & child=$!
    wait $child; rc=$?
    if [ -n "$stop" ]; then wait $child; exit 0; fi
  fi
  if [ $n -ge {starts} ]; then
    echo "k3s-unit event=gave_up unit={name} starts=$n rc=$rc" >&2; exit 1
  fi
  echo "k3s-unit event=restarting unit={name} start=$n rc=$rc in_s={restart_sec:g}" >&2
  sleep {restart_sec:g} & child=$!
  wait $child
  if [ -n "$stop" ]; then exit 0; fi
done
"""


# k3s.service and k3s-agent.service, both installed and enabled, each gated in its role.
K3S_UNITS = {
    role: k3s_unit(f"{PYTHON} -m tests.lab.k3s_standin {role}", gate_condition(role), name=unit)
    for role, unit in (("server", "k3s"), ("agent", "k3s-agent"))
}


def _events(path: Path, offset: int, name: str, prefix: str = "") -> list[dict[str, str]]:
    """Every `event=NAME` line starting with PREFIX of log PATH from byte OFFSET on, as dicts.

    PREFIX keeps out the lab's header line of each start, which quotes the unit's script.
    """
    text = path.read_bytes()[offset:].decode(errors="replace") if path.exists() else ""
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    return [e for e in map(parse_event, lines) if e.get("event") == name]


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _group_alive(pgid: int) -> bool:
    """Whether any process is still in process group PGID."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = (entry / "stat").read_text()
                if int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
                    return True
    return False


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group PROC leads (while PROC is unreaped its PGID is ours)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def _wait_group_gone(proc: subprocess.Popen[bytes]) -> None:
    proc.wait(KILL_TIMEOUT)
    wait_for(f"process group {proc.pid} gone", lambda: not _group_alive(proc.pid), KILL_TIMEOUT)


class PiNode:
    """One node's agent and gated, restarting k3s stand-in, with their logs."""

    def __init__(
        self,
        node: Node,
        logs: Path,
        token: str = TOKEN,
        *,
        serve_delay: float = LAB_SERVE_DELAY,
        learner_tick: float = LAB_LEARNER_TICK,
        **env: str,
    ) -> None:
        self.node = node
        self.logs = logs
        self.env = {
            "SUGARKUBE_TOKEN": token,
            "K3S_STANDIN_SERVE_DELAY": f"{serve_delay:g}",
            "K3S_STANDIN_LEARNER_TICK": f"{learner_tick:g}",
            **env,
        }
        self.agent: Agent | None = None
        self.k3s_log = logs / f"{node.ns}-k3s.log"
        self.agent_log = logs / f"{node.ns}-agent.log"
        self._k3s_from = self._agent_from = 0

    def start(self) -> PiNode:
        """Power on: the agent and both k3s units (`units[role]`: its process group leader)."""
        if self.node.avahi_pid() is None:
            self.node.start_avahi()
        self._k3s_from, self._agent_from = _size(self.k3s_log), _size(self.agent_log)
        self.agent = Agent(self.node, self.agent_log, env=self.env)
        self.units = {
            role: self.node.spawn("sh", "-c", unit, log=self.k3s_log, env=node_env(**self.env))
            for role, unit in K3S_UNITS.items()
        }
        return self

    boot = start

    def restart_agent(self) -> None:
        """`systemctl restart sugarkube-agent`: SIGTERM the agent and start it again (not k3s)."""
        if self.agent is not None:
            self.agent.stop()
        self._agent_from = _size(self.agent_log)
        self.agent = Agent(self.node, self.agent_log, env=self.env)

    def power_cut(self) -> None:
        """Pull the plug: SIGKILL the agent, the k3s unit's group (etcd too) and avahi-daemon.

        The disk stays; /run is a tmpfs, so what the agent kept there goes, as at a reboot.
        avahi-daemon goes first: alive even for a moment after the agent, it would withdraw
        the agent's entry groups with goodbye packets, which a dead node never sends.
        """
        self.node.kill_avahi_hard()
        groups = [*self.units.values(), *([self.agent.proc] if self.agent is not None else [])]
        for proc in groups:
            _kill_group(proc)
        for proc in groups:
            _wait_group_gone(proc)
        run = self.node.path("/run/sugarkube")
        for child in run.iterdir() if run.is_dir() else ():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def released(self) -> dict[str, str] | None:
        """The gate_released event of this boot, if any."""
        events = _events(self.agent_log, self._agent_from, "gate_released")
        return events[0] if events else None

    def k3s_events(self, name: str) -> list[dict[str, str]]:
        """The `event=NAME` lines of this boot's k3s unit (`k3s-standin` and `k3s-unit` lines)."""
        return _events(self.k3s_log, self._k3s_from, name, "k3s-")

    def ca(self) -> str | None:
        """sha256 of the cluster CA this node's k3s belongs to (server or agent)."""
        return ca_of(self.node)

    def joined(self) -> bool:
        """The stand-in serves, or joined (as an agent, or a server promoted to voter), or
        started again as the agent it is."""
        return any(self.k3s_events(name) for name in ("serving", "joined", "restarted"))

    def units_run(self) -> dict[str, list[str]]:
        """What each k3s unit did this boot: its `k3s-unit` events in order, by unit name."""
        done: dict[str, list[str]] = {"k3s": [], "k3s-agent": []}
        for name in ("skipped", "restarting", "gave_up"):
            for e in self.k3s_events(name):
                done[e["unit"]].append(name)
        return done


def formed_member(node: Node, logs: Path) -> PiNode:
    """NODE formed a single-server cluster, then its agent stopped (k3s keeps running)."""
    pi = PiNode(node, logs, SUGARKUBE_SERVERS="1").start()
    wait_formed([pi], 30)
    assert pi.agent is not None and pi.agent.stop() == 0
    return pi


def form(lab: Lab, logs: Path, *, jitter: float, seed: int, **env: str) -> list[PiNode]:
    """Start every node of the lab within `jitter` s (random order), as powered-on Pis."""
    rng = random.Random(seed)
    delays = sorted(rng.uniform(0, jitter) for _ in lab.nodes)
    nodes = [PiNode(n, logs, **env) for n in lab.nodes]
    rng.shuffle(nodes)
    t0 = time.monotonic()
    for pi, delay in zip(nodes, delays, strict=True):
        time.sleep(max(0.0, t0 + delay - time.monotonic()))
        pi.start()
    return nodes


def wait_formed(nodes: list[PiNode], timeout: float) -> list[dict[str, str]]:
    """Wait until every node's gate released and its k3s joined; the release events."""

    def all_done() -> list[dict[str, str]] | None:
        released = [pi.released() for pi in nodes]
        if all(released) and all(pi.joined() for pi in nodes):
            return [r for r in released if r]
        return None

    try:
        return wait_for("every gate released and k3s joined", all_done, timeout)
    except AssertionError:
        for pi in nodes:
            assert pi.agent is not None
            print(f"--- {pi.node.ns} agent\n{pi.agent.tail(25)}")
            k3s_text = pi.k3s_log.read_text(errors="replace") if pi.k3s_log.exists() else ""
            print(f"--- {pi.node.ns} k3s\n{k3s_text[-1500:]}")
        raise


# --- what a node's k3s holds and serves ---------------------------------------------------------


def node_query(node: Node, what: str, url: str = "https://127.0.0.1:6443") -> str | None:
    """What the stand-in in NODE answers to `query WHAT URL`; None when it does not answer."""
    done = node.run(
        PYTHON, "-m", "tests.lab.k3s_standin", "query", what, url,
        env={"PYTHONPATH": str(REPO)}, timeout=CLIENT_TIMEOUT + 5,
    )  # fmt: skip
    return done.stdout if done.returncode == 0 else None


def ca_of(node: Node) -> str | None:
    """The CA hash NODE's k3s state belongs to (server or agent); None when it holds none."""
    member = k3s.membership(node.path("/"))
    path = {k3s.Membership.SERVER: CA_CERT, k3s.Membership.AGENT: AGENT_CA}.get(member)
    if path is None or not node.path("/" + path).is_file():
        return None
    return tokens.ca_hash(node.path("/" + path).read_bytes())


def served_ca_of(node: Node) -> str | None:
    """The CA hash NODE's stand-in serves on 6443; None when nothing answers."""
    answer = node_query(node, "ca")
    return answer.strip() if answer else None


def etcd_status(node: Node) -> tuple[int, dict[str, bool]] | None:
    """etcd's view from inside NODE: (cluster ID, {member name: is learner}); None if silent.

    A member added but not started yet has no name: it shows as `unstarted-<ID in hex>`.
    """
    done = node.run(*ETCDCTL, "member", "list", "-w", "json", timeout=15)
    if done.returncode != 0:
        return None
    answer = json.loads(done.stdout)
    members = {
        m.get("name") or f"unstarted-{int(m['ID']):x}": bool(m.get("isLearner", False))
        for m in answer.get("members", [])
    }
    return int(answer["header"]["cluster_id"]), members


def assert_one_cluster(
    nodes: Sequence[Node | PiNode], voters: int, timeout: float = 60.0
) -> int:
    """Wait until every server among NODES sees one etcd cluster of VOTERS voters; its ID.

    Servers are the nodes whose k3s state holds server/db (agents are not asked). Each must
    report the same cluster ID and the same VOTERS members, none of them a learner. An
    AssertionError shows every server's view when that does not happen within TIMEOUT s.
    """
    lab_nodes = [n.node if isinstance(n, PiNode) else n for n in nodes]
    views: dict[str, tuple[int, dict[str, bool]] | None] = {}

    def one_cluster() -> int | None:
        views.clear()
        for node in lab_nodes:
            if k3s.membership(node.path("/")) is k3s.Membership.SERVER:
                views[node.name] = etcd_status(node)
        if not views or None in views.values():
            return None
        distinct = {(v[0], tuple(sorted(v[1].items()))) for v in views.values() if v}
        if len(distinct) != 1:
            return None
        ((cluster_id, members),) = distinct
        if len(members) != voters or any(learner for _, learner in members):
            return None
        return cluster_id

    try:
        return wait_for(f"one etcd cluster of {voters} voters", one_cluster, timeout, every=0.5)
    except AssertionError as exc:
        shown = {name: (f"{v[0]:x}", v[1]) if v else None for name, v in views.items()}
        raise AssertionError(f"{exc}; etcd's view per server: {shown}") from None
