"""Operator checks from checks.d: exit codes, timeouts, output caps and broken files."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import const
from agent.verify import checks, plugins
from agent.verify.probe import Probe
from agent.verify.result import CheckResult, Status
from tests.unit.test_verify_fakes import FakeNode

CHECKS_D = "/etc/sugarkube/checks.d"
EXAMPLE = Path(__file__).resolve().parents[2] / "etc/checks.d/example.yaml.disabled"


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    """A healthy fake node."""
    return FakeNode(tmp_path).healthy()


def plugin(node: FakeNode, file: str, text: str | bytes) -> None:
    node.write(f"{CHECKS_D}/{file}", text)


def operator_results(node: FakeNode) -> list[CheckResult]:
    """The results after the built-in checks: the operator checks, in file-name order."""
    return checks.run_checks(node.probe())[len(checks.BUILTIN_CHECKS) :]


@pytest.mark.parametrize(
    ("script", "status", "detail"),
    [
        ("echo 'all good'; exit 0", Status.PASS, "all good"),
        ("echo 'disk at 97%'; exit 1", Status.FAIL, "exit 1: disk at 97%"),
        ("echo 'no disk to check' >&2; exit 2", Status.SKIP, "no disk to check"),
        ("exit 7", Status.FAIL, "exit 7"),
        ("exit 0", Status.PASS, "exit 0"),
        ("kill -9 $$", Status.FAIL, "killed by signal 9"),
    ],
)
def test_the_exit_code_is_the_verdict(
    node: FakeNode, script: str, status: Status, detail: str
) -> None:
    node.tool("check-disk", script)
    plugin(node, "disk.yaml", "name: disk_space\ncommand: check-disk\n")
    assert operator_results(node) == [CheckResult("disk_space", status, detail)]


def test_exit_codes_can_be_remapped(node: FakeNode) -> None:
    node.tool("probe-fan", "echo spinning; exit 3")
    plugin(
        node,
        "fan.yaml",
        "name: fan\ncommand: [probe-fan, --rpm]\nexit_codes: {3: pass, 0: skip}\n",
    )
    assert operator_results(node) == [CheckResult("fan", Status.PASS, "spinning")]


def test_the_command_gets_its_arguments_unsplit(node: FakeNode, tmp_path: Path) -> None:
    seen = tmp_path / "argv"
    node.tool("args", f'for a in "$@"; do echo "[$a]"; done > {seen}')
    plugin(node, "a.yaml", "name: args\ncommand: ['args', 'two words', 3]\n")
    operator_results(node)
    assert seen.read_text() == "[two words]\n[3]\n"
    plugin(node, "a.yaml", "name: args\ncommand: args \"two words\" 'x y'\n")
    operator_results(node)
    assert seen.read_text() == "[two words]\n[x y]\n"


def test_a_hanging_plugin_is_killed_at_its_timeout(node: FakeNode) -> None:
    node.tool("hang", "/bin/sleep 60 & exec /bin/sleep 60")
    plugin(node, "hang.yaml", "name: hang\ncommand: hang\ntimeout: 0.5\n")
    started = time.monotonic()
    results = operator_results(node)
    assert time.monotonic() - started < 5
    assert results == [CheckResult("hang", Status.FAIL, "timed out after 0.5 s and was killed")]


def marked(marker: str) -> list[int]:
    """The processes whose command line holds `marker` (only this test's escapees do)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture
def marker() -> Iterator[str]:
    """A sleep duration no other process uses (60 s and some), as a mark on escapees; any
    left at the end are killed, by the PIDs the mark finds."""
    mark = f"60.{random.randrange(10**8, 10**9)}"
    yield mark
    for pid in marked(mark):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# The plugins' PATH is the fake node's bin: the tools they use are named in full.
ESCAPES = (
    "/usr/bin/setsid /bin/sleep {m} &\n"  # a new session and process group
    "(/bin/sleep {m} & ) &\n"  # a double fork: the sleep is an orphan at once
    "/usr/bin/setsid /bin/sh -c '/bin/sleep {m} & exit' </dev/null >/dev/null 2>&1 &\n"  # both
)


def test_nothing_a_plugin_starts_outlives_it(node: FakeNode, marker: str) -> None:
    node.tool("escape", ESCAPES.format(m=marker) + "/bin/sleep 0.3; echo started 3; exit 0")
    plugin(node, "escape.yaml", "name: escape\ncommand: escape\ntimeout: 5\n")
    started = time.monotonic()
    results = operator_results(node)
    elapsed = time.monotonic() - started
    assert results == [CheckResult("escape", Status.PASS, "started 3")]
    assert marked(marker) == []
    assert elapsed < 4  # it ended when the plugin did, not at its timeout


def test_nothing_a_plugin_starts_outlives_its_timeout(node: FakeNode, marker: str) -> None:
    node.tool("escape", ESCAPES.format(m=marker) + f"exec /bin/sleep {marker}")
    plugin(node, "escape.yaml", "name: escape\ncommand: escape\ntimeout: 0.5\n")
    started = time.monotonic()
    results = operator_results(node)
    assert time.monotonic() - started < 5
    assert results == [CheckResult("escape", Status.FAIL, "timed out after 0.5 s and was killed")]
    assert marked(marker) == []


@pytest.mark.parametrize(
    ("unsafe", "reason"),
    [
        ("file-owner", "the file is owned by uid 1000, not root"),
        ("file-group", "the file is writable by group (mode 0664)"),
        ("file-world", "the file is writable by others (mode 0646)"),
        ("dir-world", "checks.d is writable by group and others (mode 1777)"),
        ("dir-owner", "its directory /etc/sugarkube/checks.d is owned by uid 1000, not root"),
        ("command-world", "command {bin}/ran is writable by others (mode 0757)"),
        ("command-dir-group", "directory of command {bin}/ran is writable by group (mode 0775)"),
    ],
)
def test_a_plugin_root_does_not_alone_control_is_refused_and_not_run(
    node: FakeNode, tmp_path: Path, unsafe: str, reason: str
) -> None:
    ran = tmp_path / "it-ran"
    tool = node.tool("ran", f"touch {ran}")
    plugin(node, "ran.yaml", "name: ran\ncommand: ran\n")
    file = node.root / CHECKS_D.lstrip("/") / "ran.yaml"
    change = {
        "file-owner": lambda: os.chown(file, 1000, 1000),
        "file-group": lambda: file.chmod(0o664),
        "file-world": lambda: file.chmod(0o646),
        "dir-world": lambda: file.parent.chmod(0o1777),
        "dir-owner": lambda: os.chown(file.parent, 1000, 0),
        "command-world": lambda: tool.chmod(0o757),
        "command-dir-group": lambda: node.bin.chmod(0o775),
    }
    change[unsafe]()
    [result] = operator_results(node)
    assert result.status is Status.FAIL
    assert reason.format(bin=node.bin) in result.detail
    assert "refused, not run" in result.detail
    assert "\n" not in result.detail
    assert not ran.exists()


def test_a_plugin_printing_10_mb_is_capped(node: FakeNode) -> None:
    node.tool(
        "chatty",
        "echo first line; head -c 10485760 /dev/zero; exit 0".replace("head", "/usr/bin/head"),
    )
    plugin(node, "chatty.yaml", "name: chatty\ncommand: chatty\n")
    started = time.monotonic()
    [result] = operator_results(node)
    assert time.monotonic() - started < 15
    assert result.status is Status.PASS
    assert result.detail == f"first line (output beyond {const.VERIFY_OUTPUT_CAP} bytes discarded)"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("name: [unclosed\n", "not valid YAML"),
        ("just a string\n", "not a YAML mapping"),
        ("", "not a YAML mapping"),
        ("name: ok\n", "no command"),
        ("name: ok\ncommand: []\n", "command is empty"),
        ("name: ok\ncommand: {a: b}\n", "command must be a string or a list"),
        ("name: ok\ncommand: 'unterminated \"quote'\n", "command: No closing quotation"),
        ("name: ok\ncommand: ./relative\n", "must be an absolute path or a name on PATH"),
        ("name: 'bad name!'\ncommand: x\n", "name must match"),
        ("name: ok\ncommand: x\ntimeout: 0\n", "timeout must be a number of seconds"),
        ("name: ok\ncommand: x\ntimeout: 1000\n", "timeout must be a number of seconds"),
        ("name: ok\ncommand: x\ntimeout: soon\n", "timeout must be a number of seconds"),
        ("name: ok\ncommand: x\ntimeout: true\n", "timeout must be a number of seconds"),
        ("name: ok\ncommand: x\nexit_codes: {0: great}\n", "'great' is not pass, fail or skip"),
        ("name: ok\ncommand: x\nexit_codes: {300: pass}\n", "300 is not an exit code"),
        ("name: ok\ncommand: x\nexit_codes: [0]\n", "exit_codes must map"),
        ("name: ok\ncommand: x\ntimout: 5\n", "unknown key 'timout'"),
        ("!!python/object/apply:os.system ['touch /tmp/pwned']\n", "not valid YAML"),
    ],
)
def test_a_broken_file_is_a_fail_named_after_it(node: FakeNode, text: str, reason: str) -> None:
    plugin(node, "my check.yaml", text)
    [result] = operator_results(node)
    assert (result.name, result.status) == ("my_check", Status.FAIL)
    assert result.detail.startswith("my check.yaml: ")
    assert reason in result.detail


def test_undecodable_huge_and_special_files_are_broken_plugins(node: FakeNode) -> None:
    plugin(node, "a-binary.yaml", b"name: x\ncommand: \xff\xfe\n")
    plugin(
        node, "b-huge.yaml", "name: huge\ncommand: x\n#" + "y" * (const.VERIFY_PLUGIN_FILE_CAP + 10)
    )
    os.mkfifo(node.root / CHECKS_D.lstrip("/") / "c-fifo.yaml")  # opening it must not block
    (node.root / CHECKS_D.lstrip("/") / "d-dir.yaml").mkdir()
    node.unreadable(f"{CHECKS_D}/e-loop.yaml")
    details = {r.name: r.detail for r in operator_results(node)}
    assert details == {
        "a-binary": "a-binary.yaml: not UTF-8 text",
        "b-huge": f"b-huge.yaml: larger than {const.VERIFY_PLUGIN_FILE_CAP} bytes",
        "c-fifo": "c-fifo.yaml: not a regular file",
        "d-dir": "d-dir.yaml: not a regular file",
        "e-loop": "e-loop.yaml: cannot read: Too many levels of symbolic links",
    }


def test_a_missing_command_is_a_fail(node: FakeNode) -> None:
    plugin(node, "a.yaml", "name: a\ncommand: no-such-tool\n")
    plugin(node, "b.yaml", "name: b\ncommand: /no/such/tool\n")
    assert [r.detail for r in operator_results(node)] == [
        "command 'no-such-tool' not found or not executable",
        "command '/no/such/tool' not found or not executable",
    ]


def test_names_never_collide(node: FakeNode) -> None:
    node.tool("ok", "echo fine")
    plugin(node, "10-first.yaml", "name: same\ncommand: ok\n")
    plugin(node, "20-second.yaml", "name: same\ncommand: ok\n")
    plugin(node, "30-builtin.yaml", "name: swap_off\ncommand: ok\n")
    plugin(node, "swap_off.yaml", "name: [broken\n")
    results = checks.run_checks(node.probe())
    names = [r.name for r in results]
    assert len(names) == len(set(names))
    assert [(r.name, r.status) for r in results[len(checks.BUILTIN_CHECKS) :]] == [
        ("same", Status.PASS),
        ("20-second", Status.FAIL),
        ("30-builtin", Status.FAIL),
        ("swap_off-2", Status.FAIL),
    ]


def test_only_visible_yaml_files_count_in_name_order(node: FakeNode) -> None:
    node.tool("ok", "echo fine")
    for file in ("b.yaml", "a.yaml", ".hidden.yaml", "c.yaml.disabled", "d.yml", "e.yaml~"):
        plugin(node, file, f"name: {file[0]}{len(file)}\ncommand: ok\n")
    assert [r.name for r in operator_results(node)] == ["a6", "b6"]


def test_no_checks_d_directory_means_no_operator_checks(node: FakeNode) -> None:
    assert operator_results(node) == []
    node.write(CHECKS_D, "a file where the directory should be")
    assert operator_results(node) == []


def test_an_unlistable_checks_d_is_one_fail(node: FakeNode) -> None:
    node.unreadable(CHECKS_D)
    [result] = operator_results(node)
    assert (result.name, result.status) == ("checks.d", Status.FAIL)
    assert "cannot list /etc/sugarkube/checks.d" in result.detail


def test_bad_plugins_leave_the_built_in_checks_alone(node: FakeNode) -> None:
    node.tool("hang", "exec /bin/sleep 60")
    plugin(node, "hang.yaml", "name: hang\ncommand: hang\ntimeout: 0.3\n")
    plugin(node, "broken.yaml", ":\n- [")
    results = checks.run_checks(node.probe())
    assert [r.status for r in results[: len(checks.BUILTIN_CHECKS)]] == [Status.PASS] * len(
        checks.BUILTIN_CHECKS
    )
    assert [r.status for r in results[len(checks.BUILTIN_CHECKS) :]] == [Status.FAIL] * 2


def test_the_shipped_example_parses_once_enabled() -> None:
    spec = plugins.parse_spec(EXAMPLE.read_text())
    assert plugins.NAME_RE.fullmatch(spec.name)
    assert spec.timeout <= const.VERIFY_PLUGIN_TIMEOUT_MAX
    assert set(spec.codes.values()) <= set(Status)


def test_the_shipped_example_runs_on_this_machine() -> None:
    spec = plugins.parse_spec(EXAMPLE.read_text())
    verdict = plugins.run_plugin(Probe.system(), spec)
    assert verdict.status in (Status.PASS, Status.FAIL, Status.SKIP)
    expected = "full" if verdict.status is not Status.SKIP else "does not exist yet"
    assert expected in verdict.detail
