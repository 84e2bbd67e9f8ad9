"""The lab's k3s stand-in on loopback: bootstrap, join as k3s does, refuse as k3s does.

Real processes on free ports, each in its own temporary root, configured through our real
drop-in writer; no lab needed.
"""

from __future__ import annotations

import hashlib
import json
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

from agent.cluster import k3s
from agent.cluster.k3s import Membership, Release, membership, parse_token, write_dropin
from tests.lab import k3s_standin

REPO = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"
START_TIMEOUT = 20.0  # s; importing cryptography and making a CA takes well under 1 s
PASSWORD = "lab-password-0123"
_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def events(log: Path, name: str, offset: int = 0) -> list[dict[str, str]]:
    """Every `event=NAME` line of a stand-in's log from OFFSET on, as key=value dicts."""
    found = []
    text = log.read_bytes()[offset:].decode(errors="replace") if log.exists() else ""
    for line in text.splitlines():
        fields = {k: v.strip('"') for k, v in _PAIR.findall(line)}
        if fields.get("event") == name:
            found.append(fields)
    return found


class StandIn:
    """One stand-in process on 127.0.0.1 and a free port, its stderr in ROOT/standin.log."""

    def __init__(self, root: Path, name: str, *extra: str) -> None:
        self.root, self.name = root, name
        self.log = root / "standin.log"
        self.offset = self.log.stat().st_size if self.log.exists() else 0  # earlier runs' lines
        argv = [
            PYTHON, "-m", "tests.lab.k3s_standin", "--root", str(root), "--bind", "127.0.0.1",
            "--port", "0", "--name", name, "--join-timeout", "5", *extra,
        ]  # fmt: skip
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO), "LANG": "C.UTF-8"}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
            )  # fmt: skip

    def events(self, name: str) -> list[dict[str, str]]:
        return events(self.log, name, self.offset)

    def wait(self, what: str, probe: Callable[[], object], timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not probe():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {what} within {timeout:g} s:\n{self.text()}")
            time.sleep(0.05)

    def serving(self) -> dict[str, str]:
        """Wait for the serving line; fail at once if the process exited instead."""
        self.wait("serving", lambda: self.events("serving") or self.proc.poll() is not None)
        assert self.proc.poll() is None, f"{self.name} exited:\n{self.text()}"
        return self.events("serving")[-1]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.serving()['port']}"

    def exit_code(self, timeout: float = START_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still runs:\n{self.text()}") from None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.exit_code(10)

    def text(self) -> str:
        return self.log.read_bytes()[self.offset :].decode(errors="replace")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., StandIn]]:
    """Start stand-ins, each in tmp_path/NAME configured by RELEASE; all killed by PID after."""
    started: list[StandIn] = []

    def start(name: str, release: Release | None, *extra: str) -> StandIn:
        root = tmp_path / name
        root.mkdir(exist_ok=True)
        if release is not None:
            write_dropin(root, release)
        standin = StandIn(root, name, *extra)
        started.append(standin)
        return standin

    yield start
    for standin in started:
        if standin.proc.poll() is None:
            os.killpg(standin.proc.pid, signal.SIGKILL)
            standin.proc.wait(10)


def query(what: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "tests.lab.k3s_standin", "--query", what, url],
        cwd=REPO, env={"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip


def state_ca(root: Path) -> str:
    """sha256 of the CA this root's k3s state holds, server or agent."""
    path = root / (
        k3s_standin.CA_CERT if membership(root) is Membership.SERVER else k3s_standin.AGENT_CA
    )
    return hashlib.sha256(path.read_bytes()).hexdigest()


def server_token(root: Path) -> str:
    return (root / k3s_standin.SERVER_TOKEN).read_text()


def join(url: str, token: str, mode: k3s.Mode = "join-server") -> Release:
    return Release(mode, server_url=url, token=token)


def test_cluster_init_serves_its_ca_and_writes_a_secure_token(
    spawn: Callable[..., StandIn],
) -> None:
    node = spawn("n1", Release("cluster-init", token=PASSWORD))
    serving = node.serving()
    assert [e["datastore"] for e in node.events("bootstrapped")] == ["etcd"]
    ca = state_ca(node.root)
    assert serving["ca"] == ca
    assert query("ca", node.url).stdout.strip() == ca
    assert query("ping", node.url).stdout == "pong"
    cacerts = query("cacerts", node.url).stdout.encode()
    assert hashlib.sha256(cacerts).hexdigest() == ca
    token = parse_token(server_token(node.root))
    assert (token.ca_hash, token.user, token.password) == (ca, "server", PASSWORD)
    assert stat.S_IMODE(os.stat(node.root / k3s_standin.SERVER_TOKEN).st_mode) == 0o600
    assert membership(node.root) is Membership.SERVER
    assert (node.root / k3s.SERVER_DB / "etcd").is_dir()
    assert node.stop() == 0
    assert node.events("stopped")


def test_server_and_agent_join_the_same_ca(spawn: Callable[..., StandIn]) -> None:
    first = spawn("n1", Release("cluster-init", token=PASSWORD))
    second = spawn("n2", join(first.url, server_token(first.root)))
    assert second.serving()["ca"] == first.serving()["ca"]
    # An agent with the short token (password only) trusts what it is served, as k3s does.
    agent = spawn("n3", join(second.url, PASSWORD, "join-agent"), "--agent")
    agent.wait("joined", lambda: agent.events("joined"))
    assert membership(agent.root) is Membership.AGENT
    assert state_ca(first.root) == state_ca(second.root) == state_ca(agent.root)
    assert query("ca", second.url).stdout.strip() == state_ca(first.root)
    assert not agent.events("serving")
    # n3 joined through n2; n2 shares the news with n1, so either can be asked.
    first.wait("members synced", lambda: first.events("members_synced"))
    for server in (first, second):
        members = json.loads(query("members", server.url).stdout)["members"]
        assert {n: m["role"] for n, m in members.items()} == {
            "n1": "server", "n2": "server", "n3": "agent",
        }  # fmt: skip
        assert [n for n, m in members.items() if m.get("bootstrap")] == ["n1"]
    assert agent.stop() == 0


def test_wrong_password_is_refused(spawn: Callable[..., StandIn]) -> None:
    first = spawn("n1", Release("cluster-init", token=PASSWORD))
    ca = first.serving()["ca"]
    joiner = spawn("n2", join(first.url, f"K10{ca}::server:not-the-password"))
    assert joiner.exit_code() == 1
    assert [e["reason"] for e in joiner.events("refused")] == ["unauthorized"]
    assert [e["reason"] for e in first.events("join_rejected")] == ["unauthorized"]
    assert membership(joiner.root) is Membership.NONE
    assert "not-the-password" not in joiner.text() + first.text()


def test_ca_mismatch_is_refused_before_the_password_is_sent(
    spawn: Callable[..., StandIn],
) -> None:
    first = spawn("n1", Release("cluster-init", token=PASSWORD))
    first.serving()
    joiner = spawn("n2", join(first.url, f"K10{'0' * 64}::server:{PASSWORD}"))
    assert joiner.exit_code() == 1
    assert [e["reason"] for e in joiner.events("refused")] == ["ca_mismatch"]
    assert not joiner.events("join_request")
    # The server never saw a join: neither accepted nor rejected.
    assert not first.events("join_accepted") and not first.events("join_rejected")
    assert membership(joiner.root) is Membership.NONE


def test_single_server_takes_agents_but_no_servers(spawn: Callable[..., StandIn]) -> None:
    single = spawn("n1", Release("single"))
    assert single.serving()["datastore"] == "sqlite"
    assert (single.root / k3s.SERVER_DB / "state.db").is_file()
    token = parse_token(server_token(single.root))  # no token configured: a random password
    assert token.secure() and len(token.password) == 32
    server = spawn("n2", join(single.url, server_token(single.root)))
    assert server.exit_code() == 1
    assert [e["reason"] for e in server.events("refused")] == ["join_failed"]
    agent = spawn("n3", join(single.url, server_token(single.root), "join-agent"), "--agent")
    agent.wait("joined", lambda: agent.events("joined"))
    assert state_ca(agent.root) == state_ca(single.root)


def test_restart_serves_the_same_cluster_without_joining(spawn: Callable[..., StandIn]) -> None:
    first = spawn("n1", Release("cluster-init", token=PASSWORD))
    ca = first.serving()["ca"]
    assert first.stop() == 0
    again = spawn("n1", None)
    assert again.serving()["ca"] == ca
    assert [e["ca"] for e in again.events("restarted")] == [ca]
    assert not again.events("bootstrapped")


def test_seeded_ca_lets_the_first_server_take_a_secure_token(
    spawn: Callable[..., StandIn], tmp_path: Path
) -> None:
    ca_pem, ca_key = k3s_standin.new_ca()
    root = tmp_path / "n1"
    k3s_standin.seed_ca(root, ca_pem, ca_key)
    secure = k3s.format_token(ca_pem, PASSWORD)
    first = spawn("n1", Release("cluster-init", token=secure))
    assert first.serving()["ca"] == k3s.ca_hash(ca_pem)
    other = spawn("n2", Release("cluster-init", token=secure))  # its own new CA: not the token's
    assert other.exit_code() == 1
    assert [e["reason"] for e in other.events("refused")] == ["ca_mismatch"]


def test_malformed_config_fails_in_one_line_naming_the_file(
    spawn: Callable[..., StandIn], tmp_path: Path
) -> None:
    config = tmp_path / "n1" / k3s.CONFIG
    config.parent.mkdir(parents=True)
    config.write_text("cluster-init: [\n")
    node = spawn("n1", None)
    assert node.exit_code() == 1
    (failed,) = node.events("failed")
    assert failed["reason"] == "K3sConfigError"
    assert str(config) in node.text()
    assert "Traceback" not in node.text()


def test_unreachable_server_fails_after_the_join_timeout(spawn: Callable[..., StandIn]) -> None:
    joiner = spawn("n2", join(f"https://127.0.0.1:{_free_port()}", PASSWORD), "--join-timeout", "1")
    assert joiner.exit_code() == 1
    assert [e["reason"] for e in joiner.events("refused")] == ["unreachable"]


def test_query_of_nothing_fails_with_a_reason() -> None:
    done = query("ca", f"https://127.0.0.1:{_free_port()}")
    assert done.returncode == 1
    assert "did not answer" in done.stderr
    assert query("nonsense", "https://127.0.0.1:1").returncode == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
