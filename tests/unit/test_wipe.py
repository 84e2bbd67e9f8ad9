"""`wipe`: the daemon closes its gate, the steps run in order, a failure is one line."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest

from agent import cli, const, killall
from agent import wipe as wipe_module
from agent.cluster import etcd, k3s
from agent.config import load_settings
from agent.daemon.control import DaemonState, request
from agent.daemon.formation import FormationRunner
from agent.daemon.metrics import Metrics
from agent.daemon.netlink import Interface
from agent.log import EventLog, Redactor
from agent.wipe import Step, run_steps, steps


class FakePublisher:
    on_established = None
    on_lost = None
    name = ""

    def set(self, advert: object) -> None:
        pass

    async def run(self) -> None:
        pass

    async def withdraw(self, timeout: float = 1.0) -> bool:
        return True


def _runner(tmp_path: Path, state: DaemonState) -> FormationRunner:
    settings = load_settings(None, {"SUGARKUBE_TOKEN": "lab-token-0123456789"}, root=tmp_path)
    return FormationRunner(
        settings=settings, log=EventLog(io.StringIO(), Redactor(b"salt"), journal=False),
        publisher=FakePublisher(), browse=None,  # type: ignore[arg-type]
        avahi=None, iface=Interface("eth0", 2, "10.0.0.1"), hostname="node1", state=state,
        metrics=Metrics("0", "sugar", "dev"), root=tmp_path,
    )


def test_wipe_closes_the_gate_the_daemon_had_released(tmp_path: Path) -> None:
    async def scenario() -> dict[str, object]:
        state = DaemonState()
        runner = _runner(tmp_path, state)
        runner.released.set()
        await state.update(released=True, release_mode="join-server", leader="node2.local")
        assert await runner.wipe()
        assert not runner.released.is_set()
        return state.snapshot.as_dict()

    snapshot = asyncio.run(scenario())
    assert snapshot["released"] is False and snapshot["release_mode"] == ""
    assert snapshot["phase"] == "wiped"
    assert "restart sugarkube-agent" in str(snapshot["status"])


# --- the steps: order, and one line naming what is left ---------------------------------------


def _step(done: str, left: str, error: Exception | None = None) -> Step:
    async def run() -> str:
        if error is not None:
            raise error
        return f"{done}: ok"

    return Step(done, left, run)


def test_a_failed_step_is_one_line_naming_what_was_done_and_what_is_left() -> None:
    lines: list[str] = []
    ran = [
        _step("closed the gate", "open gate"),
        _step("left etcd", "etcd member"),
        _step("removed k3s state", "k3s state",
              k3s.K3sError("cannot remove /var/lib/rancher/k3s/server/db: Device busy")),
        _step("removed the ballot", "ballot"),
    ]
    failed = asyncio.run(run_steps(ran, lines))
    assert failed == (
        "closed the gate, left etcd; cannot remove /var/lib/rancher/k3s/server/db: Device busy; "
        "left: k3s state, ballot"
    )
    assert lines == ["closed the gate: ok", "left etcd: ok"]  # the ballot step never ran


def test_an_unexpected_error_is_named_by_its_type_and_the_first_step_says_nothing_done() -> None:
    failed = asyncio.run(run_steps([_step("a", "x", KeyError("k")), _step("b", "y")], []))
    assert failed == "nothing done; KeyError: 'k'; left: x, y"
    assert asyncio.run(run_steps([_step("a", "x")], [])) is None


def test_steps_leave_etcd_before_the_killall_work_and_the_state_last(tmp_path: Path) -> None:
    assert [s.done for s in steps(tmp_path)] == [
        "closed the gate", "left etcd", "stopped k3s", "killed containers", "unmounted",
        "deleted CNI links", "filtered the firewall", "removed k3s state", "removed the ballot",
    ]


def test_cli_wipe_failure_is_one_line_exit_1_no_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(root: Path) -> list[Step]:
        return [_step("closed the gate", "open gate"),
                _step("left etcd", "etcd member", etcd.EtcdError("no etcd member answers (x)")),
                _step("stopped k3s", "k3s running")]

    monkeypatch.setattr(wipe_module, "steps", broken)
    monkeypatch.setattr(const, "STATE_DIR", tmp_path)  # the log's salt file
    config = tmp_path / "agent.yaml"
    config.write_text("token: lab-token-0123456789\n")
    config.chmod(0o600)
    code = cli.main(["wipe", "--yes", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 1
    assert err == (
        "sugarkube-agent wipe: closed the gate; no etcd member answers (x); "
        "left: etcd member, k3s running\n"
    )


# --- leaving etcd ------------------------------------------------------------------------------


def _m(member_id: int, name: str, learner: bool = False) -> etcd.Member:
    return etcd.Member(member_id, name, (f"http://10.0.0.{member_id}:2380",),
                       (f"https://10.0.0.{member_id}:2379",), learner)


def test_plan_leave_removes_through_another_voter_else_says_last_or_absent() -> None:
    members = [_m(1, "node1-aa"), _m(2, "node2-bb"), _m(3, "node3-cc", learner=True)]
    plan = etcd.plan_leave(members, "node1-aa")
    assert plan.action == "remove" and plan.own == members[0]
    assert plan.voters == (members[1],)  # a learner neither removes nor confirms
    assert etcd.plan_leave([members[0], members[2]], "node1-aa").action == "last"
    assert etcd.plan_leave(members[1:], "node1-aa").action == "absent"


class FakeEtcd:
    """Members shared by every client URL; URLs in `down` do not answer."""

    def __init__(self, members: list[etcd.Member], down: set[str], refuse: str = "") -> None:
        self.members = members
        self.down = down
        self.refuse = refuse
        self.asked: list[tuple[str, str]] = []

    def client(self, url: str, context: object, timeout: float) -> FakeClient:
        return FakeClient(self, url)


class FakeClient:
    def __init__(self, cluster: FakeEtcd, url: str) -> None:
        self.cluster, self.url = cluster, url

    def _call(self, what: str) -> None:
        self.cluster.asked.append((what, self.url))
        if self.url in self.cluster.down:
            raise etcd.EtcdError(f"{self.url} does not answer (refused)")

    def members(self) -> list[etcd.Member]:
        self._call("list")
        return list(self.cluster.members)

    def remove(self, member_id: int) -> None:
        self._call("remove")
        if self.cluster.refuse:
            raise etcd.EtcdError(f"{self.url} refused: {self.cluster.refuse}")
        self.cluster.members = [m for m in self.cluster.members if m.id != member_id]


def _etcd_node(root: Path, name: str = "node1-aa") -> None:
    (root / etcd.ETCD_DIR / "member/wal").mkdir(parents=True)
    (root / etcd.NAME_FILE).write_text(name + "\n")
    (root / etcd.CONFIG_FILE).write_text(
        "initial-cluster: node2-bb=http://10.0.0.2:2380,node1-aa=http://10.0.0.1:2380\n"
    )


def _fake(monkeypatch: pytest.MonkeyPatch, cluster: FakeEtcd) -> None:
    monkeypatch.setattr(etcd, "Client", cluster.client)
    monkeypatch.setattr(etcd, "client_context", lambda root: None)


def test_leave_has_another_voter_remove_this_member_and_confirm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _etcd_node(tmp_path)
    cluster = FakeEtcd([_m(1, "node1-aa"), _m(2, "node2-bb"), _m(3, "node3-cc")], down=set())
    _fake(monkeypatch, cluster)
    said = etcd.leave(tmp_path)
    assert "member node1-aa removed by node2-bb (2 voting members remain)" in said
    assert [m.name for m in cluster.members] == ["node2-bb", "node3-cc"]
    assert cluster.asked == [("list", etcd.LOCAL), ("remove", "https://10.0.0.2:2379"),
                             ("list", "https://10.0.0.2:2379")]


def test_leave_asks_the_members_it_joined_when_its_own_etcd_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _etcd_node(tmp_path)
    cluster = FakeEtcd([_m(1, "node1-aa"), _m(2, "node2-bb")], down={etcd.LOCAL})
    _fake(monkeypatch, cluster)
    assert "removed by node2-bb (1 voting member remain" in etcd.leave(tmp_path)
    assert cluster.asked[:2] == [("list", etcd.LOCAL), ("list", "https://10.0.0.2:2379")]


def test_leave_fails_in_one_line_when_no_member_answers_or_etcd_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _etcd_node(tmp_path)
    everyone = {etcd.LOCAL, "https://10.0.0.2:2379"}
    _fake(monkeypatch, FakeEtcd([_m(1, "node1-aa"), _m(2, "node2-bb")], down=everyone))
    with pytest.raises(etcd.EtcdError, match=r"^no etcd member answers \(.*\); start k3s"):
        etcd.leave(tmp_path)
    refusal = "etcdserver: re-configuration failed due to not enough started members"
    _fake(monkeypatch, FakeEtcd([_m(1, "node1-aa"), _m(2, "node2-bb")], set(), refusal))
    with pytest.raises(etcd.EtcdError, match=r"etcd refused to remove node1-aa: .*not enough"):
        etcd.leave(tmp_path)


def test_leave_says_when_there_is_nothing_to_leave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "no embedded etcd here" in etcd.leave(tmp_path)
    _etcd_node(tmp_path)
    _fake(monkeypatch, FakeEtcd([_m(1, "node1-aa"), _m(3, "node3-cc", learner=True)], set()))
    assert "last voting member" in etcd.leave(tmp_path)
    _fake(monkeypatch, FakeEtcd([_m(2, "node2-bb")], set()))
    assert "not listed (already removed)" in etcd.leave(tmp_path)


# --- the killall work --------------------------------------------------------------------------


def _proc(root: Path, pid: int | str, ppid: int, argv0: str, mnt: str = "mnt:[1]") -> None:
    entry = root / str(pid)
    entry.mkdir(parents=True)
    (entry / "stat").write_text(f"{pid} (x y) S {ppid} 1 1 0\n")
    (entry / "cmdline").write_bytes(argv0.encode() + b"\0-namespace\0k8s.io\0")
    (entry / "ns").mkdir()
    (entry / "ns" / "mnt").symlink_to(mnt)


def test_shim_trees_are_the_shims_of_k3s_and_their_descendants(tmp_path: Path) -> None:
    shim = "/var/lib/rancher/k3s/data/abc123/bin/containerd-shim-runc-v2"
    _proc(tmp_path, 1, 0, "/sbin/init")
    _proc(tmp_path, 50, 1, "/usr/local/bin/k3s")
    _proc(tmp_path, 100, 1, shim)
    _proc(tmp_path, 101, 100, "/pause")
    _proc(tmp_path, 102, 101, "nginx")
    _proc(tmp_path, 200, 1, "/usr/bin/containerd-shim-runc-v2")  # docker's, not k3s's
    _proc(tmp_path, 300, 1, shim, mnt="mnt:[2]")  # another system's k3s (a container, a lab node)
    _proc(tmp_path, "self", 0, "sugarkube-agent")
    assert killall.shim_trees(tmp_path) == [100, 101, 102]


def test_k3s_mounts_deepest_first_and_never_the_state_mount_itself(tmp_path: Path) -> None:
    lines = [f"{i} 1 0:{i} / {p} rw - tmpfs tmpfs rw" for i, p in enumerate([
        "/", "/var/lib/rancher/k3s", "/run/k3s/containerd/io.containerd.runtime.v2.task/k8s.io/a/"
        "rootfs", "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~projected/kube-api-access-x",
        "/run/netns/cni-1234", "/run/netns/other", "/var/lib/rancher/k3s/agent/x\\040y/shm",
        "/run/k3sother",
    ])]
    (tmp_path / k3s.MOUNTINFO).parent.mkdir(parents=True)
    (tmp_path / k3s.MOUNTINFO).write_text("\n".join(lines) + "\n")
    found = [p.relative_to(tmp_path).as_posix() for p in killall.k3s_mounts(tmp_path)]
    assert found == [
        "var/lib/kubelet/pods/u1/volumes/kubernetes.io~projected/kube-api-access-x",
        "var/lib/rancher/k3s/agent/x y/shm",
        "run/k3s/containerd/io.containerd.runtime.v2.task/k8s.io/a/rootfs",
        "run/netns/cni-1234",
    ]
    unmounted: list[Path] = []
    assert killall.unmount_all(tmp_path, unmounted.append) == "mounts: unmounted 4"
    assert [p.name for p in unmounted] == ["kube-api-access-x", "shm", "rootfs", "cni-1234"]

    def busy(point: Path) -> None:
        raise killall.KillallError(f"cannot unmount {point}: target is busy")

    with pytest.raises(killall.KillallError, match="kube-api-access-x: target is busy"):
        killall.unmount_all(tmp_path, busy)


def test_leave_retries_while_etcd_calls_the_cluster_unhealthy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _etcd_node(tmp_path)
    unhealthy = "etcdserver: unhealthy cluster"
    cluster = FakeEtcd([_m(1, "node1-aa"), _m(2, "node2-bb")], set(), unhealthy)
    _fake(monkeypatch, cluster)
    monkeypatch.setattr(etcd.time, "sleep", lambda s: setattr(cluster, "refuse", ""))
    assert "member node1-aa removed by node2-bb" in etcd.leave(tmp_path)
    assert [what for what, _ in cluster.asked] == ["list", "remove", "remove", "list"]


def _systemctl(tmp_path: Path, units: dict[str, str], stop_rc: int = 0) -> tuple[str, Path]:
    """A systemctl that knows UNITS (name -> LoadState) and records its calls."""
    calls = tmp_path / "calls"
    script = tmp_path / "systemctl"
    cases = "".join(f'    {u}) echo {state};;\n' for u, state in units.items())
    script.write_text(
        f'#!/bin/sh\necho "$*" >> {calls}\n'
        f'if [ "$1" = show ]; then\n  case "$4" in\n{cases}    *) echo not-found;;\n  esac\n'
        f'  exit 0\nfi\necho "Job for k3s.service failed." >&2\nexit {stop_rc}\n'
    )
    script.chmod(0o755)
    return str(script), calls


def test_stop_units_stops_only_the_k3s_units_installed(tmp_path: Path) -> None:
    systemctl, calls = _systemctl(tmp_path, {"k3s-agent.service": "loaded"})
    assert killall.stop_units(systemctl, booted=True) == "k3s: stopped k3s-agent.service"
    assert calls.read_text().splitlines()[-1] == "stop k3s-agent.service"
    assert killall.stop_units(systemctl, booted=False).endswith("(systemd is not running here)")
    (tmp_path / "bare").mkdir()
    bare, _ = _systemctl(tmp_path / "bare", {})
    assert killall.stop_units(bare, booted=True) == "k3s: no k3s units installed"


def test_stop_units_failure_is_systemctls_last_line(tmp_path: Path) -> None:
    systemctl, _ = _systemctl(tmp_path, {"k3s.service": "loaded"}, stop_rc=1)
    with pytest.raises(killall.KillallError,
                       match=r"^systemctl stop k3s.service failed: Job for k3s.service failed\.$"):
        killall.stop_units(systemctl, booted=True)


SAVED = """# Generated by iptables-save v1.8.9 (nf_tables)
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:KUBE-FORWARD - [0:0]
:FLANNEL-FWD - [0:0]
:OPERATOR - [0:0]
-A FORWARD -m comment --comment "kubernetes forwarding rules" -j KUBE-FORWARD
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FORWARD -j OPERATOR
-A OPERATOR -s 192.168.1.0/24 -j ACCEPT
-A FLANNEL-FWD -s 10.42.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
-A INPUT -j CNI-HOSTPORT-DNAT
COMMIT
"""


def test_filtered_rules_drop_what_k3s_killall_drops_and_keep_the_operators() -> None:
    kept = killall.filtered_rules(SAVED)
    assert kept.splitlines() == [
        "# Generated by iptables-save v1.8.9 (nf_tables)", "*filter", ":INPUT ACCEPT [0:0]",
        ":FORWARD DROP [0:0]", ":OPERATOR - [0:0]", "-A FORWARD -j OPERATOR",
        "-A OPERATOR -s 192.168.1.0/24 -j ACCEPT", "COMMIT",
    ]


def test_filter_firewall_restores_the_filtered_rules_with_k3s_bundled_iptables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no system iptables
    aux = tmp_path / killall.K3S_AUX
    aux.mkdir(parents=True)
    (tmp_path / "saved").write_text(SAVED)
    for family in ("iptables", "ip6tables"):
        (aux / f"{family}-save").write_text(f"#!/bin/sh\n/bin/cat {tmp_path}/saved\n")
        (aux / f"{family}-restore").write_text(
            f"#!/bin/sh\n/bin/cat > {tmp_path}/{family}.restored\n"
        )
        for tool in ("save", "restore"):
            (aux / f"{family}-{tool}").chmod(0o755)
    said = killall.filter_firewall(tmp_path)
    assert said == "firewall: removed k3s's rules (iptables 6 lines, ip6tables 6 lines)"
    assert (tmp_path / "iptables.restored").read_text() == killall.filtered_rules(SAVED)
    failing = "#!/bin/sh\necho 'iptables-restore: line 3 failed' >&2\nexit 1\n"
    (aux / "iptables-restore").write_text(failing)
    with pytest.raises(
        killall.KillallError,
        match=r"^cannot filter k3s's iptables rules: iptables-restore: line 3 failed$",
    ):
        killall.filter_firewall(tmp_path)
    assert killall.filter_firewall(tmp_path / "nothing") == "firewall: no rules of k3s's"


def test_a_daemon_that_does_not_say_it_closed_its_gate_fails_the_first_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def scenario(answer: bytes) -> tuple[list[str], str | None]:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(answer)
            await writer.drain()
            writer.close()

        sock = tmp_path / "agent.sock"
        server = await asyncio.start_unix_server(serve, path=str(sock))
        monkeypatch.setattr(wipe_module, "request", lambda cmd: request(cmd, sock))
        lines: list[str] = []
        async with server:
            failed = await run_steps(steps(tmp_path)[:1], lines)
        return lines, failed

    lines, failed = asyncio.run(scenario(b'{"error": "unknown command \'wipe\'"}\n'))
    assert failed is not None
    assert failed.startswith("nothing done; the daemon did not close its gate")
    assert failed.endswith("; left: open gate and adverts (if the daemon runs)")
    lines, failed = asyncio.run(scenario(b'{"withdrawn": true}\n'))
    assert failed is None and lines == [
        "gate: closed by the daemon; adverts withdrawn (goodbye packets sent)"
    ]
