"""The verifier inside the daemon: once per boot after the gate opened, again on SIGHUP.

The checks block (files, tools with timeouts), so they run in a worker thread; the results are
appended to the report on the boot partition and handed to the caller for metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from pathlib import Path

from agent import const
from agent.config import Settings
from agent.log import EventLog
from agent.mdns.records import service_type
from agent.verify.checks import run_checks
from agent.verify.inventory import collect_inventory, migration_steps
from agent.verify.probe import Probe
from agent.verify.report import ReportError, write_report
from agent.verify.result import CheckResult


def due_this_boot(root: Path = Path("/")) -> bool:
    """False once the verifier ran in this boot (the marker lives on /run, a tmpfs)."""
    return not (root / str(const.VERIFIED_MARKER).lstrip("/")).exists()


async def run_verifier(settings: Settings, log: EventLog, hostname: str) -> list[CheckResult]:
    """Run every check, append the report, log a summary; returns the results."""
    probe = Probe(
        hostname=hostname, service_type=service_type(settings.cluster, settings.env),
        path=Probe.system().path,
    )
    results = await asyncio.to_thread(run_checks, probe)
    inventory = await asyncio.to_thread(collect_inventory, probe)
    steps = await asyncio.to_thread(migration_steps, probe)
    try:
        await asyncio.to_thread(
            write_report, settings.report_path, results, inventory, datetime.now(UTC), steps
        )
    except ReportError as err:
        log.event("report_unwritten", "warning", path=str(settings.report_path), error=str(err))
    failed = [r.name for r in results if r.status == "fail"]
    log.event(
        "verifier_done", "warning" if failed else "info",
        passed=sum(r.status == "pass" for r in results), failed=len(failed),
        skipped=sum(r.status == "skip" for r in results), failing=",".join(failed) or None,
    )
    await asyncio.to_thread(_mark_verified)
    return results


def _mark_verified() -> None:
    with contextlib.suppress(OSError):
        const.VERIFIED_MARKER.parent.mkdir(parents=True, exist_ok=True)
        const.VERIFIED_MARKER.write_text(datetime.now(UTC).isoformat() + "\n")
