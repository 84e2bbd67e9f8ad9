"""The lab's k3s stand-in against a real etcd: bootstrap, join, refuse and restart as k3s does.

Each stand-in runs in its own lab node (its own address, 2379/2380/6443 and private /var/lib/
rancher), configured through our real drop-in writer; "one cluster" is asked of etcd itself.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import tokens
from agent.cluster import k3s
from agent.cluster.k3s import Membership, Release, membership, write_dropin
from agent.tokens import parse_token
from tests.integration.formation import (
    RESTART_SEC,
    assert_one_cluster,
    etcd_status,
    k3s_unit,
    node_query,
)
from tests.integration.helpers import PYTHON, node_env, parse_event, wait_for
from tests.lab import Node
from tests.lab.k3s import cli, disk
from tests.lab.k3s.certs import new_ca
from tests.lab.k3s.const import AGENT_CA, CA_CERT, ETCD_DIR, ETCD_WAL, SERVER_TOKEN

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 30.0  # s; etcd with k3s's 5 s election timeout elects itself in ~2-4 s
PASSWORD = "lab-password-0123"
MEMBER_NAME = re.compile(r"node\d-[0-9a-f]{8}")


class StandIn:
    """One stand-in process in a lab node; its stderr in LOGS/<node>-standin.log."""

    def __init__(self, node: Node, logs: Path, argv: list[str], env: dict[str, str]) -> None:
        self.node = node
        self.log = logs / f"{node.name}-standin.log"
        self.offset = self.log.stat().st_size if self.log.exists() else 0  # earlier runs' lines
        self.started = time.monotonic()
        self.proc = node.spawn(*argv, log=self.log, env=node_env(**env))

    @property
    def root(self) -> Path:
        return self.node.path("/")

    @property
    def url(self) -> str:
        return f"https://{self.node.addr}:6443"

    def text(self) -> str:
        return self.log.read_bytes()[self.offset :].decode(errors="replace")

    def events(self, name: str) -> list[dict[str, str]]:
        """Every `event=NAME` line of this run (the log may hold earlier runs' lines)."""
        lines = [line for line in self.text().splitlines() if line.startswith("k3s-")]
        return [e for e in map(parse_event, lines) if e.get("event") == name]

    def wait(self, what: str, probe: Callable[[], object], timeout: float = START_TIMEOUT) -> None:
        try:
            wait_for(f"{self.node.name}: {what}", probe, timeout)
        except AssertionError as exc:
            raise AssertionError(f"{exc}:\n{self.text()}") from None

    def serving(self, timeout: float = START_TIMEOUT) -> dict[str, str]:
        """Wait for the serving line; fail at once if the process exited instead."""
        self.wait("serving", lambda: self.events("serving") or self.proc.poll() is not None,
                  timeout)  # fmt: skip
        assert self.events("serving"), f"{self.node.name} exited:\n{self.text()}"
        return self.events("serving")[-1]

    def exit_code(self, timeout: float = START_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.node.name} still runs:\n{self.text()}") from None

    def stop(self) -> int:
        """SIGTERM to the process group (the unit's loop and whatever it started)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        return self.exit_code(20)


Spawn = Callable[..., StandIn]


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawn]:
    """spawn(node, release, *args, unit=False, **env): a stand-in in NODE configured by RELEASE.

    `args` follow `python3 -m tests.lab.k3s_standin` (default `server --serve-delay 0`); with
    unit=True it runs under the lab's restart loop (k3s.service's Restart=always) instead.
    The lab kills whatever is left at the end of the test.
    """

    def start(
        node: Node, release: Release | None, *args: str, unit: bool = False, **env: str
    ) -> StandIn:
        if release is not None:
            write_dropin(node.path("/"), release)
        args = args or ("server", "--serve-delay", "0")
        command = [PYTHON, "-m", "tests.lab.k3s_standin", *args]
        argv = ["sh", "-c", k3s_unit(" ".join(command))] if unit else command
        return StandIn(node, tmp_path, argv, {"K3S_STANDIN_LEARNER_TICK": "1", **env})

    yield start


def state_ca(node: Node) -> str:
    """sha256 of the CA this node's k3s state holds, server or agent."""
    path = CA_CERT if membership(node.path("/")) is Membership.SERVER else AGENT_CA
    return hashlib.sha256(node.path("/" + path).read_bytes()).hexdigest()


def server_token(node: Node) -> str:
    return node.path("/" + SERVER_TOKEN).read_text()


def join(first: StandIn, token: str | None = None, mode: k3s.Mode = "join-server") -> Release:
    return Release(mode, server_url=first.url, token=token or server_token(first.node))


def api_open(node: Node) -> bool:
    """Whether something accepts TCP on NODE's 6443 (asked from inside the node)."""
    probe = "import socket; socket.create_connection(('127.0.0.1', 6443), 1).close()"
    return node.run(PYTHON, "-c", probe, timeout=10).returncode == 0


@pytest.mark.lab
def test_cluster_init_starts_a_one_member_etcd_and_serves_its_ca(lab_factory, spawn) -> None:
    (node,) = lab_factory(1).nodes
    first = spawn(node, Release("cluster-init", token=PASSWORD))
    serving = first.serving()
    assert [e["datastore"] for e in first.events("bootstrapped")] == ["etcd"]
    (started,) = first.events("etcd_started")
    assert started["cluster_state"] == "new"
    status = etcd_status(node)
    assert status is not None
    cluster_id, members = status
    ((name, learner),) = members.items()
    assert MEMBER_NAME.fullmatch(name) and not learner, members
    assert first.events("etcd_voter")[0]["cluster_id"] == f"{cluster_id:x}"
    ca = state_ca(node)
    assert serving["ca"] == ca and serving["datastore"] == "etcd"
    assert (node_query(node, "ca") or "").strip() == ca
    assert node_query(node, "ping") == "pong"
    assert hashlib.sha256((node_query(node, "cacerts") or "").encode()).hexdigest() == ca
    token = parse_token(server_token(node))
    assert (token.ca_hash, token.user, token.password) == (ca, "server", PASSWORD)
    assert stat.S_IMODE(os.stat(node.path("/" + SERVER_TOKEN)).st_mode) == 0o600
    assert membership(node.path("/")) is Membership.SERVER
    assert node.path("/" + ETCD_WAL).is_dir()
    assert first.stop() == 0
    assert first.events("stopped")
    assert etcd_status(node) is None  # etcd stopped with it


@pytest.mark.lab
def test_two_joins_in_turn_make_three_voters_of_one_cluster(lab_factory, spawn) -> None:
    n1, n2, n3 = lab_factory(3).nodes
    first = spawn(n1, Release("cluster-init", token=PASSWORD))
    ca = first.serving()["ca"]
    second = spawn(n2, join(first))
    assert second.serving()["ca"] == ca
    # etcd's strict reconfig check refuses a MemberAdd until every voter has been connected for
    # 5 s (HealthInterval): a join right after a promotion meets "unhealthy cluster", exits 1
    # like k3s before v1.26.5, and k3s.service's restart brings it in.
    third = spawn(n3, join(first), unit=True)
    assert third.serving(timeout=RESTART_SEC + 30)["ca"] == ca
    assert {e["reason"] for e in third.events("refused")} <= {"etcd_unhealthy"}
    cluster_id = assert_one_cluster([n1, n2, n3], voters=3, timeout=20)
    assert {e["cluster_id"] for e in second.events("joined") + third.events("joined")} \
        == {f"{cluster_id:x}"}  # fmt: skip
    assert [e["cluster_state"] for e in third.events("etcd_started")] == ["existing"]
    assert len(first.events("learner_added")) == 2 and len(first.events("promoted")) == 2
    assert state_ca(n1) == state_ca(n2) == state_ca(n3) == ca
    for standin in (first, second, third):
        assert standin.stop() == 0


@pytest.mark.lab
def test_a_second_concurrent_learner_is_refused_then_joins_on_restart(
    lab_factory, spawn
) -> None:
    n1, n2, n3 = lab_factory(3).nodes
    # A slow learner manager on the server (k3s: 15 s) keeps the first learner a learner a while.
    first = spawn(n1, Release("cluster-init", token=PASSWORD), K3S_STANDIN_LEARNER_TICK="5")
    first.serving()
    joiners = [spawn(n, join(first), unit=True) for n in (n2, n3)]
    for joiner in joiners:
        joiner.serving(timeout=RESTART_SEC + 40)
    refused = [j for j in joiners if j.events("refused")]
    assert len(refused) == 1, [j.text() for j in joiners]
    (loser,) = refused
    # etcd refuses a second learner at once; on a loaded machine its MemberAdd may instead
    # time out behind the first one's (etcd_refused): refused either way, and k3s retries.
    reasons = {"too_many_learners", "etcd_refused"}
    assert loser.events("refused")[0]["reason"] in reasons
    assert "k3s-unit event=restarting unit=k3s start=1 rc=1" in loser.text()
    assert first.events("join_rejected")[0]["reason"] in reasons
    assert_one_cluster([n1, n2, n3], voters=3, timeout=20)
    for joiner in joiners:
        assert joiner.stop() == 0


@pytest.mark.lab
def test_a_restart_keeps_its_cluster_whatever_the_config_says(lab_factory, spawn) -> None:
    n1, n2 = lab_factory(2).nodes
    first = spawn(n1, Release("cluster-init", token=PASSWORD))
    ca = first.serving()["ca"]
    second = spawn(n2, join(first))
    second.serving()
    cluster_id = assert_one_cluster([n1, n2], voters=2, timeout=20)
    assert second.stop() == 0
    # Restarted with a drop-in that now says cluster-init: its etcd data wins, as in k3s.
    again = spawn(n2, Release("cluster-init", token=PASSWORD))
    assert again.serving()["ca"] == ca
    assert [(e["role"], e["datastore"]) for e in again.events("restarted")] == [("server", "etcd")]
    assert not again.events("bootstrapped") and not again.events("join_request")
    # A power cut of the first server (its group, etcd too), then a start from its disk.
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    revived = spawn(n1, None)
    assert revived.serving()["ca"] == ca
    assert assert_one_cluster([n1, n2], voters=2, timeout=20) == cluster_id


@pytest.mark.lab
def test_nothing_listens_on_6443_before_the_serve_delay(lab_factory, spawn) -> None:
    (node,) = lab_factory(1).nodes
    # The flag wins over the environment (which alone would mean 60 s).
    delayed = spawn(node, Release("cluster-init", token=PASSWORD), "server", "--serve-delay", "6",
                    K3S_STANDIN_SERVE_DELAY="60")  # fmt: skip
    # State is on disk early, as k3s writes it in its first seconds; the port stays shut.
    delayed.wait("the CA and token on disk", lambda: node.path("/" + SERVER_TOKEN).is_file(), 5)
    assert node.path("/" + CA_CERT).is_file() and node.path("/" + ETCD_DIR).is_dir()
    closed = []
    while not delayed.events("serving") and time.monotonic() - delayed.started < 15:
        closed.append((time.monotonic() - delayed.started, api_open(node)))
        time.sleep(0.3)
    delayed.serving()
    opened_at = time.monotonic() - delayed.started
    assert closed and not any(up for _, up in closed), closed
    assert max(t for t, _ in closed) > 5.0, closed
    assert 6.0 <= opened_at < 12.0, opened_at
    assert api_open(node)


@pytest.mark.lab
def test_an_agent_joins_without_etcd_and_does_not_serve(lab_factory, spawn) -> None:
    n1, n2 = lab_factory(2).nodes
    first = spawn(n1, Release("cluster-init", token=PASSWORD))
    first.serving()
    # The short token (password only) trusts what it is served, as k3s agents do.
    agent = spawn(n2, join(first, PASSWORD, "join-agent"), "agent")
    agent.wait("joined", lambda: agent.events("joined"))
    assert membership(n2.path("/")) is Membership.AGENT
    assert state_ca(n2) == state_ca(n1)
    assert etcd_status(n2) is None and not api_open(n2)
    assert not n2.path("/" + ETCD_DIR).exists()
    assert first.events("join_accepted")[0]["role"] == "agent"
    assert_one_cluster([n1, n2], voters=1, timeout=10)
    assert agent.stop() == 0


@pytest.mark.lab
def test_wrong_password_is_refused_and_never_logged(lab_factory, spawn) -> None:
    n1, n2 = lab_factory(2).nodes
    first = spawn(n1, Release("cluster-init", token=PASSWORD))
    ca = first.serving()["ca"]
    joiner = spawn(n2, join(first, f"K10{ca}::server:not-the-password"))
    assert joiner.exit_code() == 1
    assert [e["reason"] for e in joiner.events("refused")] == ["unauthorized"]
    assert [e["reason"] for e in first.events("join_rejected")] == ["unauthorized"]
    assert not n2.path("/" + SERVER_TOKEN).exists()
    assert "not-the-password" not in joiner.text() + first.text()


@pytest.mark.lab
def test_ca_mismatch_is_refused_before_the_password_is_sent(lab_factory, spawn) -> None:
    n1, n2 = lab_factory(2).nodes
    first = spawn(n1, Release("cluster-init", token=PASSWORD))
    first.serving()
    joiner = spawn(n2, join(first, f"K10{'0' * 64}::server:{PASSWORD}"))
    assert joiner.exit_code() == 1
    assert [e["reason"] for e in joiner.events("refused")] == ["ca_mismatch"]
    assert not joiner.events("join_request")
    # The server never saw a join: neither accepted nor rejected.
    assert not first.events("bootstrap_sent") and not first.events("join_rejected")
    assert not n2.path("/" + CA_CERT).exists()


@pytest.mark.lab
def test_single_server_takes_agents_but_no_servers(lab_factory, spawn) -> None:
    n1, n2, n3 = lab_factory(3).nodes
    single = spawn(n1, Release("single"))
    assert single.serving()["datastore"] == "sqlite"
    assert etcd_status(n1) is None
    token = parse_token(server_token(n1))  # no token configured: a random password
    assert token.secure() and len(token.password) == 32
    server = spawn(n2, join(single))
    assert server.exit_code() == 1
    assert [e["reason"] for e in server.events("refused")] == ["sqlite"]
    agent = spawn(n3, join(single, mode="join-agent"), "agent")
    agent.wait("joined", lambda: agent.events("joined"))
    assert state_ca(n3) == state_ca(n1)


@pytest.mark.lab
def test_seeded_ca_lets_the_first_server_take_a_secure_token(lab_factory, spawn) -> None:
    n1, n2 = lab_factory(2).nodes
    ca_pem, ca_key = new_ca()
    disk.seed_ca(n1.path("/"), ca_pem, ca_key)
    secure = tokens.format_token(ca_pem, PASSWORD)
    first = spawn(n1, Release("cluster-init", token=secure))
    assert first.serving()["ca"] == tokens.ca_hash(ca_pem)
    other = spawn(n2, Release("cluster-init", token=secure))  # its own new CA: not the token's
    assert other.exit_code() == 1
    assert [e["reason"] for e in other.events("refused")] == ["ca_mismatch"]


@pytest.mark.lab
def test_malformed_config_fails_in_one_line_naming_the_file(lab_factory, spawn) -> None:
    (node,) = lab_factory(1).nodes
    config = node.path("/" + k3s.CONFIG)
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("cluster-init: [\n")
    broken = spawn(node, None)
    assert broken.exit_code() == 1
    (failed,) = broken.events("failed")
    assert failed["reason"] == "K3sConfigError"
    assert "/etc/rancher/k3s/config.yaml" in broken.text()
    assert "Traceback" not in broken.text()


@pytest.mark.lab
def test_unreachable_server_fails_after_the_join_timeout(lab_factory, spawn) -> None:
    n1, n2 = lab_factory(2).nodes
    release = Release("join-server", server_url=f"https://{n1.addr}:6443", token=PASSWORD)
    joiner = spawn(n2, release, "server", "--join-timeout", "1")
    assert joiner.exit_code(15) == 1
    assert [e["reason"] for e in joiner.events("refused")] == ["unreachable"]


def _query(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "tests.lab.k3s_standin", *args], cwd=REPO,
        env={"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_query_of_nothing_fails_with_a_reason() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = _query("query", "ca", f"https://127.0.0.1:{port}")
    assert done.returncode == 1 and "did not answer" in done.stderr
    assert _query("--query", "ca", f"https://127.0.0.1:{port}").returncode == 1  # older spelling
    assert _query("query", "nonsense", "https://127.0.0.1:1").returncode == 2
    assert _query().returncode == 2  # a command is required, as k3s's


def test_older_agent_flag_is_the_agent_command() -> None:
    args = cli.build_parser().parse_args(cli._modern(["--agent", "--join-timeout", "3"]))
    assert (args.command, args.join_timeout) == ("agent", 3.0)


@pytest.mark.slow  # in make test-all: make test stays under its time budget
@pytest.mark.lab
def test_db_info_lists_etcd_members_for_the_node_itself_only(lab_factory, spawn) -> None:
    # k3s's /db/info (IsLocalOrHasRole): what the agent asks to admit joiners
    # (agent/cluster/k3s.py local_members), open to local requests, else a server's token.
    n1, n2 = lab_factory(2).nodes
    first = spawn(n1, Release("cluster-init", token=PASSWORD), K3S_STANDIN_LEARNER_TICK="30")
    first.serving()
    ask = (
        "from pathlib import Path; from agent.cluster import k3s; "
        "print(k3s.local_members(Path('/')))"
    )
    assert n1.run(PYTHON, "-c", ask, timeout=10, env=node_env()).stdout.strip() == "(1, 0)"
    second = spawn(n2, join(first))
    wait_for("n2 added as a learner", lambda: first.events("learner_added"), 30)
    assert n1.run(PYTHON, "-c", ask, timeout=10, env=node_env()).stdout.strip() == "(2, 1)"
    remote = (
        "import ssl, urllib.request, urllib.error\n"
        "ctx = ssl._create_unverified_context()\n"
        f"try: urllib.request.urlopen('https://{n1.addr}:6443/db/info', context=ctx, timeout=5)\n"
        "except urllib.error.HTTPError as e: print(e.code)\n"
    )
    assert n2.run(PYTHON, "-c", remote, timeout=10, env=node_env()).stdout.strip() == "401"
    second.serving(timeout=60)
    assert n1.run(PYTHON, "-c", ask, timeout=10, env=node_env()).stdout.strip() == "(2, 0)"
    assert n2.run(PYTHON, "-c", ask, timeout=10, env=node_env()).stdout.strip() == "(2, 0)"
