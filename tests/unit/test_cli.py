"""The command line's output and log: library logs and tracebacks go through the redactor with
the node's salt, and what the LAN says (peer names) reaches the terminal escaped."""

from __future__ import annotations

import json
import os
import subprocess
import unicodedata
import warnings
from pathlib import Path

import pytest

from agent import cli, const
from agent.client import render_status
from agent.cluster.peers import Peer
from agent.log import EventLog, Redactor
from agent.mdns.records import Advert, Role

with warnings.catch_warnings():  # gi's importer warns under Python 3.11; not ours to fix
    warnings.simplefilter("ignore", ImportWarning)
    from agent import discover as discover_module
    from agent.discover import Found, render

REPO = Path(__file__).resolve().parents[2]
TOKEN = "lab-token-0123456789"  # no k3s token shape: only the configured secret removes it
ADDRESS = "10.1.2.3"
SALT = b"n" * const.LOG_SALT_SIZE  # the node's, as the daemon created it
# A name a hostile host advertises: set the terminal title, clear the screen, reverse the text.
HOSTILE = "k3s-sugar-dev@node1.local (server)\x1b]0;owned\x07\x1b[2J\u202egnp.exe\x9b31m\u2066"

# `python3 -m agent verify`, with verify's work replaced by every way text reaches stderr.
EVERYTHING = f"""
import asyncio, logging, runpy, sys, threading, warnings
from pathlib import Path
from agent import const
from agent.verify import command

def everything(args, report_path):
    logging.getLogger("zeroconf").warning("no reply from %s", "{ADDRESS}")
    scapy = logging.getLogger("scapy")  # scapy adds a handler of its own at import
    scapy.addHandler(logging.StreamHandler())
    scapy.warning("MAC address to reach destination not found for %s", "{ADDRESS}")
    warnings.warn("cannot bind {ADDRESS}")

    def glib():
        raise OSError("lost {ADDRESS} with {TOKEN}")

    thread = threading.Thread(target=glib, name="glib")
    thread.start()
    thread.join()

    async def fail():
        raise ConnectionError("{ADDRESS} refused {TOKEN}")

    async def main():
        task = asyncio.get_running_loop().create_task(fail())
        await asyncio.sleep(0.01)
        del task

    asyncio.run(main())
    raise RuntimeError("cannot join {ADDRESS} with {TOKEN}")

const.STATE_DIR = Path(sys.argv[1])
command.run = everything
sys.argv = ["sugarkube-agent", "verify", "--config", sys.argv[2]]
runpy.run_module("agent", run_name="__main__")
"""


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A node's salt and an agent.yaml holding the token; the agent.yaml's path."""
    (tmp_path / "redact-salt").write_bytes(SALT)
    monkeypatch.setattr(const, "STATE_DIR", tmp_path)
    config = tmp_path / "agent.yaml"
    config.write_text(f"token: {TOKEN}\n")
    config.chmod(0o600)
    return config


def test_no_address_or_token_reaches_stderr_whatever_prints_it(node: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    done = subprocess.run(
        ["/usr/bin/python3", "-c", EVERYTHING, str(node.parent), str(node)],
        cwd=REPO, env={**env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    err = done.stderr
    assert done.returncode == 1, err
    assert ADDRESS not in err and TOKEN not in err, err
    pseudonym = Redactor(SALT)(ADDRESS)
    for line in err.splitlines():
        assert line.startswith(("event=", "MAC address")), line  # the latter: scapy's handler
        assert pseudonym in line, line
    for expected in (
        "event=library_log logger=zeroconf",
        "event=library_log logger=scapy",
        "event=library_log logger=py.warnings",
        "event=uncaught_exception thread=glib",
        "message=\"Task exception was never retrieved\"",
        "event=uncaught_exception exception=RuntimeError",
    ):
        assert expected in err, expected
    assert "Traceback (most recent call last):\\n" in err


def test_discover_logs_with_the_nodes_salt(
    node: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def nothing_found(
        settings: object, timeout: float, log: EventLog
    ) -> tuple[list[Found], float]:
        log.event("record_ignored", "notice", address=ADDRESS)
        return [], 1.0

    monkeypatch.setattr(discover_module, "discover", nothing_found)
    assert cli.main(["discover", "--config", str(node)]) == const.EXIT_FAIL
    err = capsys.readouterr().err
    assert f"address={Redactor(SALT)(ADDRESS)}" in err  # as the daemon's log names it


def assert_terminal_safe(text: str) -> None:
    unsafe = [c for c in text if c not in "\n " and unicodedata.category(c)[0] in "CZ"]
    assert not unsafe, unsafe


def test_discover_prints_names_from_the_lan_escaped() -> None:
    advert = Advert("sugar", "dev", Role.SERVER, "serving\x1b[8m", "node1.local")
    found = [Found(Peer(HOSTILE, "node1.local\x1b[8m", "10.0.0.1", advert, False), 6443, 12.0)]
    text = render(found, 20.0, "_k3s-sugar-dev._tcp", as_json=False)
    assert_terminal_safe(text)
    assert text.startswith("k3s-sugar-dev@node1.local (server)\\x1b]0;owned\\x07\\x1b[2J\\u202e")
    as_json = render(found, 20.0, "_k3s-sugar-dev._tcp", as_json=True)
    assert_terminal_safe(as_json)
    assert json.loads(as_json)["servers"][0]["name"] == HOSTILE


def test_status_prints_names_from_the_lan_escaped() -> None:
    snapshot = {
        "phase": "electing", "role": "candidate", "released": False, "avahi": "running",
        "status": f"waiting for {HOSTILE}", "leader": HOSTILE,
        "degraded": {"metrics": f"bind failed\x1b[2J{HOSTILE}"},
        "peers": [{"name": HOSTILE, "role": "server", "phase": "serving\x1b[8m"}],
    }
    text = render_status(snapshot)
    assert_terminal_safe(text)
    assert "  k3s-sugar-dev@node1.local (server)\\x1b]0;owned" in text
