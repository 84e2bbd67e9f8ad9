"""Cluster formation as one pure state machine: observations and `now` in, actions out.

Shape: the lowest live candidate after a settle window (DESIGN.md §A "Election", shape b).

- A node that already holds cluster state is a *member*: the gate is released at once.
- A fresh node publishes `role=candidate` with a random election key and browses. A server
  advert that passes the wire proof is joined (as a server while fewer than `servers` servers
  exist, else as an agent); a `role=bootstrap` advert is waited for and joined once it serves.
- With no server and no bootstrapper, the candidate whose key is the lowest it has seen waits
  out the settle window (longer than Avahi's probe-and-announce, so every candidate that started
  by then is visible) and the double-absence gate: two live rounds on the wire, >= 1 s apart,
  that see no server, no bootstrapper and no lower key. It then publishes `role=bootstrap`,
  confirms for a window in which every other bootstrapper must become visible, backs off to a
  lower-keyed bootstrapper if one shows, and only then releases the gate with `cluster-init`.

Why two bootstrappers cannot happen without loss: two candidates A < B that started within each
other's settle window both see each other's adverts (announced before the window ends), so B
waits for A. A candidate's advert disappears while it renames to `(bootstrap)` (the role is part
of the instance name, and the new name must be probed again, ~1 s): that is why a candidate seen
within CANDIDATE_HOLD still counts. A node that starts later sees the bootstrapper's advert and
joins it. If A and B both reach `bootstrap`, each sees the other within the confirm window and
the higher key backs off before either has released its gate.

Under message loss, a split needs B to miss all of A's announcements (Avahi sends several) for
the whole settle window, both live rounds to miss A's answer or B's question, and the confirm
window and its live round to miss A's bootstrap advert, on both sides at once. With
independent loss p per packet that is of the order of p ** 8 (5 % loss: ~4e-11 per pair of
nodes); the lab runs 10 formations at 5 % loss per node. What bounds the damage if it happens
anyway: each bootstrapper serves its own CA, and a node with a secure (K10) token joins only the
CA its token names, so no node joins the wrong one of two clusters.

Servers or agents: a joiner takes a server slot while the servers, the joiners announcing
`phase=join`, and the waiting candidates with lower keys number fewer than `servers`; else it
joins as an agent. A node that starts during another joiner's rename to `(server)` (~1 s in which
neither of its names is on the wire) can take a slot twice: the bound is one extra server per
such overlap, never fewer servers than wanted.

When one node of three never arrives, the others do not wait for it: the first to finish the
election bootstraps and the other joins; the missing node joins whenever it comes up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal

from agent import const
from agent.cluster.gate import AbsenceGate
from agent.mdns.records import Role

ReleaseMode = Literal["member", "cluster-init", "single", "join-server", "join-agent"]


class Phase(StrEnum):
    """Where the node is in forming or joining the cluster."""

    MEMBER = "member"  # held cluster state at start
    DISCOVER = "discover"  # browsing, settle window running
    ELECT = "elect"  # lowest key: absence rounds running
    BOOTSTRAP = "bootstrap"  # advertised bootstrap, confirming
    JOIN = "join"  # proving a server before joining it
    RELEASED = "released"  # gate released, k3s starting
    SERVING = "serving"  # the local API answers


@dataclass(frozen=True)
class NodeAdvert:
    """Another node's advert, as the browser or a live round saw it."""

    name: str
    host: str
    role: Role
    key: str = ""
    ca: str = ""
    address: str = ""  # where its 6443 is reached
    phase: str = ""


# Actions: what the I/O side must do. Plain values; the machine never waits for them.
@dataclass(frozen=True)
class Advertise:
    role: Role
    phase: Phase
    leader: str = ""
    ca: str = ""


@dataclass(frozen=True)
class RunRound:
    """Ask the wire, live, who advertises this cluster; answer with round_done()."""


@dataclass(frozen=True)
class Prove:
    """Run the wire proof against a server; answer with proof_done()."""

    advert: NodeAdvert


@dataclass(frozen=True)
class Release:
    """Write the k3s drop-in and release the gate."""

    mode: ReleaseMode
    leader: NodeAdvert | None = None


@dataclass(frozen=True)
class Event:
    """A log line (and metric) worth emitting."""

    name: str
    fields: tuple[tuple[str, object], ...] = ()


Action = Advertise | RunRound | Prove | Release | Event


@dataclass(frozen=True)
class Timings:
    """The machine's windows, in seconds; tests shrink them."""

    settle: float = const.SETTLE_WINDOW
    candidate_hold: float = const.CANDIDATE_HOLD
    confirm: float = const.BOOTSTRAP_CONFIRM
    dead_hold: float = const.DEAD_SERVER_HOLD
    bootstrap_retry: float = const.BOOTSTRAP_PROVE_RETRY
    view_settle: float = const.JOIN_VIEW_SETTLE
    round_retry: float = const.ROUND_RETRY


@dataclass
class _Seen:
    advert: NodeAdvert
    present: bool = True
    gone_at: float = 0.0
    expires: float = float("inf")  # adverts known only from a live round age out


@dataclass
class Formation:
    """The node's formation decisions; feed it observations, call step(now), do the actions."""

    host: str
    key: str
    servers: int
    member: Role | None = None  # SERVER or AGENT when the node held cluster state at start
    can_join: bool = True  # False without a token: k3s cannot join anything
    stype: str = ""
    timings: Timings = field(default_factory=Timings)
    phase: Phase = Phase.DISCOVER
    status: str = "starting"
    released: Release | None = None
    _seen: dict[str, _Seen] = field(default_factory=dict)  # by instance name
    _gate: AbsenceGate = field(default_factory=AbsenceGate)
    _published_at: float | None = None
    _published_role: Role = Role.CANDIDATE
    _round_in_flight: bool = False
    _round_retry_at: float = 0.0  # a failed round is asked for again no sooner than this
    _confirm_after: float = float("inf")  # a confirm round must start after this to count
    _confirmed: bool = False
    _proving: str | None = None
    _refused: set[str] = field(default_factory=set)
    _dead_until: dict[str, float] = field(default_factory=dict)
    _joined: NodeAdvert | None = None
    _first_seen: float | None = None  # when step() first ran with any advert known
    _local_ca: str | None = None
    _advertised: Advertise | None = None

    # -- observations -------------------------------------------------------------------------

    def advert_seen(self, advert: NodeAdvert) -> None:
        """The browser reports an advert of another node (added or updated)."""
        self._seen[advert.name] = _Seen(advert)

    def advert_gone(self, now: float, name: str) -> None:
        """The browser reports an advert removed."""
        seen = self._seen.get(name)
        if seen is not None and seen.present:
            seen.present = False
            seen.gone_at = now

    def published(self, now: float, role: Role) -> None:
        """Avahi reports our advert for `role` established (probed and announced)."""
        if role == self._published_role and self._published_at is None:
            self._published_at = now

    def round_done(self, started: float, adverts: list[NodeAdvert]) -> None:
        """A live round that started at `started` saw these adverts (ours excluded)."""
        self._round_in_flight = False
        for advert in adverts:
            # Live evidence counts even if the browser missed it (loss): a server seen here is
            # joined rather than only delaying the election round after round.
            known = self._seen.get(advert.name)
            if known is None or not known.present or known.expires != float("inf"):
                self._seen[advert.name] = _Seen(advert, expires=started + const.LIVE_SEEN_TTL)
        present = any(self._blocks(a) for a in adverts)
        if self.phase == Phase.BOOTSTRAP:
            # Only a round that started after the confirm window proves anything about it.
            self._confirmed = started >= self._confirm_after and not present
            return
        self._gate.observe(started, present)

    def round_failed(self, now: float) -> None:
        """A live round could not run: no evidence either way; another one is asked for after
        timings.round_retry (a round that fails at once, e.g. sockets refused, must not spin)."""
        self._round_in_flight = False
        self._round_retry_at = now + self.timings.round_retry

    def proof_done(self, now: float, advert: NodeAdvert, ok: bool, reason: str = "") -> Event:
        """The wire proof of a server finished; returns the event to log."""
        self._proving = None
        if ok:
            self._joined = advert
            return Event("wire_proof_passed", (("server", advert.host),))
        if reason == "ca_mismatch":
            self._refused.add(advert.name)
            return Event("join_refused", (("server", advert.host), ("reason", reason)))
        if advert.role == Role.BOOTSTRAP:
            # Not serving yet: its k3s is starting. Ask again shortly, without a warning.
            self._dead_until[advert.name] = now + self.timings.bootstrap_retry
            return Event("bootstrap_not_serving_yet", (("server", advert.host),))
        self._dead_until[advert.name] = now + self.timings.dead_hold
        return Event("wire_proof_failed", (("server", advert.host), ("reason", reason)))

    def local_api(self, ca_sha256: str) -> None:
        """The local k3s API answers on 6443, serving this CA."""
        self._local_ca = ca_sha256

    # -- decisions ----------------------------------------------------------------------------

    def step(self, now: float) -> list[Action]:
        """Everything to do now, given what was observed; call again after any observation."""
        actions: list[Action] = []
        if self._first_seen is None and self._seen:
            self._first_seen = now
        if self.member is not None and self.released is None:
            self._release(actions, Release("member"), Phase.MEMBER, "member: cluster state found")
        if self.released is not None:
            self._after_release(actions)
        elif self.phase == Phase.BOOTSTRAP:
            self._confirm(now, actions)
        elif (server := self._server_to_join(now)) is not None:
            self._join(now, server, actions)
        else:
            self._elect(now, actions)
        return actions

    def wake_at(self, now: float) -> float:
        """When step() may decide something new without a new observation."""
        if self.released is not None:
            return now + const.IDLE_WAKE  # after the release only observations matter
        candidates = [now + const.FORMATION_TICK]
        if self._published_at is not None:
            candidates.append(self._published_at + self.timings.settle)
        nxt = self._gate.next_round_at()
        if nxt is not None:
            candidates.append(nxt)
        candidates.append(self._confirm_after)
        candidates.append(self._round_retry_at)
        if self._first_seen is not None:
            candidates.append(self._first_seen + self.timings.view_settle)
        future = [t for t in candidates if t > now]
        return min(future) if future else now + const.FORMATION_TICK

    # -- the phases ---------------------------------------------------------------------------

    def _elect(self, now: float, actions: list[Action]) -> None:
        self.phase = Phase.DISCOVER
        self._advertise(actions, Advertise(Role.CANDIDATE, Phase.DISCOVER))
        if self._published_at is None:
            self.status = "discover: publishing this node's advert"
            return
        bootstrapper = self._lowest(now, Role.BOOTSTRAP)
        if bootstrapper is not None:
            self._gate.reset()
            self.status = f"waiting for bootstrap node {bootstrapper.host} to serve"
            return
        lower = self._lowest(now, Role.CANDIDATE)
        if lower is not None and lower.key < self.key:
            self._gate.reset()
            self.status = f"waiting: {lower.host} has a lower election key and bootstraps"
            return
        self.phase = Phase.ELECT
        if not self._gate.passed:
            self._request_round(now, actions)
        settled = now >= self._published_at + self.timings.settle
        if not self._gate.passed or not settled:
            self.status = (
                f"waiting: absence {self._gate.absent_rounds}/{self._gate.rounds_needed} "
                f"for {self.stype}"
            )
            return
        # Won: become the bootstrapper, then confirm nobody lower did the same.
        self.phase = Phase.BOOTSTRAP
        self._gate.reset()
        self._confirm_after = float("inf")
        self._confirmed = False
        actions.append(Event("election_won", (("key", self.key),)))
        self._advertise(actions, Advertise(Role.BOOTSTRAP, Phase.BOOTSTRAP, leader=self.host))
        self.status = "bootstrap: confirming that no other node bootstraps"

    def _confirm(self, now: float, actions: list[Action]) -> None:
        rival = self._lowest(now, Role.BOOTSTRAP)
        server = self._server_to_join(now, bootstrappers=False)
        if server is not None or (rival is not None and rival.key < self.key):
            winner = server or rival
            assert winner is not None
            actions.append(Event("bootstrap_yielded", (("to", winner.host),)))
            self.phase = Phase.DISCOVER
            self._gate.reset()
            self._advertise(actions, Advertise(Role.CANDIDATE, Phase.DISCOVER))
            self.status = f"waiting for {winner.host} to serve"
            return
        if self._published_at is None:
            return  # our bootstrap advert is not established yet
        self._confirm_after = self._published_at + self.timings.confirm
        if now < self._confirm_after:
            return
        if self._confirmed:
            mode: ReleaseMode = "single" if self.servers == 1 else "cluster-init"
            self._release(actions, Release(mode), Phase.RELEASED, f"released: {mode}")
        elif not self._round_in_flight and now >= self._round_retry_at:
            self._round_in_flight = True
            actions.append(RunRound())

    def _join(self, now: float, server: NodeAdvert, actions: list[Action]) -> None:
        if self._joined is not None and self._joined.name == server.name:
            mode: ReleaseMode = "join-server" if self._server_slot(now) else "join-agent"
            assert self._first_seen is not None
            if mode == "join-server" and now < self._first_seen + self.timings.view_settle:
                # A server slot is decided on the whole view: a cold browse hears the other
                # responders within their 20-120 ms answer delay (RFC 6762 §6) of the first.
                self.status = f"join: counting servers before joining {server.host}"
                return
            self._release(
                actions, Release(mode, server), Phase.RELEASED, f"joined https://{server.host}:6443"
            )
            return
        self.phase = Phase.JOIN
        if not self.can_join:
            self.status = f"cannot join {server.host}: no token configured (SUGARKUBE_TOKEN)"
            return
        self.status = f"join: proving {server.host}:6443"
        if self._proving is None:
            self._proving = server.name
            actions.append(Prove(server))

    def _after_release(self, actions: list[Action]) -> None:
        release = self.released
        assert release is not None
        if release.mode == "join-agent" or self.member == Role.AGENT:
            self._advertise(actions, Advertise(Role.AGENT, Phase.SERVING, self._leader_host()))
            self.status = "agent: joined the cluster"
            return
        if self._local_ca is None:
            if release.mode == "join-server":
                # Say on the wire that this node holds a server slot while k3s starts (an
                # in-place TXT update: no rename, so no gap in which the slot looks free).
                self._advertise(
                    actions, Advertise(Role.CANDIDATE, Phase.JOIN, self._leader_host())
                )
            return
        self.phase = Phase.SERVING
        self._advertise(
            actions, Advertise(Role.SERVER, Phase.SERVING, self._leader_host(), self._local_ca)
        )
        self.status = "serving: k3s API up on 6443"

    # -- helpers ------------------------------------------------------------------------------

    def _release(self, actions: list[Action], release: Release, phase: Phase, status: str) -> None:
        self.released = release
        self.phase = phase
        self.status = status
        actions.append(release)

    def _request_round(self, now: float, actions: list[Action]) -> None:
        due = max(self._gate.next_round_at() or now, self._round_retry_at)
        if not self._round_in_flight and now >= due:
            self._round_in_flight = True
            actions.append(RunRound())

    def _advertise(self, actions: list[Action], advert: Advertise) -> None:
        if advert != self._advertised:
            if self._advertised is None or advert.role != self._advertised.role:
                self._published_at = None
                self._published_role = advert.role
            self._advertised = advert
            actions.append(advert)

    def _is_us(self, advert: NodeAdvert) -> bool:
        """Our own advert. By key, not host name: two nodes may share a host name (Avahi then
        renames one of them), and each must still see the other."""
        return advert.key == self.key

    def _blocks(self, advert: NodeAdvert) -> bool:
        """Would this live advert stop us from bootstrapping?"""
        if self._is_us(advert) or advert.name in self._refused:
            return False
        if advert.role == Role.SERVER:
            return True
        if advert.role == Role.BOOTSTRAP:
            # While confirming, only a lower-keyed bootstrapper outranks us.
            return self.phase != Phase.BOOTSTRAP or advert.key < self.key
        return self.phase != Phase.BOOTSTRAP and advert.role == Role.CANDIDATE and (
            advert.key < self.key
        )

    def _present(self, now: float, hold: float) -> list[NodeAdvert]:
        return [
            s.advert for s in self._seen.values()
            if not self._is_us(s.advert) and now < s.expires
            and (s.present or now - s.gone_at < hold)
        ]

    def _lowest(self, now: float, role: Role) -> NodeAdvert | None:
        hold = self.timings.candidate_hold if role == Role.CANDIDATE else 0.0
        found = [a for a in self._present(now, hold) if a.role == role]
        return min(found, key=lambda a: (a.key, a.name)) if found else None

    def _server_to_join(self, now: float, *, bootstrappers: bool = True) -> NodeAdvert | None:
        # A bootstrapper whose API answers the wire proof has released with cluster-init: it
        # is the cluster, so joining it need not wait for its rename to "(server)" (~1 s).
        roles = (Role.SERVER, Role.BOOTSTRAP) if bootstrappers else (Role.SERVER,)
        servers = [
            a for a in self._present(now, 0.0)
            if a.role in roles and a.name not in self._refused
            and self._dead_until.get(a.name, 0.0) <= now
        ]
        if self._proving is not None:
            for a in servers:
                if a.name == self._proving:
                    return a
        if not servers:
            return None
        return min(servers, key=lambda a: (a.role != Role.SERVER, a.key, a.name))

    def _server_slot(self, now: float) -> bool:
        """Whether we join as a server: the free slots go to the lowest waiting keys."""
        present = self._present(now, self.timings.candidate_hold)
        # Nodes by key (a renamed node's old and new adverts share it; twins' host names don't).
        taken = {
            a.key or a.name for a in present
            if (a.role in (Role.SERVER, Role.BOOTSTRAP) and a.name not in self._refused)
            or (a.role == Role.CANDIDATE and a.phase == Phase.JOIN)
        }
        ahead = {
            a.key or a.name for a in present if a.role == Role.CANDIDATE and a.key < self.key
        }
        return len(taken | ahead) < self.servers

    def _leader_host(self) -> str:
        release = self.released
        if release is not None and release.leader is not None:
            return release.leader.host
        return self.host
