"""Cluster formation, pure: targeted cases, and a simulated LAN of N nodes under hypothesis."""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cluster.election import (
    Advertise,
    Event,
    Formation,
    NodeAdvert,
    Phase,
    Prove,
    Release,
    RunRound,
    Timings,
)
from agent.cluster.gate import AbsenceGate
from agent.mdns.records import Role

# -- the absence gate ---------------------------------------------------------------------------


def test_gate_needs_two_spaced_absent_rounds() -> None:
    gate = AbsenceGate(rounds_needed=2, min_gap=1.0)
    gate.observe(0.0, present=False)
    assert not gate.passed
    gate.observe(0.5, present=False)  # too soon after the first: does not count
    assert gate.absent_rounds == 1
    gate.observe(1.0, present=False)
    assert gate.passed


def test_gate_presence_resets() -> None:
    gate = AbsenceGate(rounds_needed=2, min_gap=1.0)
    gate.observe(0.0, present=False)
    gate.observe(1.0, present=True)
    assert gate.absent_rounds == 0
    assert gate.next_round_at() is None
    gate.observe(2.0, present=False)
    assert not gate.passed
    gate.observe(3.0, present=False)
    assert gate.passed


@given(st.lists(st.tuples(st.floats(0, 100), st.booleans()), max_size=30))
def test_gate_passes_only_after_two_spaced_absences_since_last_presence(
    rounds: list[tuple[float, bool]],
) -> None:
    gate = AbsenceGate(rounds_needed=2, min_gap=1.0)
    rounds.sort()
    for started, present in rounds:
        gate.observe(started, present)
    tail: list[float] = []
    for started, present in rounds:
        if present:
            tail = []
        elif not tail or started - tail[-1] >= 1.0:
            tail.append(started)
    assert gate.passed == (len(tail) >= 2)


# -- targeted cases -----------------------------------------------------------------------------


# Fixed windows, so that the targeted cases do not follow tuning of agent/const.py.
TIMINGS = Timings(settle=2.0, candidate_hold=3.0, confirm=1.0, dead_hold=10.0,
                  bootstrap_retry=0.5, view_settle=0.15)


def _node(host: str = "a.local", key: str = "5", servers: int = 3, **kw: object) -> Formation:
    return Formation(host=host, key=key, servers=servers, stype="_k3s-sugar-dev._tcp",  # type: ignore[arg-type]
                     timings=TIMINGS, **kw)


def _ad(host: str, role: Role, key: str = "", ca: str = "") -> NodeAdvert:
    return NodeAdvert(f"k3s-sugar-dev@{host} ({role})", host, role, key, ca, "10.0.0.9")


def _kinds(actions: list[object]) -> list[type]:
    return [type(a) for a in actions]


def test_member_releases_at_once_without_election() -> None:
    f = _node(member=Role.SERVER)
    actions = f.step(0.0)
    assert actions == [Release("member")]
    assert f.phase == Phase.MEMBER
    f.local_api("ca1")
    assert Advertise(Role.SERVER, Phase.SERVING, "a.local", "ca1") in f.step(0.1)


def test_a_failed_round_is_asked_for_again_only_after_round_retry() -> None:
    """A round that fails at once (no address, sockets refused) must not be retried in a loop:
    seen on qemu-user, where every round failed in microseconds, as 300 warnings a second."""
    f = _node()
    f.step(0.0)
    f.published(1.0, Role.CANDIDATE)
    assert RunRound() in f.step(1.0)
    f.round_failed(1.0)
    assert RunRound() not in f.step(1.001)
    assert f.wake_at(1.001) <= 1.0 + f.timings.round_retry
    assert RunRound() in f.step(1.0 + f.timings.round_retry)
    f.round_failed(2.0)  # and again: the same pace
    assert RunRound() not in f.step(2.5)


def test_lone_node_bootstraps_after_settle_absence_and_confirm() -> None:
    f = _node()
    assert Advertise(Role.CANDIDATE, Phase.DISCOVER) in f.step(0.0)
    f.published(1.0, Role.CANDIDATE)
    assert RunRound() in f.step(1.0)
    assert "absence 0/2" in f.status
    f.round_done(1.0, [])
    assert RunRound() not in f.step(1.5)  # the gap: a second round may not count before 2.0
    assert RunRound() in f.step(2.0)
    f.round_done(2.0, [])
    assert f.step(2.6) == []  # gate passed, settle (2 s after 1.0) not over yet
    actions = f.step(3.0)
    assert Advertise(Role.BOOTSTRAP, Phase.BOOTSTRAP, leader="a.local") in actions
    assert any(isinstance(a, Event) and a.name == "election_won" for a in actions)
    f.published(4.0, Role.BOOTSTRAP)
    assert f.step(4.5) == []  # confirm window
    assert RunRound() in f.step(5.0)
    f.round_done(5.0, [])
    assert f.step(5.5) == [Release("cluster-init")]
    assert f.status == "released: cluster-init"


def test_single_server_cluster_bootstraps_without_cluster_init() -> None:
    f = _node(servers=1)
    _run_alone(f)
    assert f.released == Release("single")


def _run_alone(f: Formation) -> None:
    t = 0.0
    f.step(t)
    f.published(t, Role.CANDIDATE)
    while f.released is None and t < 20:
        for action in f.step(t):
            if isinstance(action, RunRound):
                f.round_done(t, [])
            if isinstance(action, Advertise):
                f.published(t, action.role)
        t += 0.25


def test_lower_key_candidate_makes_us_wait_even_while_it_renames() -> None:
    f = _node(key="5")
    f.step(0.0)
    f.published(0.0, Role.CANDIDATE)
    lower = _ad("b.local", Role.CANDIDATE, key="1")
    f.advert_seen(lower)
    assert RunRound() not in f.step(3.0)
    assert "b.local has a lower election key" in f.status
    f.advert_gone(3.0, lower.name)  # it renames to (bootstrap): re-probing, ~1 s unseen
    f.step(4.0)
    assert f.phase == Phase.DISCOVER
    assert "b.local" in f.status
    bootstrapper = _ad("b.local", Role.BOOTSTRAP, key="1")
    f.advert_seen(bootstrapper)
    assert f.step(4.5) == [Prove(bootstrapper)]  # joined as soon as its API answers
    event = f.proof_done(4.6, bootstrapper, ok=False, reason="unreachable")
    assert event.name == "bootstrap_not_serving_yet"
    assert f.step(4.7) == []
    assert "waiting for bootstrap node b.local" in f.status
    assert f.step(5.1) == [Prove(bootstrapper)]  # asked again after the short retry
    f.proof_done(5.2, bootstrapper, ok=True)
    assert f.step(5.2) == [Release("join-server", bootstrapper)]


def test_live_round_seeing_lower_candidate_resets_the_gate() -> None:
    f = _node(key="5")
    f.step(0.0)
    f.published(0.0, Role.CANDIDATE)
    f.step(0.0)
    f.round_done(0.0, [])
    f.step(1.0)
    f.round_done(1.0, [_ad("c.local", Role.CANDIDATE, key="9")])  # a higher key: no matter
    f.step(1.1)
    assert f._gate.absent_rounds == 2
    g = _node(key="5")
    g.step(0.0)
    g.published(0.0, Role.CANDIDATE)
    g.step(0.0)
    g.round_done(0.0, [])
    g.step(1.0)
    g.round_done(1.0, [_ad("b.local", Role.CANDIDATE, key="1")])
    g.step(1.1)
    assert g._gate.absent_rounds == 0
    # The browser missed it; the live round did not.
    assert "b.local has a lower election key" in g.status
    g.step(1.0 + 5.0 + 3.1)  # seen only live: ages out (5 s) like a vanished candidate (3 s hold)
    assert g.phase == Phase.ELECT


def test_bootstrappers_meeting_the_higher_key_yields() -> None:
    f = _node(key="5")
    _to_bootstrap(f)
    f.advert_seen(_ad("b.local", Role.BOOTSTRAP, key="1"))
    actions = f.step(10.0)
    assert Advertise(Role.CANDIDATE, Phase.DISCOVER) in actions
    assert any(isinstance(a, Event) and a.name == "bootstrap_yielded" for a in actions)
    assert f.released is None


def test_bootstrapper_ignores_higher_keyed_rival_and_candidates() -> None:
    f = _node(key="5")
    _to_bootstrap(f)
    f.advert_seen(_ad("b.local", Role.BOOTSTRAP, key="9"))
    f.advert_seen(_ad("c.local", Role.CANDIDATE, key="1"))
    t = 10.0
    while f.released is None and t < 20:
        for action in f.step(t):
            if isinstance(action, RunRound):
                f.round_done(
                    t, [_ad("b.local", Role.BOOTSTRAP, "9"), _ad("c.local", Role.CANDIDATE, "1")]
                )
        t += 0.25
    assert f.released == Release("cluster-init")


def _to_bootstrap(f: Formation) -> None:
    t = 0.0
    f.step(t)
    f.published(t, Role.CANDIDATE)
    while f.phase != Phase.BOOTSTRAP:
        for action in f.step(t):
            if isinstance(action, RunRound):
                f.round_done(t, [])
        t += 0.25
    f.published(t, Role.BOOTSTRAP)


def test_server_advert_is_proven_then_joined_as_server_or_agent() -> None:
    f = _node(servers=2)
    f.step(0.0)
    server = _ad("s.local", Role.SERVER, key="1", ca="c" * 64)
    f.advert_seen(server)
    actions = f.step(0.1)
    assert actions == [Prove(server)]
    assert f.step(0.2) == []  # one proof at a time
    f.proof_done(0.3, server, ok=True)
    assert f.step(0.3) == [Release("join-server", server)]
    assert f.status == "joined https://s.local:6443"

    g = _node(servers=2)
    g.advert_seen(server)
    g.advert_seen(_ad("t.local", Role.SERVER, key="2"))
    g.step(0.0)
    g.proof_done(0.1, server, ok=True)
    assert g.step(0.1) == [Release("join-agent", server)]
    assert Advertise(Role.AGENT, Phase.SERVING, "s.local") in g.step(0.2)


def test_ca_mismatch_is_refused_for_good_and_unreachable_held_down() -> None:
    f = _node()
    f.step(0.0)
    impostor = _ad("evil.local", Role.SERVER, key="0")
    f.advert_seen(impostor)
    assert f.step(0.0) == [Prove(impostor)]
    event = f.proof_done(0.1, impostor, ok=False, reason="ca_mismatch")
    assert event.name == "join_refused"
    assert Prove(impostor) not in f.step(100.0)
    dead = _ad("dead.local", Role.SERVER, key="1")
    f.advert_seen(dead)
    assert f.step(1.0) == [Prove(dead)]
    assert f.proof_done(1.1, dead, ok=False, reason="unreachable").name == "wire_proof_failed"
    assert Prove(dead) not in f.step(2.0)
    assert f.phase in (Phase.DISCOVER, Phase.ELECT)  # a dead server does not block the election
    assert Prove(dead) in f.step(11.2)  # retried after the hold-down


# -- a simulated LAN ----------------------------------------------------------------------------

PUBLISH = 0.9  # s: Avahi probe + announce
SEEN = 0.1  # s: browser latency after an announcement
GOODBYE = 1.0  # s: removal seen after a goodbye (TTL 1 s)
ROUND = 0.5  # s: a live round's window
PROOF = 0.05
K3S_START = 0.5


@dataclass(order=True)
class _Ev:
    at: float
    seq: int
    fn: object = field(compare=False)


@dataclass
class _Sim:
    n: int
    servers: int
    starts: list[float]
    keys: list[str]
    loss: float = 0.0
    rng: random.Random = field(default_factory=lambda: random.Random(1))
    queue: list[_Ev] = field(default_factory=list)
    seq: itertools.count = field(default_factory=itertools.count)  # type: ignore[type-arg]
    now: float = 0.0

    def __post_init__(self) -> None:
        self.nodes = [
            Formation(host=f"n{i}.local", key=self.keys[i], servers=self.servers, stype="_t._tcp")
            for i in range(self.n)
        ]
        self.started = [False] * self.n
        self.adverts: list[NodeAdvert | None] = [None] * self.n  # established on the wire
        self.ca: list[str | None] = [None] * self.n
        self.serving = [False] * self.n
        self.inits: list[int] = []
        for i, t in enumerate(self.starts):
            self.at(t, lambda i=i: self.start(i))

    def at(self, t: float, fn: object) -> None:
        heapq.heappush(self.queue, _Ev(t, next(self.seq), fn))

    def lost(self) -> bool:
        return self.rng.random() < self.loss

    def start(self, i: int) -> None:
        self.started[i] = True
        for ad in self.adverts:  # a new browser learns what is already announced
            if ad is not None and not self.lost():
                self.at(self.now + SEEN, lambda ad=ad: self.seen(i, ad))
        self.step(i)

    def step(self, i: int) -> None:
        f = self.nodes[i]
        for action in f.step(self.now):
            self.act(i, action)
        wake = f.wake_at(self.now)
        self.at(wake, lambda: self.step(i))

    def act(self, i: int, action: object) -> None:
        f = self.nodes[i]
        if isinstance(action, Advertise):
            old = self.adverts[i]
            self.adverts[i] = None
            if old is not None:
                for j in self.others(i):
                    self.at(self.now + GOODBYE, lambda j=j, name=old.name: self.gone(j, name))
            ad = NodeAdvert(f"{f.host} ({action.role})", f.host, action.role, f.key,
                            action.ca, f.host, action.phase)
            if old is not None and old.name == ad.name:  # a TXT update in place
                self.adverts[i] = ad
                for j in self.others(i):
                    if not self.lost():
                        self.at(self.now + SEEN, lambda j=j: self.seen(j, ad))
                return

            def established(ad: NodeAdvert = ad, role: Role = action.role) -> None:
                self.adverts[i] = ad
                f.published(self.now, role)
                for j in self.others(i):
                    if not self.lost():
                        self.at(self.now + SEEN, lambda j=j: self.seen(j, ad))

            self.at(self.now + PUBLISH, established)
        elif isinstance(action, RunRound):
            started = self.now
            live = [a for j, a in enumerate(self.adverts) if a and j != i and not self.lost()]
            self.at(self.now + ROUND, lambda: (f.round_done(started, live), self.step(i)))
        elif isinstance(action, Prove):
            j = next(k for k, g in enumerate(self.nodes) if g.host == action.advert.host)
            ok = self.serving[j]
            self.at(self.now + PROOF, lambda: (f.proof_done(self.now, action.advert, ok,
                                                            "" if ok else "unreachable"),
                                               self.step(i)))
        elif isinstance(action, Release):
            if action.mode in ("cluster-init", "single"):
                self.inits.append(i)
                ca = f"ca-of-{i}"
            else:
                assert action.leader is not None
                leader = next(k for k, g in enumerate(self.nodes) if g.host == action.leader.host)
                ca = self.ca[leader]
                assert ca is not None, "joined a node that serves no CA"
            self.ca[i] = ca

            def serving(ca: str = ca) -> None:
                self.serving[i] = True
                f.local_api(ca)
                self.step(i)

            self.at(self.now + K3S_START, serving)

    def others(self, i: int) -> list[int]:
        return [j for j in range(self.n) if j != i and self.started[j]]

    def seen(self, j: int, ad: NodeAdvert) -> None:
        if self.adverts[self.nodes.index(next(g for g in self.nodes if g.host == ad.host))] == ad:
            self.nodes[j].advert_seen(ad)
            self.step(j)

    def gone(self, j: int, name: str) -> None:
        self.nodes[j].advert_gone(self.now, name)
        self.step(j)

    def run(self, until: float = 120.0) -> None:
        budget = 200_000
        while self.queue and budget:
            budget -= 1
            ev = heapq.heappop(self.queue)
            if ev.at > until:
                break
            self.now = ev.at
            ev.fn()  # type: ignore[operator]
            if all(self.ca) and all(f.phase == Phase.SERVING for f in self.nodes):
                break


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(2, 5),
    jitter=st.sampled_from([2.0, 15.0]),
    seed=st.integers(0, 2**32 - 1),
)
def test_simulated_lan_without_loss_forms_exactly_one_cluster(
    n: int, jitter: float, seed: int
) -> None:
    rng = random.Random(seed)
    starts = [rng.uniform(0, jitter) for _ in range(n)]
    keys = [f"{rng.getrandbits(64):016x}" for _ in range(n)]
    sim = _Sim(n, servers=3, starts=starts, keys=keys, rng=rng)
    sim.run()
    assert len(sim.inits) == 1, f"cluster-init on {sim.inits}"
    assert len(set(sim.ca)) == 1 and None not in sim.ca, sim.ca
    modes = sorted(f.released.mode for f in sim.nodes if f.released)
    # Never fewer servers than wanted. More is possible (documented in election.py): a node that
    # starts while a joiner renames to "(server)" sees neither of its adverts for ~1 s.
    assert modes.count("join-server") >= min(n, 3) - 1
    if jitter <= 2.0:
        assert modes.count("join-server") == min(n, 3) - 1


@pytest.mark.parametrize("seed", range(40))
def test_simulated_lan_with_5_percent_loss_never_splits(seed: int) -> None:
    rng = random.Random(seed)
    starts = [rng.uniform(0, 2) for _ in range(3)]
    keys = [f"{rng.getrandbits(64):016x}" for _ in range(3)]
    sim = _Sim(3, servers=3, starts=starts, keys=keys, loss=0.05, rng=rng)
    sim.run()
    assert len(sim.inits) == 1
    assert len(set(sim.ca)) == 1 and None not in sim.ca


def test_one_node_of_three_never_arrives_the_others_still_form() -> None:
    sim = _Sim(3, servers=3, starts=[0.0, 1.0, 10_000.0], keys=["3", "2", "1"])
    sim.run(until=60)
    assert len(sim.inits) == 1
    assert sim.ca[0] is not None and sim.ca[0] == sim.ca[1]


def test_server_slot_waits_for_the_rest_of_a_cold_browse() -> None:
    f = _node(servers=3)
    first = _ad("s1.local", Role.SERVER, key="1")
    f.advert_seen(first)
    assert f.step(0.0) == [Prove(first)]
    f.proof_done(0.02, first, ok=True)
    assert f.step(0.02) == []  # proven, but the view is 20 ms old: hold the server slot
    assert "counting servers" in f.status
    f.advert_seen(_ad("s2.local", Role.SERVER, key="2"))
    f.advert_seen(_ad("s3.local", Role.SERVER, key="3"))
    assert f.wake_at(0.05) <= 0.15
    assert f.step(0.15) == [Release("join-agent", first)]
