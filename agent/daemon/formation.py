"""The I/O around the formation machine: observations in, its actions carried out.

Data flows one way: browse events, publisher states, live rounds and wire proofs become calls on
the pure `Formation`; its actions become a published advert, a round, a proof, the k3s drop-in
and the gate's release; every change becomes a log event and the daemon's snapshot (status,
STATUS=). The loop waits on observations with the machine's own deadline, never polls blindly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Protocol

from agent import const
from agent.avahi import defs
from agent.cluster import k3s
from agent.cluster.election import (
    Action,
    Advertise,
    Bind,
    Formation,
    Prove,
    Release,
    RunRound,
)
from agent.cluster.peers import Change, PeerTable
from agent.cluster.probe import RefusalReason, choose_address, explain, wire_proof
from agent.cluster.view import NodeAdvert, to_node_adverts
from agent.config import Settings
from agent.daemon import ballot, local
from agent.daemon.control import DaemonState, PeerInfo
from agent.daemon.metrics import Metrics
from agent.daemon.netlink import Interface, InterfaceEvent
from agent.log import EventLog, Level
from agent.mdns import wire
from agent.mdns.records import (
    Advert,
    Advertisement,
    BrowseEvent,
    Role,
    encode_txt,
    instance_name,
    service_type,
)
from agent.verify import prereq
from agent.verify.probe import Probe


class AdvertPublisher(Protocol):
    """What the runner needs of a publisher: avahi/publisher.py, or mdns/fallback.py's."""

    on_established: Callable[[str], None] | None
    on_lost: Callable[[], None] | None

    @property
    def name(self) -> str: ...

    def set(self, advert: Advertisement | None) -> None: ...

    async def run(self) -> None: ...

    async def withdraw(self, timeout: float = ...) -> bool: ...


# A browser for this cluster's type: avahi/browser.py, or mdns/fallback.py's LiveBrowser.
BrowserFactory = Callable[[], AbstractAsyncContextManager[AsyncIterator[BrowseEvent]]]


class FormationRunner:
    """Runs the node's formation from start to serving; `wipe()` withdraws and stops it."""

    def __init__(
        self,
        *,
        settings: Settings,
        log: EventLog,
        publisher: AdvertPublisher,
        browse: BrowserFactory,
        avahi: defs.ServerState | None,
        iface: Interface,
        status_note: str = "",
        hostname: str,
        state: DaemonState,
        metrics: Metrics,
        root: Path = Path("/"),
    ) -> None:
        self._settings = settings
        self._log = log
        self._browse_factory = browse
        self._status_note = status_note  # said after every status line (the no-D-Bus path)
        self._publisher = publisher
        self._iface = iface
        self._hostname = hostname
        self._host = f"{hostname}.local"
        self._state = state
        self._metrics = metrics
        self._absence_started: float | None = None
        self._link_up = True
        self._link_flaps = 0  # link state changes seen; a round spanning one proves nothing
        self._readvertise: asyncio.TimerHandle | None = None
        self._last_advertise: Advertise | None = None
        self._root = root
        self._stype = service_type(settings.cluster, settings.env)
        self._token = k3s.parse_token(settings.token.reveal()) if settings.token else None
        self._started = time.monotonic()
        self._wake = asyncio.Event()
        self._names: dict[str, Role] = {}  # instance names we published -> their role
        self._mismatched: dict[str, str] = {}  # peer host -> the other servers= it advertises
        self._proven: dict[str, str] = {}  # server instance name -> the address that passed
        self._tasks: set[asyncio.Task[None]] = set()
        self._wiped = False
        self.released = asyncio.Event()  # the gate opened
        self.k3s_up = asyncio.Event()  # the local k3s API answers (servers only)
        self._failure: BaseException | None = None
        self._avahi = avahi
        self._table = PeerTable(settings.cluster, settings.env)
        damaged = ""
        try:
            stored = ballot.load(root)
        except ballot.BallotError as err:
            stored, damaged = None, str(err)
            log.event("ballot_damaged", "error", error=damaged)
        self._ballot = stored or ballot.Ballot.new()
        member, rejoin = self._membership(), self._rejoin()
        if rejoin:
            member = None
            log.event("rejoin", "warning", reason="server join cut short before etcd started")
        self.machine = Formation(
            host=self._host,
            key=self._ballot.key,
            servers=settings.servers,
            member=member,
            ca_on_disk=k3s.ca_on_disk(root) if member == Role.SERVER else "",
            stype=self._stype,
            can_join=self._token is not None,
            ineligible=damaged,
            rejoin=rejoin,
            agent_only=member is None and k3s.agent_only(root),
            bound=self._ballot.bound,
            bound_host=self._ballot.bound_host,
        )
        if self.machine.agent_only:
            log.event("agent_only", "notice",
                      reason="k3s-agent.service is installed and k3s.service is not")  # fmt: skip

    def _membership(self) -> Role | None:
        """SERVER or AGENT when this node released before or holds k3s state (local.py)."""
        return local.held_role(self._root, self._ballot.released)

    def _rejoin(self) -> bool:
        """Rule 8 (election.py): released as a joining server at an earlier boot (no release
        marker this boot), and its etcd never started."""
        marker = self._root / str(const.GATE_RELEASED_MARKER).lstrip("/")
        return (
            not marker.exists() and self._ballot.released == "join-server"
            and not k3s.etcd_initialized(self._root)
            and k3s.membership(self._root) != k3s.Membership.AGENT
        )

    async def _check_prerequisites(self) -> None:
        """A fresh node that cannot run k3s does not stand (members release whatever this says:
        their k3s state is theirs to keep)."""
        if self.machine.member is not None or self.machine.ineligible:
            return
        probe = dataclasses.replace(Probe.system(), root=self._root)
        reason = await asyncio.to_thread(prereq.blocking, probe)
        if reason:
            self.machine.ineligible = f"k3s cannot run here: {reason}"
            self._log.event("not_standing", "warning", reason=reason)

    async def run(self) -> None:
        """Form or join the cluster, then keep the advert and the peer table current."""
        self._publisher.on_established = self._established
        self._publisher.on_lost = self._lost
        await self._check_prerequisites()
        self._spawn(self._browse())
        while True:
            if self._failure is not None:
                raise self._failure
            now = time.monotonic()
            if not self._wiped:
                for action in self.machine.step(now):
                    await self._act(action)
            await self._publish_state()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, self.machine.wake_at(now) - time.monotonic())):
                    await self._wake.wait()
            self._wake.clear()

    def interface_changed(self, event: InterfaceEvent) -> None:
        """The link or an address changed: re-advertise the new ip4/ip6 (TXT in place)."""
        if event.link_up != self._link_up:
            self._link_flaps += 1
            self._log.event("link_up" if event.link_up else "link_down", "notice",
                            interface=event.iface.name)
        self._link_up = event.link_up
        self._metrics.link_up(event.link_up)
        if (event.iface.ip4, event.iface.ip6) != (self._iface.ip4, self._iface.ip6):
            self._log.event("address_changed", interface=event.iface.name,
                            ip4=event.iface.ip4 or None, ip6=event.iface.ip6 or None)
        old = self._iface
        lost = (old.ip4 and not event.iface.ip4) or (old.ip6 and not event.iface.ip6)
        self._iface = event.iface
        if self._readvertise is not None:
            self._readvertise.cancel()
        # An address that went away is usually replaced at once (a DHCP renewal deletes, then
        # adds): advertise the loss only if it lasts, since Avahi multicasts a record at most
        # once a second (RFC 6762 §6) and the replacement would wait behind the empty one.
        delay = const.ADDRESS_LOSS_SETTLE if lost else 0.0
        self._readvertise = asyncio.get_running_loop().call_later(delay, self._readvertise_now)
        self._wake.set()

    def _readvertise_now(self) -> None:
        self._readvertise = None
        if self._last_advertise is not None and not self._wiped:
            self._advertise(self._last_advertise)

    def avahi_changed(self, state: defs.ServerState | None) -> None:
        """avahi-daemon came, went or changed state: say so in the status."""
        self._avahi = state
        self._wake.set()

    async def wipe(self) -> bool:
        """Close the gate, withdraw every advert and stop forming until the daemon restarts.

        The gate closes first: from here on `sugarkube-agent gate` waits (k3s, started or
        restarted by systemd, waits in its ExecCondition) until a restarted daemon forms again;
        the `wipe` command then removes the state and checks the wire.
        """
        self._wiped = True
        self.released.clear()
        self._metrics.gate_released(False)
        await self._state.update(
            phase="wiped", released=False, release_mode="", release_role="", leader="",
            status="wiped: systemctl restart sugarkube-agent to form again",
        )
        withdrawn = await self._publisher.withdraw()
        self._metrics.phase("wiped")
        return withdrawn

    # -- actions ------------------------------------------------------------------------------

    async def _act(self, action: Action) -> None:
        if isinstance(action, Advertise):
            self._advertise(action)
        elif isinstance(action, Bind):
            # On disk before the advert that shows the promise: a promise forgotten at a
            # restart could be given twice. If it cannot be written the daemon stops here.
            self._ballot = dataclasses.replace(
                self._ballot, bound=action.key, bound_host=action.host
            )
            await asyncio.to_thread(ballot.save, self._root, self._ballot)
            self._log.event("bound", "notice", to=action.host, own=action.key == self.machine.key)
        elif isinstance(action, RunRound):
            if self._absence_started is None:
                self._absence_started = time.monotonic()
            self._spawn(self._round())
        elif isinstance(action, Prove):
            self._spawn(self._prove(action.advert))
        elif isinstance(action, Release):
            await self._release(action)
        else:
            if action.name == "election_won" and self._absence_started is not None:
                self._metrics.absence_gate(time.monotonic() - self._absence_started)
            level: Level = "warning" if action.name == "join_stalled" else "notice"
            self._log.event(action.name, level, **dict(action.fields))

    def _advertise(self, action: Advertise) -> None:
        self._last_advertise = action
        advert = Advert(
            cluster=self._settings.cluster, env=self._settings.env, role=action.role,
            phase=action.phase, host=self._host, leader=action.leader,
            ip4=self._iface.ip4, ip6=self._iface.ip6, key=self.machine.key, ca=action.ca,
            vote=action.vote, admit=action.admit,
            members=str(action.members) if action.members else "",
            servers=str(self._settings.servers),
        )
        name = instance_name(
            self._settings.cluster, self._settings.env, self._hostname, action.role
        )
        self._names[name] = action.role
        self._publisher.set(
            Advertisement(
                name=name, stypes=(self._stype, const.HTTPS_SERVICE_TYPE),
                port=const.K3S_API_PORT, txt=tuple(encode_txt(advert)),
                interface=self._iface.index,
            )
        )

    def _established(self, name: str) -> None:
        role = self._names.get(name.partition(" #")[0])
        if role is not None:
            self.machine.published(time.monotonic(), role)
            self._wake.set()

    def _lost(self) -> None:
        """Our advert left the wire: what the machine proved about its visibility is void."""
        self.machine.unpublished()
        self._wake.set()

    async def _round(self) -> None:
        started = time.monotonic()
        flaps = self._link_flaps
        if not self._link_up:
            # Unplugged, a round hears nothing: that is no evidence of absence.
            self.machine.round_failed(time.monotonic())
            self._wake.set()
            return
        try:
            records = await wire.live_round(self._stype, interface_addr=self._iface.mdns_addr)
        except Exception as err:  # a failed round is no evidence either way
            self.machine.round_failed(time.monotonic())
            self._log.event("absence_round_failed", "warning", error=f"{type(err).__name__}: {err}")
        else:
            await asyncio.sleep(const.NETLINK_SETTLE)  # a link drop is reported this late
            # A record heard without TXT cannot be judged: no evidence either way.
            unknown = any(not r.txt for r in records)
            if flaps != self._link_flaps or not self._link_up or unknown:
                self.machine.round_failed(time.monotonic())  # the link went down meanwhile
                self._wake.set()
                return
            adverts = to_node_adverts(records, self.machine.key)
            if self.k3s_up.is_set():  # a server that may admit joiners: what etcd says too
                counts = await asyncio.to_thread(k3s.local_members, self._root)
                if counts is not None:
                    self.machine.etcd_members(time.monotonic(), *counts)
            self.machine.round_done(started, adverts)
            self._log.event(
                "absence_round", "debug", seen=len(adverts),
                ms_elapsed=round((time.monotonic() - started) * 1000),
            )
        self._wake.set()

    async def _prove(self, advert: NodeAdvert) -> None:
        expected = self._token.ca_hash if self._token is not None else None
        result = None
        # What the advert offers: TXT ip4 (else the resolved address), TXT ip6, the resolved.
        for address in choose_address(advert.address, advert.ip6, advert.address, self._iface.name):
            result = await wire_proof(
                address, const.K3S_API_PORT, expected_ca_sha256=expected,
                timeout=const.WIRE_PROOF_TIMEOUT, capture=self._settings.mdns.wire_proof == "on",
                interface=self._iface.name,
            )
            if result.ok or result.reason == RefusalReason.CA_MISMATCH:
                break
        ok = result is not None and result.ok
        reason = result.reason.value if result is not None and result.reason else "no_address"
        why = explain(result.reason, result.detail) if result is not None else (
            "no address to dial in its advert")
        if result is not None:
            self._metrics.wire_proof(result.ms_elapsed / 1000)
        if reason == RefusalReason.CA_MISMATCH:
            self._metrics.join_refused(reason)
        if ok and result is not None:
            self._proven[advert.name] = result.address
        event = self.machine.proof_done(time.monotonic(), advert, ok, "" if ok else reason, why)
        fields = dict(event.fields)
        if result is not None:
            fields |= {"ms_elapsed": round(result.ms_elapsed), "evidence": result.evidence}
            if not ok:
                fields["detail"] = result.detail
        quiet = event.name == "server_not_serving_yet"
        level: Level = "info" if ok else "debug" if quiet else "warning"
        self._log.event(event.name, level, **fields)
        self._wake.set()

    async def _release(self, release: Release) -> None:
        # File work (with fsyncs: slow on an SD card) off the event loop.
        await asyncio.to_thread(self._write_release, release)
        elapsed = (time.monotonic() - self._started) * 1000
        agent = release.mode == "join-agent" or self.machine.member == Role.AGENT
        role = "agent" if agent else "server"
        self._log.event(
            "gate_released", mode=release.mode, role=role,
            leader=release.leader.host if release.leader else None, ms_elapsed=round(elapsed),
        )
        self._state.snapshot.timings_ms["gate_released"] = elapsed
        self.released.set()
        await self._state.update(
            released=True, release_mode=release.mode, release_role=role,
            leader=release.leader.host if release.leader else self._host,
        )
        if not agent:
            self._spawn(self._watch_local_api())

    def _write_release(self, release: Release) -> None:
        """The k3s drop-in (atomic, 0600) and the once-per-boot release marker."""
        self._operator_config_notice()
        if release.mode != "member":
            leader = release.leader
            address = self._proven.get(leader.name, leader.address) if leader else None
            k3s.write_dropin(
                self._root,
                k3s.Release(
                    mode=release.mode,
                    server_url=k3s.api_url(address) if address else None,
                    token=self._settings.token.reveal() if self._settings.token else None,
                    node_labels=(f"sugarkube.io/cluster={self._settings.cluster}",),
                ),
            )
        fresh = release.mode != "member"
        record = dataclasses.replace(
            self._ballot,
            released=release.mode if fresh else self._ballot.released,
            # What it joined under (checked at every start: local.settings_refusal), and where
            # etcd's peers know it; a member released before these were kept records them now.
            joined=self._ballot.joined if self._ballot.joined and not fresh
            else local.joined_under(self._settings),
            address=self._ballot.address if self._ballot.address and not fresh
            else self._iface.ip4 or self._iface.ip6,
        )
        if record != self._ballot and not (self.machine.ineligible and not fresh):
            # Released on disk: after a reboot this node is a member even if k3s never ran
            # (a join cut short and made again as an agent is an agent from then on). A
            # member's record is worth a line, never its release (nor a damaged ballot's file).
            try:
                ballot.save(self._root, record)
                self._ballot = record
            except ballot.BallotError as err:
                if fresh:
                    raise
                self._log.event("ballot_not_saved", "warning", error=str(err))
        marker = self._root / str(const.GATE_RELEASED_MARKER).lstrip("/")
        with contextlib.suppress(OSError):
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(release.mode + "\n")

    def _operator_config_notice(self) -> None:
        """Say so when the operator's own k3s files already decide what our drop-in writes."""
        try:
            theirs = k3s.merged_config(self._root, include_ours=False)
        except k3s.K3sConfigError as err:
            self._log.event("operator_k3s_config_unreadable", "warning", error=str(err))
            return
        decided = sorted({"server", "cluster-init", "token"} & set(theirs))
        if decided:
            self._log.event(
                "operator_k3s_config", "notice", keys=",".join(decided),
                note="k3s merges config.yaml, then config.yaml.d/ in name order: later files win",
            )

    async def _watch_local_api(self) -> None:
        delay = const.LOCAL_API_POLL
        while True:
            result = await wire_proof(
                "127.0.0.1", const.K3S_API_PORT, expected_ca_sha256=None, timeout=1.0
            )
            if result.ok and result.ca_sha256:
                self.machine.local_api(time.monotonic(), result.ca_sha256)
                self.k3s_up.set()
                elapsed = (time.monotonic() - self._started) * 1000
                self._log.event("k3s_serving", ms_elapsed=round(elapsed))
                self._wake.set()
                return
            # k3s takes from a second (the lab) to a minute (a Pi's first start) to answer.
            await asyncio.sleep(delay)
            delay = min(delay * 2, const.LOCAL_API_POLL_MAX)

    # -- the browser --------------------------------------------------------------------------

    async def _browse(self) -> None:
        async with self._browse_factory() as browser:
            async for event in browser:
                record = event.record
                if record is None:
                    continue
                change = self._table.gone(record) if event.kind == "removed" else (
                    self._table.seen(record)
                )
                if change is None:
                    continue
                self._observe(change)
                _log_change(self._log, change, event.ms_elapsed)
                if change.kind == "added":
                    self._metrics.discovery(event.ms_elapsed / 1000)
                    self._state.snapshot.timings_ms.setdefault("discovery", event.ms_elapsed)
                self._wake.set()

    def _observe(self, change: Change) -> None:
        now = time.monotonic()
        peer = change.peer
        if change.kind == "removed" or peer is None:
            self.machine.advert_gone(now, change.name)
            return
        if change.kind == "ignored":
            return
        a = peer.advert
        if a.servers and int(a.servers) != self._settings.servers:
            if self._mismatched.get(a.host) != a.servers:
                self._log.event("settings_mismatch", "warning", peer=a.host,
                                peer_servers=a.servers, servers=self._settings.servers)  # fmt: skip
            self._mismatched[a.host] = a.servers
        else:
            self._mismatched.pop(a.host, None)
        self.machine.advert_seen(now, NodeAdvert(
            change.name, a.host, a.role, a.key, a.ca, a.ip4 or peer.address, a.phase, a.vote,
            a.admit, int(a.members or 0), a.ip6,
        ))

    # -- plumbing -----------------------------------------------------------------------------

    async def _publish_state(self) -> None:
        m = self.machine
        if self._wiped:
            return
        peers = [
            PeerInfo(p.name, p.advert.host, p.advert.role.value, p.advert.phase)
            for p in self._table.peers if not p.local
        ]
        snap = self._state.snapshot
        role = self._advertised_role()
        avahi = self._avahi.name.lower() if self._avahi is not None else "absent"
        status = m.status
        if self._avahi != defs.ServerState.RUNNING and not m.released:
            status = "avahi-daemon unavailable, retrying"
        if not self._link_up:
            status = f"link down on {self._iface.name}: waiting for the network"
        status += self._status_note + self._moved_note() + "".join(
            f"; {host} runs with servers={n}, this node {self._settings.servers}: set "
            "SUGARKUBE_SERVERS alike on every node" for host, n in sorted(self._mismatched.items())
        )
        new = (m.phase.value, status, role, peers, avahi)
        if (snap.phase, snap.status, snap.role, snap.peers, snap.avahi) != new:
            self._metrics.phase(m.phase.value)
            self._metrics.gate_released(m.released is not None)
            self._metrics.avahi_up(self._avahi == defs.ServerState.RUNNING)
            self._metrics.peers(Counter(p.role for p in peers))
            self._metrics.join_stalled(m.stalled)
            if snap.status != status:
                self._log.event("phase", phase=m.phase.value, status=status)
            await self._state.update(
                phase=m.phase.value, status=status, role=role, peers=peers, avahi=avahi
            )

    def _moved_note(self) -> str:
        """A server whose address is not the one it joined with: etcd's peers dial the old one
        (home DHCP after a power cut hands out another lease)."""
        joined_at = self._ballot.address
        if not joined_at or self.machine.member == Role.AGENT or joined_at in (
            self._iface.ip4, self._iface.ip6
        ) or self._advertised_role() == Role.AGENT.value:
            return ""
        return (
            "; this node's address changed since it joined: etcd's peers know it by the old "
            "one (give it a fixed DHCP lease, or wipe and join it again)"
        )

    def _advertised_role(self) -> str:
        return self._names[self._publisher.name].value if self._publisher.name in self._names else (
            "candidate"
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A component died: re-raise in run() so the TaskGroup takes the daemon down.
            self._failure = task.exception()
            self._wake.set()

    async def close(self) -> None:
        """Cancel the runner's own tasks."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _log_change(log: EventLog, change: Change, ms_elapsed: float) -> None:
    if change.kind == "ignored":
        log.event("record_ignored", "notice", name=change.name, reason=change.reason)
        return
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

