"""Command line for the lab of real nodes.

`python3 -m tests.lab [--prefix P] [--subnet S] up N | down | exec NODE CMD... | status`

`up` leaves the lab running after it exits; `down`, `exec` and `status` find it through its
state file, from any process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tests.lab import netns
from tests.lab.cleanup import find_leftovers, sweep_leftovers
from tests.lab.demo import run_demo
from tests.lab.errors import LabError
from tests.lab.lab import Lab

EXIT_OK = 0
EXIT_LAB = 1  # the lab failed or is not there
EXIT_USAGE = 2  # argparse's own code for bad arguments


def cmd_up(args: argparse.Namespace) -> int:
    """Build a lab of args.n nodes and leave it running."""
    hostnames = args.hostnames.split(",") if args.hostnames else None
    lab = Lab(args.n, prefix=args.prefix, subnet=args.subnet, hostnames=hostnames)
    lab.up()
    lab.detach()
    for node in lab.nodes:
        print(f"{node.ns}  {node.name}  {node.addr}  holder pid {node.holder.pid}")
    print(f"lab {args.prefix} is up; state in {lab.workdir}; remove it with `down`")
    return EXIT_OK


def cmd_down(args: argparse.Namespace) -> int:
    """Remove the running lab, or whatever a crashed one left."""
    found = sweep_leftovers(args.prefix)
    print(f"removed: {', '.join(found)}" if found else f"no {args.prefix} lab was there")
    return EXIT_OK


def cmd_exec(args: argparse.Namespace) -> int:
    """Run a command inside one node, attached to this terminal; exit with its code."""
    if not args.command:
        raise ValueError("exec needs a command to run")
    node = Lab.attach(args.prefix).node(args.node)
    return subprocess.run(node.enter_argv(*args.command), check=False).returncode


def cmd_status(args: argparse.Namespace) -> int:
    """Show the running lab's nodes and their avahi-daemon state, or any leftovers."""
    try:
        lab = Lab.attach(args.prefix)
    except LabError:
        left = find_leftovers(args.prefix)
        print(f"no {args.prefix} lab is up" + (f"; leftovers: {', '.join(left)}" if left else ""))
        return EXIT_LAB if left else EXIT_OK
    for node in lab.nodes:
        alive = node.holder.alive()
        state = node.avahi_state() if alive else None
        print(
            f"{node.ns}  {node.name}  {node.addr}  holder {'up' if alive else 'GONE'}  "
            f"avahi {'RUNNING' if state == 2 else state}"
        )
    return EXIT_OK


def _add_up(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("n", type=int, help="number of nodes")
    parser.add_argument("--hostnames", help="comma-separated hostnames (default node1..nodeN)")


def _add_exec(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("node", type=int, help="node number, from 1")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="command and its arguments")


def _add_nothing(parser: argparse.ArgumentParser) -> None:
    del parser


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, its arguments and the function that runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# The dispatch table: a new subcommand (such as `demo`) is one more entry here.
COMMANDS: dict[str, Command] = {
    "up": Command("build a lab of N nodes and leave it running", _add_up, cmd_up),
    "down": Command("remove the lab (or a crashed lab's leftovers)", _add_nothing, cmd_down),
    "exec": Command("run a command inside node NODE", _add_exec, cmd_exec),
    "status": Command("show the lab's nodes and avahi state", _add_nothing, cmd_status),
    "demo": Command("3 nodes run the agent and find each other, then down", _add_nothing,
                    run_demo),
}


def build_parser() -> argparse.ArgumentParser:
    """The parser for every subcommand in COMMANDS."""
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.lab",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--prefix",
        default=os.environ.get("SUGARKUBE_LAB_PREFIX", "skl"),
        help="name prefix of the lab's namespaces and links (env SUGARKUBE_LAB_PREFIX)",
    )
    parser.add_argument(
        "--subnet",
        default=os.environ.get("SUGARKUBE_LAB_SUBNET", "10.251.0"),
        help="first three octets of the node addresses (env SUGARKUBE_LAB_SUBNET)",
    )
    sub = parser.add_subparsers(dest="command_name", required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; lab failures and bad values are one line on stderr, not a traceback."""
    args = build_parser().parse_args(argv)
    try:
        netns.check_prefix(args.prefix)
        netns.check_subnet(args.subnet)
        return COMMANDS[args.command_name].run(args)
    except ValueError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LabError as exc:
        print(f"lab: {exc}", file=sys.stderr)
        return EXIT_LAB


if __name__ == "__main__":
    sys.exit(main())
