"""`sugarkube-agent verify [--json] [--full] [--log PATH] [--no-log]`: the node verifier.

Semantics of pi_node_verifier.sh, which it replaces: the exit code is 0 whatever the checks say;
the Markdown block is appended to the report unless --no-log; a report that cannot be written is
one warning line on stderr, and the results still print.
  (default)  a table: check, status, one-line detail, then the overall verdict
  --json     only the JSON document (checks with name, status, detail; hostname, timestamp, overall)
  --full     the table, then the JSON, as the script's --full printed text and then JSON
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from agent import const
from agent.verify.checks import run_checks
from agent.verify.inventory import collect_inventory, migration_steps
from agent.verify.probe import Probe
from agent.verify.report import ReportError, render_json, render_table, write_report


def _report_path(text: str) -> Path:
    """argparse type of --log: a non-empty path to a file."""
    if not text.strip() or text.endswith("/"):
        raise argparse.ArgumentTypeError(f"--log needs a file path, not {text!r}")
    return Path(text)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add verify's options to its sub-command parser."""
    parser.add_argument(
        "--json", action="store_true", help="print only the JSON document instead of the table"
    )
    parser.add_argument(
        "--full", action="store_true", help="print the table with details, then the JSON document"
    )
    parser.add_argument(
        "--log",
        metavar="PATH",
        type=_report_path,
        default=None,
        help="append the Markdown report to PATH instead of the configured report path",
    )
    parser.add_argument("--no-log", action="store_true", help="write no report (wins over --log)")


def run(
    args: argparse.Namespace,
    report_path: Path,
    *,
    probe: Probe | None = None,
    now: datetime | None = None,
) -> int:
    """Run every check, append the report, print the table and/or JSON; always EXIT_OK."""
    probe = probe if probe is not None else Probe.system()
    when = now if now is not None else datetime.now(UTC)
    results = run_checks(probe)
    inventory = collect_inventory(probe)
    if not args.no_log:
        target = args.log if args.log is not None else report_path
        try:
            write_report(target, results, inventory, when, migration_steps(probe))
        except ReportError as exc:
            print(f"warning: {exc}; the results are printed only", file=sys.stderr)
    if args.full or not args.json:
        sys.stdout.write(render_table(results))
    if args.full or args.json:
        sys.stdout.write(render_json(results, inventory.hostname, when))
    sys.stdout.flush()
    return const.EXIT_OK
