"""Running the agent and our probes inside lab nodes, and waiting on what they print."""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tests.lab import Node

ROOT = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"  # Debian's, with Debian's libraries: what the image runs
T = TypeVar("T")


def node_env(**extra: str) -> dict[str, str]:
    """A clean environment for a process in a node: our code on the path, no pyenv."""
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "PYTHONPATH": str(ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    return env


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.05) -> T:
    """Poll probe until it returns something truthy; AssertionError naming what, on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


class Agent:
    """`python3 -m agent ARGS` in a node (after `wrapper`, e.g. setpriv), stderr in a log file."""

    def __init__(
        self, node: Node, log: Path, *args: str, env: dict[str, str] | None = None,
        wrapper: Sequence[str] = (),
    ):
        self.node = node
        self.log = log
        self.started_at = time.monotonic()
        self.proc = node.spawn(
            *wrapper, PYTHON, "-m", "agent", *(args or ("run",)), log=log,
            env=node_env(**{"SUGARKUBE_CLUSTER": "sugar", "SUGARKUBE_ENV": "dev", **(env or {})}),
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def events(self, name: str) -> list[dict[str, str]]:
        """Every logged event of that name, as key=value dicts."""
        found = []
        for line in self.text().splitlines():
            fields = parse_event(line)
            if fields.get("event") == name:
                found.append(fields)
        return found

    def wait_event(self, event: str, timeout: float, /, **match: str) -> dict[str, str]:
        def probe() -> dict[str, str] | None:
            for fields in self.events(event):
                if all(fields.get(k) == v for k, v in match.items()):
                    return fields
            return None

        try:
            return wait_for(f"event={event} {match} in {self.log.name}", probe, timeout)
        except AssertionError as err:
            raise AssertionError(f"{err}; log tail:\n{self.tail()}") from None

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> int:
        self.proc.terminate()
        return self.proc.wait(timeout)


_PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S*)')


def parse_event(line: str) -> dict[str, str]:
    """key=value pairs of one log line (journald priority prefix and quotes removed)."""
    line = re.sub(r"^<\d>", "", line.strip())
    return {
        key: value[1:-1].encode().decode("unicode_escape") if value.startswith('"') else value
        for key, value in _PAIR.findall(line)
    }


class Probe:
    """A long-running JSON-lines probe in a node (browse_probe or publish_probe)."""

    def __init__(self, node: Node, module: str, *args: str, stdin: bool = False) -> None:
        self.proc = node.spawn(
            PYTHON, "-m", f"tests.integration.{module}", *args, env=node_env(),
            stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.expect(lambda line: line.get("kind") == "ready" or line.get("ready"), 15)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                self.lines.put(json.loads(raw))
            except ValueError:
                print(f"probe printed: {raw!r}", file=sys.stderr)

    def send(self, **step: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(step) + "\n").encode())
        self.proc.stdin.flush()
        return self.expect(lambda line: "done" in line, 20)

    def expect(self, match: Callable[[dict[str, Any]], Any], timeout: float) -> dict[str, Any]:
        """The next line (from now) that matches, read within timeout."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                break
            self.seen.append(line)
            if match(line):
                return line
        raise AssertionError(f"probe saw no matching line in {timeout:g} s; saw {self.seen[-8:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


def avahi_browse(node: Node, stype: str) -> list[list[str]]:
    """Resolved lines of the stock `avahi-browse -rpt` (fields split, IPv4 and IPv6)."""
    done = node.run("avahi-browse", "-rpt", stype, timeout=15)
    return [line.split(";") for line in done.stdout.splitlines() if line.startswith("=;")]


def txt_of_browse_line(fields: Sequence[str]) -> list[str]:
    """The TXT strings of one avahi-browse -p line, in wire order (it prints them reversed)."""
    return list(reversed(re.findall(r'"((?:[^"\\]|\\.)*)"', ";".join(fields[9:]))))


def unescape_browse(text: str) -> str:
    """avahi-browse -p escapes bytes as \\DDD (decimal) and '.' and '\\' with a backslash."""
    return re.sub(
        r"\\(\d{3}|.)", lambda m: chr(int(m[1])) if m[1].isdigit() else m[1], text
    )


def node_ip6(node: Node) -> str:
    """The node's first IPv6 address on eth0 (link-local in the lab)."""
    done = node.run("ip", "-j", "-6", "addr", "show", "dev", "eth0", check=True)
    infos: Iterator[dict[str, Any]] = iter(json.loads(done.stdout)[0]["addr_info"])
    return next(info["local"] for info in infos)


def env_without_pyenv() -> dict[str, str]:
    """os.environ minus what would put pyenv's python in front of Debian's."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYENV")}
