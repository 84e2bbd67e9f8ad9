"""The report: Markdown and JSON byte-for-byte against golden files, and the crash-safe append."""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import const
from agent.verify.inventory import Inventory
from agent.verify.report import (
    ReportError,
    append_report,
    capped,
    format_timestamp,
    render_json,
    render_markdown,
    render_table,
)
from agent.verify.result import CheckResult, Status

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests/golden"
WHEN = datetime(2025, 3, 1, 12, 0, 5, 123456, tzinfo=UTC)
INVENTORY = Inventory("node1", "Linux 6.6.51+rpt-rpi-2712", "Raspberry Pi 5 Model B Rev 1.0")
RESULTS = [
    CheckResult("cgroup_memory", Status.PASS, "memory controller enabled (cgroup v2)"),
    CheckResult("cloud_init", Status.SKIP, "cloud-init not found on PATH"),
    CheckResult("time_sync", Status.PASS, "NTPSynchronized=yes (timedatectl)"),
    CheckResult(
        "kube_proxy_dataplane", Status.PASS, "nftables mode (10-kube-proxy.yaml); nft works"
    ),
    CheckResult("k3s_check_config", Status.SKIP, "k3s not found on PATH"),
    CheckResult("k3s_node_ready", Status.SKIP, "no kubeconfig"),
    CheckResult(
        "avahi_dbus", Status.PASS, "avahi-daemon owns org.freedesktop.Avahi and is RUNNING"
    ),
    CheckResult("mdns_advertised", Status.FAIL, 'no _https._tcp advert for "node1.local"'),
    CheckResult(
        "hostname_unique", Status.PASS, "node1.local resolves to 192.168.50.11, this host's"
    ),
    CheckResult("swap_off", Status.FAIL, "swap is on (/dev/zram0)"),
    CheckResult("ip_forward", Status.PASS, "net.ipv4.ip_forward=1"),
    CheckResult("boot_media", Status.FAIL, "SD card or eMMC: / is on /dev/mmcblk0p2"),
    CheckResult("rancher_disk_space", Status.PASS, "/var/lib/rancher is 41% full"),
]


def golden(name: str, actual: str) -> None:
    """Compare `actual` with tests/golden/`name`; SUGARKUBE_UPDATE_GOLDEN=1 rewrites it."""
    path = GOLDEN / name
    if os.environ.get("SUGARKUBE_UPDATE_GOLDEN") == "1":
        path.write_bytes(actual.encode())
    assert actual.encode() == path.read_bytes()


def markdown_rows(markdown: str) -> list[tuple[str, str]]:
    """The (check, status) rows of every Verifier Checks table in `markdown`."""
    return re.findall(r"^\| (?!Check |--- )(\S+) \| (pass|fail|skip) \|$", markdown, re.MULTILINE)


def test_markdown_block_matches_the_golden_file() -> None:
    golden("verify_report.md", render_markdown(RESULTS, INVENTORY, WHEN))


def test_json_matches_the_golden_file() -> None:
    golden("verify_report.json", render_json(RESULTS, INVENTORY.hostname, WHEN))


def test_json_and_markdown_agree() -> None:
    document = json.loads(render_json(RESULTS, "node1", WHEN))
    rows = markdown_rows(render_markdown(RESULTS, INVENTORY, WHEN))
    assert [(c["name"], c["status"]) for c in document["checks"]] == rows
    assert [c["detail"] for c in document["checks"]] == [r.detail for r in RESULTS]
    assert document["overall"] == "fail"
    assert document["timestamp"] == "2025-03-01T12:00:05Z"
    assert list(document) == ["checks", "hostname", "timestamp", "overall"]


def test_overall_passes_when_nothing_failed() -> None:
    passing = [r for r in RESULTS if r.status is not Status.FAIL]
    assert json.loads(render_json(passing, "n", WHEN))["overall"] == "pass"


def test_migration_steps_become_bullets() -> None:
    block = render_markdown(
        RESULTS[:1], INVENTORY, WHEN, ["2025-02-01 cloned SD to NVMe", "  ", "x\ty"]
    )
    assert block.endswith("### Migration Steps\n\n* 2025-02-01 cloned SD to NVMe\n* x y\n\n")


def test_hostile_inventory_and_names_cannot_break_the_markdown() -> None:
    inventory = Inventory("evil`host", "Linux\n6.6", "")
    block = render_markdown([CheckResult("a|b", Status.PASS, "")], inventory, WHEN)
    assert "* Hostname: `evil'host`\n" in block
    assert "* Kernel: `Linux 6.6`\n" in block
    assert "* Hardware: `unknown`\n" in block
    assert "| a\\|b | pass |\n" in block


@given(st.lists(st.tuples(st.text(min_size=1), st.sampled_from(list(Status)), st.text())))
def test_any_results_render_to_json_that_parses(rows: list[tuple[str, Status, str]]) -> None:
    results = [CheckResult(*row) for row in rows]
    document = json.loads(render_json(results, "host", WHEN))
    assert [(c["name"], c["status"], c["detail"]) for c in document["checks"]] == [
        (n, s.value, d) for n, s, d in rows
    ]
    assert render_json(results, "host", WHEN).count("\n") == 1


def test_timestamps_are_utc_to_the_second() -> None:
    eastern = datetime(2025, 3, 1, 7, 0, 5, tzinfo=timezone(timedelta(hours=-5)))
    assert format_timestamp(eastern) == "2025-03-01T12:00:05Z"
    with pytest.raises(ValueError, match="time zone"):
        format_timestamp(datetime(2025, 3, 1, 12, 0, 5))


def test_table_lists_every_check_with_its_detail() -> None:
    table = render_table(RESULTS).splitlines()
    assert table[0].split() == ["CHECK", "STATUS", "DETAIL"]
    assert [line.split()[:2] for line in table[1:14]] == [[r.name, r.status.value] for r in RESULTS]
    assert table[-1] == "overall: fail (7 pass, 3 fail, 3 skip)"


# The append


def test_append_creates_then_appends_keeping_earlier_bytes(tmp_path: Path) -> None:
    report = tmp_path / "first-boot-report.txt"
    first = render_markdown(RESULTS, INVENTORY, WHEN)
    second = render_markdown(RESULTS[:2], INVENTORY, WHEN + timedelta(hours=1))
    append_report(report, first)
    append_report(report, second)
    assert report.read_text() == first + second
    assert markdown_rows(report.read_text()) == [
        (r.name, r.status.value) for r in RESULTS + RESULTS[:2]
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first-boot-report.txt"]


def test_append_after_a_hand_edit_starts_on_a_new_line(tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    report.write_bytes(b"operator notes, no newline \xff")
    append_report(report, "## block\n")
    assert report.read_bytes() == b"operator notes, no newline \xff\n## block\n"


def test_append_keeps_the_report_mode(tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    report.write_text("")
    report.chmod(0o600)
    append_report(report, "x\n")
    assert report.stat().st_mode & 0o777 == 0o600


def test_append_removes_temp_files_of_appenders_that_died(tmp_path: Path) -> None:
    report = tmp_path / "report.txt"
    (tmp_path / ".report.txt.4242.verify-tmp").write_text("half a blo")
    (tmp_path / ".other.txt.4242.verify-tmp").write_text("not ours")
    append_report(report, "x\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".other.txt.4242.verify-tmp",
        "report.txt",
    ]


def blocks(count: int, start: int = 0) -> list[str]:
    """`count` report blocks an hour apart, from hour `start`."""
    return [render_markdown(RESULTS, INVENTORY, WHEN + timedelta(hours=h))
            for h in range(start, start + count)]


def test_past_the_cap_the_oldest_blocks_go_and_the_newest_stays_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    size = len(blocks(1)[0])
    monkeypatch.setattr(const, "VERIFY_REPORT_MAX", 3 * size + size // 2)
    report = tmp_path / "first-boot-report.txt"
    report.write_text("operator notes\n")
    written = blocks(6)
    for block in written:
        append_report(report, block)
        assert report.stat().st_size <= const.VERIFY_REPORT_MAX
    assert report.read_text() == "".join(written[-3:])


def test_a_block_larger_than_the_cap_replaces_the_report_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(const, "VERIFY_REPORT_MAX", 100)
    report = tmp_path / "first-boot-report.txt"
    append_report(report, "## 2025-03-01T00:00:00Z\n\nsmall\n\n")
    big = blocks(1)[0]
    append_report(report, big)
    assert report.read_text() == big


@given(st.lists(st.integers(min_value=0, max_value=2000), min_size=1, max_size=30),
       st.integers(min_value=0, max_value=6000))
def test_appends_keep_the_newest_blocks_that_fit_together(steps: list[int], cap: int) -> None:
    report, written = b"", []
    for hour, step in enumerate(steps):
        when = WHEN + timedelta(hours=hour)
        written.append(render_markdown(RESULTS[:2], INVENTORY, when, ["x" * step]).encode())
        report = capped(report, written[-1], cap)
        assert len(report) <= max(cap, len(written[-1]))
    newest, total = 0, 0
    for block in reversed(written):
        if newest and total + len(block) > cap:
            break
        newest, total = newest + 1, total + len(block)
    assert report == b"".join(written[-newest:])


@pytest.mark.parametrize("where", ["missing/report.txt", "a-file/report.txt", "report-dir"])
def test_an_unwritable_place_is_a_report_error(tmp_path: Path, where: str) -> None:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "report-dir").mkdir()
    with pytest.raises(ReportError, match=r"cannot write the verifier report to .*: "):
        append_report(tmp_path / where, "x\n")


@pytest.fixture
def read_only_dir(tmp_path: Path) -> object:
    """A read-only tmpfs (needs root and mount); the FAT boot partition mounted ro behaves so."""
    target = tmp_path / "ro"
    target.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(target)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_read_only_boot_partition_is_a_report_error(read_only_dir: Path) -> None:
    with pytest.raises(ReportError, match="Read-only file system"):
        append_report(read_only_dir / "first-boot-report.txt", "x\n")


def test_a_held_lock_times_out_into_a_report_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(const, "VERIFY_REPORT_LOCK_TIMEOUT", 0.2)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: flock conflicts with it
        with pytest.raises(ReportError, match=r"another verifier held it for 0\.2 s"):
            append_report(tmp_path / "report.txt", "x\n")
    finally:
        os.close(fd)
    assert not (tmp_path / "report.txt").exists()


CHILD = """
import sys
from datetime import UTC, datetime
from pathlib import Path
from agent.verify.inventory import Inventory
from agent.verify.report import write_report
from agent.verify.result import CheckResult, Status
from agent import const
const.VERIFY_REPORT_MAX = 1 << 30  # ~100 blocks of 5 KiB survive: crash safety, not the cap
index, path = int(sys.argv[1]), Path(sys.argv[2])
results = [CheckResult(f"check_{n}", list(Status)[(index + n) % 3], "") for n in range(40)]
inventory = Inventory(f"run-{index}", "Linux 6.6", "Raspberry Pi 5")
print("ready", flush=True)
write_report(path, results, inventory, datetime(2025, 3, 1, tzinfo=UTC), ["x" * 200] * 20)
"""


def expected_block(index: int) -> str:
    """The block run `index` of CHILD appends."""
    results = [CheckResult(f"check_{n}", list(Status)[(index + n) % 3], "") for n in range(40)]
    inventory = Inventory(f"run-{index}", "Linux 6.6", "Raspberry Pi 5")
    return render_markdown(results, inventory, datetime(2025, 3, 1, tzinfo=UTC), ["x" * 200] * 20)


def surviving_runs(text: str) -> list[int]:
    """The run indexes whose blocks make up `text`, in order; fails on any partial block."""
    runs, position = [], 0
    for match in re.finditer(r"^\* Hostname: `run-(\d+)`$", text, re.MULTILINE):
        index = int(match.group(1))
        block = expected_block(index)
        assert text.startswith(block, position), f"block of run {index} is damaged"
        runs.append(index)
        position += len(block)
    assert position == len(text), "bytes outside any whole block"
    return runs


@pytest.mark.slow  # in make test-all: make test stays under its time budget
def test_200_appends_killed_at_random_points_lose_nothing(tmp_path: Path) -> None:
    report = tmp_path / "first-boot-report.txt"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    rng = random.Random(20250301)
    survivors: list[int] = []
    killed = completed = 0
    started = time.monotonic()
    for index in range(200):
        child = subprocess.Popen(
            ["/usr/bin/python3", "-c", CHILD, str(index), str(report)],
            env=env,
            stdout=subprocess.PIPE,
        )
        assert child.stdout is not None
        victim = rng.random() < 0.5
        if victim and rng.random() < 0.2:
            time.sleep(rng.uniform(0, 0.03))  # sometimes before it is even ready
        else:
            assert child.stdout.readline() == b"ready\n"
            if victim:
                time.sleep(rng.uniform(0, 0.004))  # inside the read, write, fsync, rename
        if victim:
            child.send_signal(signal.SIGKILL)
        returncode = child.wait(timeout=30)
        child.stdout.close()
        killed += returncode == -signal.SIGKILL
        completed += returncode == 0
        assert returncode in (0, -signal.SIGKILL)
        runs = surviving_runs(report.read_text() if report.exists() else "")
        assert runs[: len(survivors)] == survivors, "an earlier block was lost"
        assert runs[len(survivors) :] in ([], [index])
        if returncode == 0:
            assert runs[-1] == index, "a completed append is missing"
        survivors = runs
    assert killed >= 50 and completed >= 90
    assert time.monotonic() - started < 60
    append_report(report, "")  # a clean append sweeps the temp files of killed runs
    assert [p.name for p in tmp_path.iterdir()] == ["first-boot-report.txt"]


def test_concurrent_appenders_each_land_whole(tmp_path: Path) -> None:
    report = tmp_path / "first-boot-report.txt"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    children = [
        subprocess.Popen(
            ["/usr/bin/python3", "-c", CHILD, str(index), str(report)],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        for index in range(12)
    ]
    assert [child.wait(timeout=60) for child in children] == [0] * 12
    assert sorted(surviving_runs(report.read_text())) == list(range(12))
