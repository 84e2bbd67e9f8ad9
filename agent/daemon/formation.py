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
import secrets
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

from agent import const
from agent.avahi import defs
from agent.bounded import Bounded
from agent.cluster import k3s
from agent.cluster.election import (
    Action,
    Advertise,
    Bind,
    Prove,
    Release,
    RunRound,
)
from agent.cluster.probe import (
    NO_ADDRESS,
    NO_CA,
    RefusalReason,
    explain,
    prove_advert,
    wire_proof,
)
from agent.cluster.view import NodeAdvert, to_node_adverts
from agent.config import Settings
from agent.daemon import ballot
from agent.daemon import release as release_io
from agent.daemon.control import DaemonState
from agent.daemon.metrics import Metrics
from agent.daemon.netlink import Interface, InterfaceEvent
from agent.daemon.peerwatch import BrowserFactory, PeerWatch
from agent.log import EventLog, Level
from agent.mdns import wire
from agent.mdns.auth import boot_nonce
from agent.mdns.records import (
    Advert,
    Advertisement,
    Role,
    encode_txt,
    instance_name,
    service_type,
)
from agent.tokens import parse_token
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
        self._token = parse_token(settings.token.reveal()) if settings.token else None
        self._auth = settings.advert_key()
        self._started = time.monotonic()
        self._wake = asyncio.Event()
        self._names: dict[str, Role] = {}  # instance names we published -> their role
        # server instance name -> (the address that passed its proof, the CA it served)
        self._proven: dict[str, tuple[str, str]] = Bounded(const.PEER_TABLE_MAX)
        self._tasks: set[asyncio.Task[None]] = set()
        self._wiped = False
        self.released = asyncio.Event()  # the gate opened
        self.k3s_up = asyncio.Event()  # the local k3s API answers (servers only)
        self._failure: BaseException | None = None
        self._avahi = avahi
        self._ballot, self._damaged, self.machine = release_io.machine_from_disk(
            root, settings, host=self._host, can_join=self._token is not None, log=log
        )
        self._boot = boot_nonce(int(self._ballot.starts), secrets.token_hex(4))
        self._peers = PeerWatch(
            settings, self.machine, log=log, metrics=metrics, state=state, woken=self._wake.set,
            root=root,
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
        if not self._damaged:
            # The start count on disk before the first advert: this start's `boot=` compares
            # above every earlier one, whatever power cut follows.
            try:
                await asyncio.to_thread(ballot.save, self._root, self._ballot)
            except ballot.BallotError as err:
                self._log.event("ballot_unsaved", "warning", error=str(err))
        await self._check_prerequisites()
        self._spawn(self._peers.run(self._browse_factory))
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
            servers=str(self._settings.servers), boot=self._boot,
        )
        name = instance_name(
            self._settings.cluster, self._settings.env, self._hostname, action.role
        )
        self._names[name] = action.role
        txt = encode_txt(advert)
        if self._auth is not None:
            txt = self._auth.sign(name, const.K3S_API_PORT, txt)
        self._publisher.set(
            Advertisement(
                name=name, stypes=(self._stype, const.HTTPS_SERVICE_TYPE),
                port=const.K3S_API_PORT, txt=tuple(txt), interface=self._iface.index,
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
            records = await wire.live_round(
                self._stype, interface_addr=self._iface.mdns_addr, complete=True
            )
        except Exception as err:  # a failed or incomplete round is no evidence either way
            self.machine.round_failed(time.monotonic())
            self._log.event("absence_round_failed", "warning", error=f"{type(err).__name__}: {err}")
        else:
            await asyncio.sleep(const.NETLINK_SETTLE)  # a link drop is reported this late
            if flaps != self._link_flaps or not self._link_up:
                self.machine.round_failed(time.monotonic())  # the link went down meanwhile
                self._wake.set()
                return
            adverts, ignored = to_node_adverts(records, self.machine.key, self._peers.judge)
            self._peers.ignored(ignored)
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
        # The CA the token goes to: the token's own pin, else the authenticated advert's `ca=`.
        pinned = (self._token.ca_hash if self._token is not None else None) or advert.ca
        result = None
        if pinned:
            result = await prove_advert(
                advert.address, advert.ip6, interface=self._iface.name,
                expected_ca_sha256=pinned, capture=self._settings.mdns.wire_proof == "on",
            )
        ok = result is not None and result.ok
        if result is not None:
            reason = result.reason.value if result.reason else ""
            why = explain(result.reason, result.detail)
        else:
            reason, why = ("no_address", NO_ADDRESS) if pinned else (
                RefusalReason.UNAUTHENTICATED.value, NO_CA)
        if result is not None:
            self._metrics.wire_proof(result.ms_elapsed / 1000)
        if reason in (RefusalReason.CA_MISMATCH, RefusalReason.UNAUTHENTICATED):
            self._metrics.join_refused(reason)
        if ok and result is not None and result.ca_sha256:
            self._proven[advert.name] = (result.address, result.ca_sha256)
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
        leader = release.leader
        self._ballot = await asyncio.to_thread(
            release_io.write, self._root, release, settings=self._settings, iface=self._iface,
            server=self._proven.get(leader.name) if leader else None,
            stored=self._ballot, damaged=self._damaged, log=self._log,
        )
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
            if not self.machine.ca_on_disk:
                ca = await asyncio.to_thread(k3s.ca_on_disk, self._root)
                if ca:
                    self.machine.ca_written(ca)
                    self._wake.set()
            # k3s takes from a second (the lab) to a minute (a Pi's first start) to answer.
            await asyncio.sleep(delay)
            delay = min(delay * 2, const.LOCAL_API_POLL_MAX)

    # -- plumbing -----------------------------------------------------------------------------

    async def _publish_state(self) -> None:
        m = self.machine
        if self._wiped:
            return
        peers = self._peers.peers()
        snap = self._state.snapshot
        role = self._advertised_role()
        avahi = self._avahi.name.lower() if self._avahi is not None else "absent"
        status = m.status
        if self._avahi != defs.ServerState.RUNNING and not m.released:
            status = "avahi-daemon unavailable, retrying"
        if not self._link_up:
            status = f"link down on {self._iface.name}: waiting for the network"
        if m.member != Role.AGENT and role != Role.AGENT.value:
            status += release_io.moved_note(self._ballot, self._iface)
        status += await self._peers.split_note() + self._status_note + self._peers.mismatch_note()
        status += self._peers.ignored_note()
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
