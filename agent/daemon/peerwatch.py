"""The browser's side of formation: Avahi's (or the live browser's) events become the peer
table's changes, the machine's observations, log lines and metrics.

What the browser lists is a hint, never proof of life (agent/cluster/view.py): the machine
weighs it. A peer that advertises another `servers=` than this node is reported once per value
(event settings_mismatch) and named in STATUS while it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from agent import const
from agent.bounded import Bounded
from agent.cluster.election import Formation
from agent.cluster.peers import Change, PeerTable
from agent.cluster.view import NodeAdvert
from agent.config import Settings
from agent.daemon.control import DaemonState, PeerInfo
from agent.daemon.metrics import IGNORED_REASONS, Metrics
from agent.log import EventLog
from agent.mdns.records import BrowseEvent

# A browser for this cluster's type: avahi/browser.py, or mdns/fallback.py's LiveBrowser.
BrowserFactory = Callable[[], AbstractAsyncContextManager[AsyncIterator[BrowseEvent]]]


class PeerWatch:
    """Feeds the machine what the browser sees; knows the peers `status` lists."""

    def __init__(
        self, settings: Settings, machine: Formation, *, log: EventLog, metrics: Metrics,
        state: DaemonState, woken: Callable[[], None], root: Path = Path("/"),
    ) -> None:  # fmt: skip
        self._servers = settings.servers
        self._machine = machine
        self._log = log
        self._metrics = metrics
        self._state = state
        self._woken = woken
        key = settings.advert_key()
        self._authenticated = key is not None
        self._table = PeerTable(settings.cluster, settings.env, key)
        self.judge = self._table.judge
        # peer host -> the other servers= it advertises
        self._mismatched: dict[str, str] = Bounded(const.PEER_TABLE_MAX)
        self._ignored: dict[str, str] = {}  # instance name -> why, each said once (IGNORED_MAX)
        self._root = root
        self._split_shown = ""  # the split brain last said ("" none)

    async def run(self, browse: BrowserFactory) -> None:
        """Until cancelled: every browse event, observed."""
        async with browse() as browser:
            async for event in browser:
                record = event.record
                if record is None:
                    continue
                change = self._table.gone(record) if event.kind == "removed" else (
                    self._table.seen(record)
                )
                if change is None:
                    continue
                if change.kind == "ignored":
                    self.ignored({change.name: change.reason})
                    continue
                self._observe(change)
                _log_change(self._log, change, event.ms_elapsed)
                if change.kind == "added":
                    self._metrics.discovery(event.ms_elapsed / 1000)
                    self._state.snapshot.timings_ms.setdefault("discovery", event.ms_elapsed)
                self._woken()

    def peers(self) -> list[PeerInfo]:
        """The other nodes' adverts, as `status` shows them."""
        return [
            PeerInfo(p.name, p.advert.host, p.advert.role.value, p.advert.phase)
            for p in self._table.peers if not p.local
        ]

    def ignored(self, why: dict[str, str]) -> None:
        """Adverts that must not count (browsed or heard in a live round): each logged and
        counted once, up to IGNORED_MAX names (a flood is counted in the metric only)."""
        for name, reason in why.items():
            if self._ignored.get(name) == reason:
                continue
            self._metrics.advert_ignored(_reason_label(reason))
            if name in self._ignored or len(self._ignored) < const.IGNORED_MAX:
                self._ignored[name] = reason
                self._log.event("record_ignored", "notice", name=name, reason=reason)

    def ignored_note(self) -> str:
        """What STATUS adds while adverts fail authentication, else ""."""
        forged = sum(r in _UNTRUSTED for r in self._ignored.values())
        return f"; {forged} advert(s) ignored: no valid MAC (another token, or forged)" if (
            forged) else ""

    def split_brain(self) -> dict[str, list[str]]:
        """The cluster CAs authenticated adverts name (ours included), hosts by CA hash, when
        there are two or more: two clusters under one cluster/env and token. Without a token
        anyone could forge a second CA, so nothing is said."""
        if not self._authenticated:
            return {}
        cas: dict[str, list[str]] = {}
        for p in self._table.peers:
            if p.advert.ca:
                cas.setdefault(p.advert.ca, []).append(p.advert.host)
        return cas if len(cas) > 1 else {}

    async def split_note(self) -> str:
        """What STATUS adds while two cluster CAs are advertised; when that changes, the alarm:
        event, metric, and the marker the verifier reads (written in a thread)."""
        split = self.split_brain()
        shown = "; ".join(f"CA {ca[:12]} on {', '.join(sorted(hosts))}"
                          for ca, hosts in sorted(split.items()))  # fmt: skip
        if shown != self._split_shown:
            self._split_shown = shown
            self._metrics.cluster_cas(len(split) or 1)
            if split:
                self._log.event("split_brain", "error", cas=len(split), where=shown)
            await asyncio.to_thread(_mark_split, self._root, shown)
        return f"; SPLIT BRAIN: {len(split)} clusters advertised ({shown})" if split else ""

    def mismatch_note(self) -> str:
        """What STATUS adds for peers that run with another `servers`, else ""."""
        return "".join(
            f"; {host} runs with servers={n}, this node {self._servers}: set "
            "SUGARKUBE_SERVERS alike on every node" for host, n in sorted(self._mismatched.items())
        )

    def _observe(self, change: Change) -> None:
        now = time.monotonic()
        peer = change.peer
        if change.kind == "removed" or peer is None:
            self._machine.advert_gone(now, change.name)
            return
        if change.kind == "ignored":
            return
        a = peer.advert
        if a.servers and int(a.servers) != self._servers:
            if self._mismatched.get(a.host) != a.servers:
                self._log.event("settings_mismatch", "warning", peer=a.host,
                                peer_servers=a.servers, servers=self._servers)  # fmt: skip
            self._mismatched[a.host] = a.servers
        else:
            self._mismatched.pop(a.host, None)
        self._machine.advert_seen(now, NodeAdvert(
            change.name, a.host, a.role, a.key, a.ca, a.ip4 or peer.address, a.phase, a.vote,
            a.admit, int(a.members or 0), a.ip6,
        ))


_UNTRUSTED = IGNORED_REASONS[:2]  # PeerTable.judge's reasons


def _reason_label(reason: str) -> str:
    """A metric label for why an advert was ignored: judge's word, else `unusable`."""
    return reason if reason in _UNTRUSTED else IGNORED_REASONS[2]


def _mark_split(root: Path, shown: str) -> None:
    """Write (SHOWN) or remove ("") the split-brain marker; a failure leaves the STATUS line."""
    marker = root / str(const.SPLIT_BRAIN_MARKER).lstrip("/")
    with contextlib.suppress(OSError):
        if shown:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(shown + "\n")
        else:
            marker.unlink(missing_ok=True)


def _log_change(log: EventLog, change: Change, ms_elapsed: float) -> None:
    peer = change.peer
    log.event(
        f"peer_{change.kind}",
        name=change.name,
        host=peer.advert.host if peer else None,
        target=peer.host if peer else None,
        role=peer.advert.role.value if peer else None,
        phase=peer.advert.phase if peer else None,
        local=peer.local if peer else None,
        reason=change.reason or None,
        ms_elapsed=round(ms_elapsed),
    )
