"""Command line of the stand-in: `server`, `agent` (as k3s has them) and `query`.

    python3 -m tests.lab.k3s_standin server [--root /] [--bind 0.0.0.0] [--port 6443]
        [--name HOST] [--join-timeout 60] [--serve-delay S]
    python3 -m tests.lab.k3s_standin agent [--root /] [--name HOST] [--join-timeout 60]
    python3 -m tests.lab.k3s_standin query {ca,members,ping,cacerts} URL

`--agent` and `--query WHAT URL` (the older spellings) still work. Environment:
K3S_STANDIN_SERVE_DELAY (s; --serve-delay wins), K3S_STANDIN_LEARNER_TICK (s, the learner
manager's period). Exit 0 on SIGTERM, 1 when refused or failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from agent.cluster import k3s

from .client import request, unverified
from .const import (
    EXIT_FAIL,
    EXIT_OK,
    EXIT_USAGE,
    JOIN_TIMEOUT,
    LEARNER_TICK,
    LEARNER_TICK_ENV,
    SERVE_DELAY,
    SERVE_DELAY_ENV,
    seconds_from_env,
)
from .events import Refused, log
from .service import Agent, Server, Settings, supervise

QUERIES = {
    "ca": "/v1-sugarkube/ca",
    "members": "/v1-sugarkube/members",
    "ping": "/ping",
    "cacerts": "/cacerts",
}
COMMANDS = ("server", "agent", "query")


def process_started() -> float:
    """When this process started, on time.monotonic()'s clock (/proc/self/stat starttime)."""
    stat = Path("/proc/self/stat").read_text()
    ticks = int(stat[stat.rindex(")") + 2 :].split()[19])
    age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    return time.monotonic() - max(0.0, age)


def query(what: str, url: str) -> int:
    """Print what a stand-in at URL answers (unverified: the question is which CA it claims)."""
    try:
        status, body = request(url, "GET", QUERIES[what], unverified())
    except (OSError, Refused) as exc:
        print(f"k3s-standin: {url} did not answer: {exc}", file=sys.stderr)
        return EXIT_FAIL
    if status != 200:
        print(f"k3s-standin: {url}{QUERIES[what]} answered {status}", file=sys.stderr)
        return EXIT_FAIL
    sys.stdout.write(body.decode(errors="replace"))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.lab.k3s_standin", description="The lab's stand-in for k3s."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    server = commands.add_parser("server", help="run as `k3s server` (etcd, or sqlite alone)")
    agent = commands.add_parser("agent", help="run as `k3s agent`: join, never serve")
    for sub in (server, agent):
        sub.add_argument("--root", default="/", help="the node's root (default /)")
        sub.add_argument("--name", help="node name (default: the hostname)")
        sub.add_argument("--join-timeout", type=float, default=JOIN_TIMEOUT,
                         help="s to wait for an unreachable server")  # fmt: skip
    server.add_argument("--bind", default="0.0.0.0", help="address to serve on (0.0.0.0 adds [::])")
    server.add_argument("--port", type=int, default=6443, help="TCP port of the API")
    server.add_argument("--serve-delay", type=float, default=None,
                        help=f"s from start to serving (default ${SERVE_DELAY_ENV}, "
                        f"else {SERVE_DELAY:g})")  # fmt: skip
    ask = commands.add_parser("query", help="ask a running stand-in (unverified)")
    ask.add_argument("what", choices=sorted(QUERIES))
    ask.add_argument("url")
    return parser


def _modern(argv: list[str]) -> list[str]:
    """The older spellings as subcommands: `--query W U` is `query W U`, `--agent` is `agent`."""
    if argv[:1] == ["--query"]:
        return ["query", *argv[1:]]
    if "--agent" in argv:
        return ["agent", *(arg for arg in argv if arg != "--agent")]
    return argv


def settings(args: argparse.Namespace) -> Settings:
    """The run's settings; ValueError naming the variable when an environment value is bad."""
    delay = getattr(args, "serve_delay", None)
    if delay is None:
        delay = seconds_from_env(SERVE_DELAY_ENV, SERVE_DELAY)
    if delay < 0:
        raise ValueError(f"--serve-delay {delay:g} is negative")
    return Settings(
        root=Path(args.root), name=args.name or socket.gethostname(),
        bind=getattr(args, "bind", "0.0.0.0"), port=getattr(args, "port", 6443),
        join_timeout=args.join_timeout, serve_delay=delay,
        learner_tick=seconds_from_env(LEARNER_TICK_ENV, LEARNER_TICK) or LEARNER_TICK,
        started=process_started(),
    )  # fmt: skip


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # A client that rejects our certificate fails its handshake: one line, not a traceback.
    loop.set_exception_handler(
        lambda _, context: log("connection_error", detail=str(context.get("exception", "?"))[:120])
    )


async def _run(args: argparse.Namespace, run: Settings) -> int:
    config = k3s.merged_config(run.root)
    log("start", role=args.command, name=run.name, serve_delay=f"{run.serve_delay:g}")
    node = Server(run, config) if args.command == "server" else Agent(run, config)
    return await supervise(node, _install_signals)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_modern(list(sys.argv[1:] if argv is None else argv)))
    if args.command == "query":
        return query(args.what, args.url)
    try:
        run = settings(args)
    except ValueError as exc:
        print(f"k3s-standin: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return asyncio.run(_run(args, run))
    except k3s.K3sError as exc:
        log("failed", reason=type(exc).__name__, detail=str(exc))
        return EXIT_FAIL
