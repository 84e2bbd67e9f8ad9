"""The verifier's outputs: the Markdown block (DESIGN.md §A), the JSON, the terminal table, and
the crash-safe append of the block to the report on the boot partition.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import stat
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from agent import const
from agent.verify.inventory import Inventory
from agent.verify.result import CheckResult, Status, overall

NO_MIGRATIONS = "_No migration steps recorded yet._"
_TMP_MARK = ".verify-tmp"
_BLOCK_START = re.compile(rb"\n## ")  # a block's first line: `## <timestamp>`, nothing else is


class ReportError(Exception):
    """The report could not be written; the message names the path and the reason."""


def format_timestamp(when: datetime) -> str:
    """ISO-8601 in UTC to the second, as the runbook's example (`2025-01-17T22:48:12Z`); naive
    datetimes are refused."""
    if when.tzinfo is None:
        raise ValueError("the report timestamp must carry a time zone")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _code(text: str) -> str:
    """`text` safe inside a Markdown code span on one line."""
    return " ".join(text.replace("`", "'").split()) or "unknown"


def _cell(text: str) -> str:
    """`text` safe inside a Markdown table cell."""
    return " ".join(text.replace("|", "\\|").split())


def render_markdown(
    results: Sequence[CheckResult],
    inventory: Inventory,
    when: datetime,
    migrations: Iterable[str] = (),
) -> str:
    """One report block in the runbook's shape, ending with a blank line that separates blocks."""
    lines = [
        f"## {format_timestamp(when)}",
        "",
        f"* Hostname: `{_code(inventory.hostname)}`",
        f"* Kernel: `{_code(inventory.kernel)}`",
        f"* Hardware: `{_code(inventory.hardware)}`",
        "",
        "### Verifier Checks",
        "",
        "| Check | Status |",
        "| --- | --- |",
    ]
    lines += [f"| {_cell(r.name)} | {r.status.value} |" for r in results]
    lines += ["", "### Migration Steps", ""]
    steps = [" ".join(step.split()) for step in migrations]
    lines += [f"* {step}" for step in steps if step] or [NO_MIGRATIONS]
    return "\n".join(lines) + "\n\n"


def render_json(results: Sequence[CheckResult], hostname: str, when: datetime) -> str:
    """The `--json` line: checks (name, status, detail), hostname, timestamp, overall."""
    document = {
        "checks": [{"name": r.name, "status": r.status.value, "detail": r.detail} for r in results],
        "hostname": hostname,
        "timestamp": format_timestamp(when),
        "overall": overall(list(results)).value,
    }
    return json.dumps(document, separators=(",", ":")) + "\n"


def render_table(results: Sequence[CheckResult]) -> str:
    """The terminal table: check, status, detail, then the overall verdict with counts."""
    width = max([len("CHECK"), *(len(r.name) for r in results)])
    rows = [f"{'CHECK':<{width}}  STATUS  DETAIL"]
    rows += [f"{r.name:<{width}}  {r.status.value:<6}  {r.detail}" for r in results]
    counts = ", ".join(f"{sum(r.status is s for r in results)} {s.value}" for s in Status)
    rows += ["", f"overall: {overall(list(results)).value} ({counts})"]
    return "\n".join(rows) + "\n"


def _lock(dir_fd: int, path: Path) -> None:
    """Hold an exclusive flock on the report's directory, waiting up to the lock timeout."""
    deadline = time.monotonic() + const.VERIFY_REPORT_LOCK_TIMEOUT
    while True:
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise ReportError(
                    f"cannot write the verifier report to {path}: another verifier held it "
                    f"for {const.VERIFY_REPORT_LOCK_TIMEOUT:g} s"
                ) from None
            time.sleep(0.02)
        else:
            return


def _remove_stale(directory: Path, name: str) -> None:
    """Delete temporary files left by appenders that died (we hold the lock, so none is live)."""
    prefix = f".{name}."
    with contextlib.suppress(OSError):
        for leftover in directory.iterdir():
            if leftover.name.startswith(prefix) and leftover.name.endswith(_TMP_MARK):
                with contextlib.suppress(OSError):
                    leftover.unlink()


def _replace(directory: Path, path: Path, content: bytes, dir_fd: int) -> None:
    """Write `content` to a temp file beside `path`, fsync, rename it over `path`, fsync the dir."""
    tmp = directory / f".{path.name}.{os.getpid()}{_TMP_MARK}"
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o644
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    try:
        os.fsync(dir_fd)
    except OSError as exc:  # some filesystems cannot fsync a directory; the rename is done
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
            raise


def capped(existing: bytes, block: bytes, cap: int | None = None) -> bytes:
    """`existing` + `block` within `cap` bytes (VERIFY_REPORT_MAX): whole blocks of `existing`
    are dropped oldest first (anything before its first block goes with that one); `block` is
    always kept whole, alone if it is larger than the cap."""
    cap = const.VERIFY_REPORT_MAX if cap is None else cap
    excess = len(existing) + len(block) - cap
    if excess <= 0:
        return existing + block
    starts = (m.start() + 1 for m in _BLOCK_START.finditer(existing))
    return existing[next((s for s in starts if s >= excess), len(existing)) :] + block


def append_report(path: Path, block: str) -> None:
    """Append `block` to the report at `path` so that a crash at any point loses no earlier block.

    The whole new file goes to a temp file in the same directory, is fsynced and renamed over
    the report, then the directory is fsynced (the boot partition is FAT: no O_APPEND atomicity
    across power loss). Past VERIFY_REPORT_MAX the oldest blocks are dropped (`capped`).
    Concurrent appenders serialise on a flock of the directory.
    Raises ReportError when the directory is missing, read-only or otherwise unwritable.
    """
    directory = path.parent
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ReportError(
            f"cannot write the verifier report to {path}: {exc.strerror or exc}"
        ) from exc
    try:
        _lock(dir_fd, path)
        _remove_stale(directory, path.name)
        try:
            existing = path.read_bytes()
        except FileNotFoundError:
            existing = b""
        if existing and not existing.endswith(b"\n"):
            existing += b"\n"
        _replace(directory, path, capped(existing, block.encode("utf-8")), dir_fd)
    except OSError as exc:
        raise ReportError(
            f"cannot write the verifier report to {path}: {exc.strerror or exc}"
        ) from exc
    finally:
        os.close(dir_fd)


def write_report(
    path: Path,
    results: Sequence[CheckResult],
    inventory: Inventory,
    when: datetime,
    migrations: Iterable[str] = (),
) -> None:
    """Render the Markdown block and append it to `path`; ReportError when it cannot be written."""
    append_report(path, render_markdown(results, inventory, when, migrations))
