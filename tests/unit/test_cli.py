"""What the command line prints of the LAN (peer names) reaches the terminal escaped."""

from __future__ import annotations

import json
import unicodedata
import warnings

from agent.client import render_status
from agent.cluster.peers import Peer
from agent.mdns.records import Advert, Role

with warnings.catch_warnings():  # gi's importer warns under Python 3.11; not ours to fix
    warnings.simplefilter("ignore", ImportWarning)
    from agent.discover import Found, render

# A name a hostile host advertises: set the terminal title, clear the screen, reverse the text.
HOSTILE = "k3s-sugar-dev@node1.local (server)\x1b]0;owned\x07\x1b[2J\u202egnp.exe\x9b31m\u2066"


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
