"""The probe: the bounded tool runner and reads under a fake root."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent import const
from agent.verify.probe import SYSTEM_PATH, Probe, run_command
from agent.verify.result import CheckFailed, Unavailable
from tests.unit.test_verify_fakes import FakeNode

ENV = {"PATH": "/usr/bin:/bin"}


def test_run_command_returns_exit_code_and_both_streams() -> None:
    result = run_command(
        ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], timeout=5, env=ENV, cap=1024
    )
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    assert not result.ok and not result.timed_out and not result.truncated
    assert result.first_line() == "err"


def test_run_command_keeps_only_the_cap_but_reads_to_the_end() -> None:
    started = time.monotonic()
    result = run_command(
        ["/bin/sh", "-c", "head -c 10485760 /dev/zero | tr '\\0' x; echo done >&2"],
        timeout=20,
        env=ENV,
        cap=4096,
    )
    assert time.monotonic() - started < 15
    assert result.ok and result.truncated
    assert result.stdout == "x" * 4096
    assert result.stderr == "done\n"


def test_run_command_kills_the_whole_group_at_the_deadline(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    script = f"(/bin/sleep 2; touch {marker}) & /bin/sleep 30"
    started = time.monotonic()
    result = run_command(["/bin/sh", "-c", script], timeout=0.3, env=ENV, cap=1024)
    assert time.monotonic() - started < 3
    assert result.timed_out and result.returncode is None
    assert result.first_line() == "timed out"
    time.sleep(2.5)
    assert not marker.exists(), "a grandchild outlived the deadline"


def test_a_tool_that_exits_but_leaves_a_child_holding_the_pipe_is_bounded() -> None:
    started = time.monotonic()
    result = run_command(
        ["/bin/sh", "-c", "echo early; /bin/sleep 30 &"], timeout=0.5, env=ENV, cap=1024
    )
    assert time.monotonic() - started < 3
    assert result.stdout == "early\n"
    assert result.timed_out


def test_run_command_gives_the_tool_only_the_environment_it_is_handed() -> None:
    result = run_command(["/usr/bin/env"], timeout=5, env={"PATH": "/x", "LC_ALL": "C"}, cap=4096)
    assert sorted(result.stdout.split()) == ["LC_ALL=C", "PATH=/x"]


def test_undecodable_output_is_replaced_not_raised() -> None:
    result = run_command(["/bin/sh", "-c", "printf '\\377\\376ok'"], timeout=5, env=ENV, cap=64)
    assert result.stdout == "\ufffd\ufffdok"


def test_probe_run_finds_tools_on_its_path_only(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    node.tool("hello", 'echo "$LC_ALL $PATH"')
    assert node.probe().run("hello").stdout == f"C {node.bin}\n"
    with pytest.raises(Unavailable, match="ls not found on PATH"):
        node.probe().run("ls")


def test_probe_run_turns_a_timeout_into_a_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(const, "VERIFY_KILL_GRACE", 0.2)
    node = FakeNode(tmp_path)
    node.tool("slow", "exec /bin/sleep 30")
    with pytest.raises(CheckFailed, match=r"`slow a b` did not finish within 0\.2 s"):
        node.probe().run("slow", "a", "b", "c", timeout=0.2)


def test_a_tool_that_cannot_execute_is_a_fail(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    broken = node.bin / "broken"
    broken.write_bytes(b"\x7fELF garbage")
    broken.chmod(0o755)
    with pytest.raises(CheckFailed, match=r"cannot run .*broken"):
        node.probe().run("broken")


def test_the_runner_is_injectable(tmp_path: Path) -> None:
    seen = []

    def runner(argv, *, timeout, env, cap):  # type: ignore[no-untyped-def]
        seen.append((list(argv), timeout, env["LC_ALL"], cap))
        return run_command(["/bin/true"], timeout=timeout, env=env, cap=cap)

    node = FakeNode(tmp_path)
    node.tool("tool", "exit 0")
    assert node.probe(runner=runner).run("tool", "x", timeout=1.5, cap=7).ok
    assert seen == [([str(node.bin / "tool"), "x"], 1.5, "C", 7)]


def test_reads_under_the_root(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    node.write("/etc/thing", "hello\n")
    probe = node.probe()
    assert probe.read("/etc/thing") == "hello\n"
    assert probe.read_optional("/etc/none") is None
    assert probe.read_optional("/etc/thing/below") is None
    with pytest.raises(Unavailable, match="/etc/none does not exist"):
        probe.read("/etc/none")
    node.unreadable("/etc/loop")
    with pytest.raises(Unavailable, match="cannot read /etc/loop"):
        probe.read_optional("/etc/loop")
    (node.root / "etc/dir").mkdir()
    with pytest.raises(Unavailable, match="cannot read /etc/dir: not a regular file"):
        probe.read("/etc/dir")
    os.mkfifo(node.root / "etc/fifo")  # must not block the open
    with pytest.raises(Unavailable, match="cannot read /etc/fifo: not a regular file"):
        probe.read("/etc/fifo")


def test_reads_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(const, "VERIFY_FILE_CAP", 100_000)
    node = FakeNode(tmp_path)
    node.write("/big", "y" * 1_000_000)
    assert len(node.probe().read("/big")) == 100_000


def test_proc_sys_files_are_readable_despite_their_read_size_limit() -> None:
    assert Probe().read("/proc/sys/kernel/ostype") == "Linux\n"


@pytest.mark.parametrize("name", ["", "  \n", "bad name", "tab\tname", "\x00"])
def test_an_unusable_host_name_is_unavailable(tmp_path: Path, name: str) -> None:
    node = FakeNode(tmp_path)
    node.write("/proc/sys/kernel/hostname", name)
    with pytest.raises(Unavailable):
        node.probe().host()


def test_the_host_name_is_normalised(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    node.write("/proc/sys/kernel/hostname", "Node1.local.\n")
    assert node.probe().host() == "node1"
    assert node.probe(hostname="PI-5").host() == "pi-5"


def test_the_system_probe_adds_the_sbin_dirs_to_the_callers_path() -> None:
    probe = Probe.system({"PATH": "/opt/bin:/usr/bin", "KUBECONFIG": "/k"})
    dirs = probe.path.split(":")
    assert dirs[:2] == ["/opt/bin", "/usr/bin"]
    assert set(SYSTEM_PATH.split(":")) <= set(dirs)
    assert dirs.count("/usr/bin") == 1
    assert probe.env["KUBECONFIG"] == "/k"
    assert probe.root == Path("/")


def test_the_system_probe_reads_the_real_environment_by_default() -> None:
    assert Probe.system().env.get("PATH") == os.environ.get("PATH")
