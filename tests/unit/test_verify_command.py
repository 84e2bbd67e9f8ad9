"""`verify`'s command: flags, output, where it writes, and the pi_node_verifier.sh wrapper."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.verify import checks, command
from tests.unit.test_verify_fakes import FakeNode

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests/golden"
WRAPPER = REPO / "image/pi_node_verifier.sh"
NOW = datetime(2025, 3, 1, 12, 0, 5, tzinfo=UTC)
NAMES = [name for name, _ in checks.BUILTIN_CHECKS]


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    """A healthy fake node with one operator check."""
    node = FakeNode(tmp_path).healthy()
    node.tool("disk", "echo '/var/lib/rancher is 41% full'")
    node.write("/etc/sugarkube/checks.d/disk.yaml", "name: rancher_disk_space\ncommand: disk\n")
    node.write("/var/log/sugarkube/migrations.log", "2025-02-01 cloned SD to NVMe\n")
    return node


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sugarkube-agent verify")
    command.configure_parser(parser)
    return parser.parse_args(argv)


def verify(node: FakeNode, report: Path, *argv: str) -> int:
    return command.run(parse_args(*argv), report, probe=node.probe(), now=NOW)


def golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if os.environ.get("SUGARKUBE_UPDATE_GOLDEN") == "1":
        path.write_bytes(actual.encode())
    assert actual.encode() == path.read_bytes()


def test_the_default_prints_the_table_and_appends_the_report(
    node: FakeNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "boot/first-boot-report.txt"
    report.parent.mkdir()
    assert verify(node, report) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1 : len(NAMES) + 2]] == [*NAMES, "rancher_disk_space"]
    assert lines[-1] == "overall: pass (14 pass, 0 fail, 0 skip)"
    golden("verify_healthy_node.md", report.read_text())


def test_json_prints_only_the_document(
    node: FakeNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert verify(node, tmp_path / "report.txt", "--json") == 0
    out = capsys.readouterr().out
    golden("verify_healthy_node.json", out)
    document = json.loads(out)
    assert [c["name"] for c in document["checks"]] == [*NAMES, "rancher_disk_space"]
    assert document["hostname"] == "node1"


def test_full_prints_the_table_then_the_json(
    node: FakeNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    verify(node, tmp_path / "report.txt", "--full")
    out = capsys.readouterr().out
    table, _, document = out.rpartition("\n{")
    assert table.startswith("CHECK")
    assert json.loads("{" + document)["overall"] == "pass"


def test_failing_checks_still_exit_zero(
    node: FakeNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    node.write("/proc/sys/net/ipv4/ip_forward", "0\n")
    assert verify(node, tmp_path / "report.txt", "--json") == 0
    assert json.loads(capsys.readouterr().out)["overall"] == "fail"


def test_log_overrides_the_report_path_and_no_log_writes_nothing(
    node: FakeNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    default, chosen = tmp_path / "default.txt", tmp_path / "chosen.txt"
    verify(node, default, "--log", str(chosen))
    assert chosen.exists() and not default.exists()
    verify(node, default, "--no-log", "--log", str(chosen))
    verify(node, default, "--no-log")
    assert not default.exists()
    assert chosen.read_text().count("## 2025-03-01T12:00:05Z") == 1
    capsys.readouterr()


def test_a_missing_boot_partition_is_one_warning_and_the_json_still_prints(
    node: FakeNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "no-boot/firmware/first-boot-report.txt"
    assert verify(node, report, "--json") == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["checks"]
    assert err.count("\n") == 1
    assert err.startswith(f"warning: cannot write the verifier report to {report}: ")
    assert not report.parent.exists()


@pytest.mark.parametrize(
    "argv", [["--log"], ["--log", ""], ["--log", "dir/"], ["--bogus"], ["--json=1"]]
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(*argv)
    assert exit_info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_log_accepts_the_equals_form() -> None:
    assert parse_args("--log=/tmp/r.txt").log == Path("/tmp/r.txt")


# image/pi_node_verifier.sh


def wrapper(tmp_path: Path, *argv: str) -> list[str]:
    """Run the wrapper with a stand-in sugarkube-agent that prints its arguments, one a line."""
    bin_dir = tmp_path / "wrapper-bin"
    bin_dir.mkdir(exist_ok=True)
    agent = bin_dir / "sugarkube-agent"
    agent.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done\n')
    agent.chmod(0o755)
    done = subprocess.run(
        [str(WRAPPER), *argv],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.splitlines()


def test_the_wrapper_calls_verify_with_the_same_flags(tmp_path: Path) -> None:
    assert wrapper(tmp_path, "--json", "--log", "/boot/x.txt") == [
        "verify",
        "--json",
        "--log",
        "/boot/x.txt",
    ]
    assert wrapper(tmp_path, "--log=/a b", "--no-log", "--full") == [
        "verify",
        "--log=/a b",
        "--no-log",
        "--full",
    ]


def test_the_wrapper_drops_the_retired_skip_compose_flag(tmp_path: Path) -> None:
    assert wrapper(tmp_path, "--skip-compose", "--json") == ["verify", "--json"]
    assert wrapper(tmp_path, "--skip-compose", "true", "--json") == ["verify", "--json"]
    assert wrapper(tmp_path, "--skip-compose=false") == ["verify"]
    assert wrapper(tmp_path, "--json", "--skip-compose") == ["verify", "--json"]
