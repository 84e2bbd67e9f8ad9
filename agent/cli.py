"""Command line: argument parsing and exit codes, no logic (DESIGN.md §A "Command line").

Each command imports its machinery lazily, so `--help` and `verify` never load GLib or D-Bus.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent import __version__, const, loghooks
from agent.config import ConfigError, Settings, load_settings
from agent.log import EventLog, Redactor, load_salt
from agent.verify.command import configure_parser as command_verify_parser

PROG = "sugarkube-agent"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 86400 seconds")
    return value


def _make_log(settings: Settings | None) -> EventLog:
    """The event log, with the node's salt (the pseudonyms of every command and the daemon
    match), which library logs and tracebacks go through too (agent/loghooks.py); without
    settings (unreadable configuration) addresses are redacted."""
    redactor = Redactor(
        load_salt(const.STATE_DIR / "redact-salt"),
        addresses=settings is None or settings.redact_addresses,
    )
    if settings is not None and settings.token is not None:
        redactor.add_secret(settings.token.reveal())
    log = EventLog(redactor=redactor)
    log.debug_enabled = settings is not None and settings.mdns.debug
    loghooks.install(log)
    return log


def _run(args: argparse.Namespace, settings: Settings, log: EventLog) -> int:
    from agent.daemon.service import serve

    return asyncio.run(serve(settings, log, args.config))


def _run_unconfigured(args: argparse.Namespace, error: ConfigError) -> int:
    """`run` with a configuration that does not load: a member still releases its gate from
    its local state (agent/daemon/local.py); a fresh node exits with the error's code."""
    from agent.daemon.local import held_role
    from agent.daemon.service import serve_unconfigured

    role = held_role(Path("/"))
    if role is None:
        return error.exit_code
    return asyncio.run(serve_unconfigured(args.config, str(error), role, _make_log))


def _discover(args: argparse.Namespace, settings: Settings, log: EventLog) -> int:
    from agent.discover import AvahiUnavailable, discover, render
    from agent.mdns.records import service_type

    try:
        found, ms_elapsed = asyncio.run(discover(settings, args.timeout, log))
    except AvahiUnavailable as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return const.EXIT_UNAVAILABLE
    stype = service_type(settings.cluster, settings.env)
    print(render(found, ms_elapsed, stype, as_json=args.json))
    return const.EXIT_OK if found else const.EXIT_FAIL


def _gate(args: argparse.Namespace, settings: None, log: EventLog) -> int:
    from agent.client import gate

    code, reason = asyncio.run(gate(args.timeout, sys.stdout, args.role))
    print(f"{PROG} gate: {reason}", file=sys.stderr if code else sys.stdout)
    return code


def _status(args: argparse.Namespace, settings: None, log: EventLog) -> int:
    from agent.client import Unreachable, render_status, status

    try:
        snapshot = asyncio.run(status())
    except Unreachable as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return const.EXIT_UNAVAILABLE
    print(json.dumps(snapshot, indent=2) if args.json else render_status(snapshot))
    return const.EXIT_OK


def _wipe(args: argparse.Namespace, settings: Settings, log: EventLog) -> int:
    from agent.wipe import wipe

    if not args.yes:
        print(
            f"{PROG} wipe: this stops k3s and deletes its state and this node's tokens; "
            "run again with --yes to do it",
            file=sys.stderr,
        )
        return const.EXIT_USAGE
    lines: list[str] = []
    code, reason = asyncio.run(wipe(settings, lines))
    for line in lines:
        print(line)
    print(f"{PROG} wipe: {reason}", file=sys.stderr if code else sys.stdout)
    return code


def _verify(args: argparse.Namespace, settings: Settings, log: EventLog) -> int:
    from agent.verify import command

    return command.run(args, settings.report_path)


Command = Callable[[argparse.Namespace, Any, EventLog], int]  # Settings; None: gate, status


class _Formatter(argparse.HelpFormatter):
    """`Usage:` capitalised, as pi_node_verifier.sh printed it and the runbook quotes it."""

    def add_usage(
        self, usage: str | None, actions: Any, groups: Any, prefix: str | None = None
    ) -> None:
        super().add_usage(usage, actions, groups, "Usage: " if prefix is None else prefix)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; every command takes --config and --help."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Forms a k3s cluster of Raspberry Pis over mDNS, safely.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument(
        "--config", type=Path, metavar="PATH", default=argparse.SUPPRESS,
        help=f"configuration file (default {const.DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument("--config", type=Path, metavar="PATH", default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    commands_kw: dict[str, Any] = {"parents": [config], "formatter_class": _Formatter}

    run = commands.add_parser("run", help="the daemon (systemd ExecStart)", **commands_kw)
    run.set_defaults(handler=_run)

    disc = commands.add_parser(
        "discover", help="one-shot browse for this cluster's nodes", **commands_kw
    )
    disc.add_argument("--json", action="store_true", help="print JSON")
    disc.add_argument(
        "--timeout", type=_seconds, default=const.DISCOVER_TIMEOUT, metavar="S",
        help=f"give up after S seconds (default {const.DISCOVER_TIMEOUT:g})",
    )
    disc.set_defaults(handler=_discover)

    gate = commands.add_parser(
        "gate", help="block until the daemon releases the k3s gate (the k3s units' drop-ins)",
        **commands_kw,
    )
    gate.add_argument(
        "--role", choices=("server", "agent"), default=None,
        help="the role of the unit asking (k3s.service: server, k3s-agent.service: agent); "
        f"exit {const.EXIT_OTHER_ROLE} when the node was released in the other role",
    )
    gate.add_argument(
        "--timeout", type=_seconds, default=const.GATE_TIMEOUT, metavar="S",
        help=f"give up after S seconds (default {const.GATE_TIMEOUT:g})",
    )
    gate.set_defaults(handler=_gate)

    stat = commands.add_parser("status", help="the daemon's state", **commands_kw)
    stat.add_argument("--json", action="store_true", help="print JSON")
    stat.set_defaults(handler=_status)

    wipe = commands.add_parser(
        "wipe", help="stop k3s, remove its state, withdraw the adverts, confirm", **commands_kw
    )
    wipe.add_argument("--yes", action="store_true", help="really do it")
    wipe.set_defaults(handler=_wipe)

    verify = commands.add_parser(
        "verify", help="the node verifier (replaces pi_node_verifier.sh)", **commands_kw
    )
    command_verify_parser(verify)
    verify.set_defaults(handler=_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, load the configuration, run the command; returns the exit code."""
    # First of all: whatever fails from here on is logged redacted (tokens, addresses).
    loghooks.install(EventLog())
    args = build_parser().parse_args(argv)
    if args.handler in (_gate, _status):
        # They only ask the daemon, which says what it thinks of the configuration: a typo in
        # agent.yaml must not hold k3s at its gate (the unit's ExecCondition runs `gate`).
        return _guarded(args.handler, args, None)
    try:
        settings = load_settings(args.config)
    except ConfigError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        if args.handler is _run:
            return _run_unconfigured(args, err)
        return err.exit_code
    return _guarded(args.handler, args, settings)


def _guarded(handler: Command, args: argparse.Namespace, settings: Settings | None) -> int:
    try:
        return handler(args, settings, _make_log(settings))
    except KeyboardInterrupt:
        return 130
