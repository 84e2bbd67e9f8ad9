"""Cluster formation, pure: the absence gate, the view of peers, and each rule of election.py.

Schedules across many nodes, faults and loss are the simulator's (tests/sim/); these are the
targeted cases, one per rule, each written so that it fails without the rule.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import const
from agent.cluster import view as v
from agent.cluster.election import (
    Advertise,
    Bind,
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
from agent.cluster.view import supporters
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


# -- helpers ------------------------------------------------------------------------------------

# Fixed windows, so that the targeted cases do not follow tuning of agent/const.py.
TIMINGS = Timings(settle=2.0, candidate_hold=3.0, dead_hold=10.0, live_ttl=5.0,
                  bootstrap_retry=0.5, round_retry=1.0, join_order_wait=120.0,
                  voter_settle=6.0, stall_warn=180.0)
KEY = {c: c * 16 for c in "0123456789abcdef"}  # readable 16-hex-digit keys: "1" < "5" < "9"


def _node(host: str = "a.local", key: str = "5", servers: int = 3, **kw: object) -> Formation:
    return Formation(host=host, key=KEY[key], servers=servers, stype="_k3s-sugar-dev._tcp",  # type: ignore[arg-type]
                     timings=TIMINGS, **kw)


def _ad(
    host: str, role: Role, key: str, *, phase: str = "", vote: str = "", ca: str = "",
    admit: str = "",
) -> NodeAdvert:
    return NodeAdvert(f"k3s-sugar-dev@{host} ({role})", host, role, KEY[key], ca, "10.0.0.9",
                      phase or {Role.CANDIDATE: v.DISCOVER, Role.BOOTSTRAP: v.BOOTSTRAPPING,
                                Role.SERVER: v.SERVING, Role.AGENT: v.SERVING}[role],
                      KEY[vote] if vote else "", KEY[admit] if admit else "")


def _events(actions: list[object]) -> list[str]:
    return [a.name for a in actions if isinstance(a, Event)]


class Lan:
    """Drives one node: its advert established at once, every round hearing `live`, every
    proof answered at once (passing for hosts in `serving`, else refused)."""

    def __init__(self, f: Formation, live: list[NodeAdvert] | None = None) -> None:
        self.f, self.live, self.t = f, live or [], 0.0
        self.serving: set[str] = set()
        self.refusal = "refused"  # the reason a proof of a host not serving fails with
        self.actions: list[object] = []

    def run(self, until: float, stop: object = None) -> list[object]:
        """Step every 0.25 s up to `until` (or until `stop(f)`); what was asked for."""
        while self.t <= until and not (stop and stop(self.f)):  # type: ignore[operator]
            for action in self.f.step(self.t):
                self.actions.append(action)
                if isinstance(action, RunRound):
                    self.f.round_done(self.t, list(self.live))
                if isinstance(action, Advertise):
                    self.f.published(self.t, action.role)
                if isinstance(action, Prove):
                    ok = action.advert.host in self.serving
                    self.f.proof_done(self.t, action.advert, ok, "" if ok else self.refusal)
            self.t += 0.25
        return self.actions


# -- rule 1: members are never invisible --------------------------------------------------------


def test_member_releases_at_once_and_advertises_a_starting_server_with_its_ca() -> None:
    f = _node(member=Role.SERVER, ca_on_disk="c" * 64)
    actions = f.step(0.0)
    assert actions[0] == Release("member")
    assert Advertise(Role.SERVER, v.STARTING, "a.local", "c" * 64, KEY["5"]) in actions
    assert f.phase == Phase.MEMBER
    assert not any(isinstance(a, RunRound) for a in actions)
    f.local_api(1.0, "d" * 64)
    # Serving, with a server slot free: live rounds, slowly, to hear joiners to admit.
    assert f.step(1.0) == [RunRound()] and f.status == "serving: k3s API up on 6443"
    f.round_done(1.0, [])
    # `serving` on the wire tells server joiners it is their turn: only once etcd would admit
    # another member (every voter connected for its health interval).
    assert f.wake_at(1.0) == 1.0 + const.ADMISSION_IDLE_ROUND
    assert f.step(1.0 + const.ADMISSION_IDLE_ROUND) == [RunRound()]
    assert f.step(1.0 + TIMINGS.voter_settle) == [
        Advertise(Role.SERVER, v.SERVING, "a.local", "d" * 64, KEY["5"])
    ]
    g = _node(member=Role.SERVER, servers=1)
    g.step(0.0)
    g.local_api(1.0, "d" * 64)
    assert g.step(1.0) == []  # one server of one: nothing to admit, no rounds


def test_a_starting_member_counts_as_a_cluster_for_fresh_nodes() -> None:
    f = _node(servers=1)
    member = _ad("m.local", Role.SERVER, "9", phase=v.STARTING)
    f.advert_seen(0.0, member)
    lan = Lan(f, [member])
    actions = lan.run(20.0)
    assert f.released is None and Bind(KEY["5"], "a.local") not in actions
    assert "waiting for m.local to serve" in f.status


# -- rule 2/3: quorum -----------------------------------------------------------------------------


def test_a_lone_node_of_three_waits_and_says_how_to_go_alone() -> None:
    f = _node()
    actions = Lan(f).run(60.0)
    assert f.released is None and not any(isinstance(a, Bind) for a in actions)
    assert f.status == (
        "waiting: 1 of 3 servers visible, 2 needed; SUGARKUBE_SERVERS=1 for a single server"
    )


def test_a_single_server_bootstraps_alone_without_cluster_init() -> None:
    f = _node(servers=1)
    actions = Lan(f).run(20.0, stop=lambda f: f.released)
    assert f.released == Release("single")
    assert actions.index(Bind(KEY["5"], "a.local")) < actions.index(Release("single"))


def test_a_bootstrapper_names_its_ca_once_k3s_wrote_it_before_its_api_serves() -> None:
    """Joiners pin the token to the advert's `ca=`: a bootstrapper whose API this node cannot
    prove yet (its clock, a slow k3s) still names the CA it holds on disk."""
    f = _node(servers=1)
    Lan(f).run(20.0, stop=lambda f: f.released)
    assert f._advertised == Advertise(Role.BOOTSTRAP, v.STARTING, "a.local", "", KEY["5"])
    f.ca_written("c" * 64)
    assert Advertise(Role.BOOTSTRAP, v.STARTING, "a.local", "c" * 64, KEY["5"]) in f.step(21.0)


def test_the_lowest_key_stands_once_a_quorum_votes_for_it_then_releases_on_an_ack() -> None:
    f = _node(key="1")
    peer = _ad("b.local", Role.CANDIDATE, "5", vote="5")
    lan = Lan(f, [peer])
    lan.run(10.0)
    assert f.phase == Phase.DISCOVER and "1 of 2 votes" in f.status  # b votes for itself
    lan.live = [_ad("b.local", Role.CANDIDATE, "5", vote="1")]
    actions = lan.run(20.0, stop=lambda f: f.phase == Phase.BOOTSTRAP)
    assert "election_won" in _events(actions)
    assert actions[-2:] == [Bind(KEY["1"], "a.local"),
                            Advertise(Role.BOOTSTRAP, v.BOOTSTRAPPING, "a.local", vote=KEY["1"])]
    lan.run(30.0)
    assert f.released is None and "1 of 3 servers agree, 2 needed" in f.status  # a vote is no ack
    lan.live = [_ad("b.local", Role.CANDIDATE, "5", phase=v.BOUND, vote="1")]
    lan.run(40.0, stop=lambda f: f.released)
    assert f.released == Release("cluster-init")


def test_a_candidate_known_only_from_the_cache_is_neither_counted_nor_waited_for() -> None:
    # Rule 4: a node that died mid-election stays in Avahi's cache for up to 75 minutes.
    f = _node(key="5")
    dead = _ad("dead.local", Role.CANDIDATE, "1", vote="1")
    f.advert_seen(0.0, dead)
    live = _ad("c.local", Role.CANDIDATE, "9", vote="5")
    lan = Lan(f, [live])
    lan.run(20.0, stop=lambda f: f.phase == Phase.BOOTSTRAP)
    assert f.phase == Phase.BOOTSTRAP  # dead.local's lower key did not make us wait for ever


def test_a_live_lower_candidate_makes_us_wait_and_we_vote_for_it() -> None:
    f = _node(key="5")
    lower = _ad("b.local", Role.CANDIDATE, "1", vote="1")
    actions = Lan(f, [lower]).run(20.0)
    assert f.phase == Phase.DISCOVER and "b.local has the lowest election key" in f.status
    assert Advertise(Role.CANDIDATE, v.DISCOVER, "b.local", vote=KEY["1"]) in actions


def test_a_free_candidate_binds_to_a_live_bootstrapper_on_disk_before_showing_it() -> None:
    f = _node(key="1")  # even a lower key: the standing bootstrapper had its quorum of votes
    boot = _ad("b.local", Role.BOOTSTRAP, "5")
    f.advert_seen(0.0, boot)
    lan = Lan(f)
    assert not any(isinstance(a, Bind) for a in lan.run(5.0))  # the cache alone proves nothing
    lan.live = [boot]
    actions = lan.run(8.0)
    bind = actions.index(Bind(KEY["5"], "b.local"))
    assert actions[bind + 1] == Advertise(Role.CANDIDATE, v.BOUND, "b.local", vote=KEY["5"])
    assert f.phase == Phase.BOUND


def test_a_bound_node_never_votes_stands_or_binds_again_and_warns_when_left_alone() -> None:
    f = _node(key="1", bound=KEY["5"], bound_host="b.local")
    other = _ad("c.local", Role.CANDIDATE, "9", vote="1")
    rival = _ad("d.local", Role.BOOTSTRAP, "3")
    lan = Lan(f, [other, rival])
    actions = lan.run(200.0)
    assert not any(isinstance(a, Bind) for a in actions)
    assert {a for a in actions if isinstance(a, Advertise)} == {
        Advertise(Role.CANDIDATE, v.BOUND, "b.local", vote=KEY["5"])
    }
    assert _events(actions).count("join_stalled") == 1
    assert "not seen for 3 min" in f.status and "wipe --yes" in f.status
    assert f.stalled


def test_a_restarted_bootstrapper_resumes_from_its_promise() -> None:
    f = _node(key="5", bound=KEY["5"], bound_host="a.local")
    acked = _ad("b.local", Role.CANDIDATE, "9", phase=v.BOUND, vote="5")
    actions = Lan(f, [acked]).run(10.0, stop=lambda f: f.released)
    assert Advertise(Role.BOOTSTRAP, v.BOOTSTRAPPING, "a.local", vote=KEY["5"]) in actions
    assert f.released == Release("cluster-init")
    assert "election_won" not in _events(actions)  # no second election


# -- rule 4/5: giving way, supporters through a chain, visibility ---------------------------------


def test_a_bootstrapper_without_quorum_gives_way_to_a_lower_one_by_binding_to_it() -> None:
    f = _node(key="5", bound=KEY["5"], bound_host="a.local")
    lower = _ad("b.local", Role.BOOTSTRAP, "1")
    actions = Lan(f, [lower]).run(5.0)
    assert "bootstrap_yielded" in _events(actions)
    assert Bind(KEY["1"], "b.local") in actions and f.bound == KEY["1"]
    assert f.released is None


def test_a_bootstrapper_gives_way_to_a_lower_one_even_with_its_quorum() -> None:
    # With servers=1 one node is a quorum: two that stood a moment apart would both release.
    for servers in (1, 3):
        f = _node(key="5", bound=KEY["5"], bound_host="a.local", servers=servers)
        lan = Lan(f, [_ad("b.local", Role.BOOTSTRAP, "1"),
                      _ad("c.local", Role.CANDIDATE, "9", phase=v.BOUND, vote="5")])
        lan.run(5.0, stop=lambda f: f.released)
        assert f.released is None
        assert f.bound == KEY["1"] and f.phase == Phase.BOUND


def test_a_lower_bootstrapper_waits_until_the_higher_one_gave_way() -> None:
    f = _node(key="1", bound=KEY["1"], bound_host="a.local", servers=1)
    higher = _ad("b.local", Role.BOOTSTRAP, "5")
    lan = Lan(f, [higher])
    lan.run(5.0, stop=lambda f: f.released)
    assert f.released is None  # every round heard another bootstrapper
    f.advert_gone(lan.t, higher.name)
    lan.live = [_ad("b.local", Role.CANDIDATE, "5", phase=v.BOUND, vote="1")]
    lan.run(lan.t + 5.0, stop=lambda f: f.released)
    assert f.released == Release("single")


def test_promises_made_to_a_bootstrapper_that_gave_way_pass_on() -> None:
    f = _node(key="1", bound=KEY["1"], bound_host="a.local", servers=5)  # needs 3
    gave_way = _ad("b.local", Role.CANDIDATE, "5", phase=v.BOUND, vote="1")
    its_ack = _ad("c.local", Role.CANDIDATE, "9", phase=v.BOUND, vote="5")
    lan = Lan(f, [gave_way])
    lan.run(5.0)
    assert f.released is None and "2 of 5 servers agree, 3 needed" in f.status
    lan.live.append(its_ack)
    lan.run(10.0, stop=lambda f: f.released)
    assert f.released == Release("cluster-init")


def test_a_bootstrapper_whose_advert_left_the_wire_proves_it_is_visible_again() -> None:
    # Rule 3: its avahi-daemon restarted; a confirmation from before must not count.
    f = _node(key="5", bound=KEY["5"], bound_host="a.local")
    f.step(0.0)
    f.published(0.0, Role.BOOTSTRAP)
    for t in (0.0, 1.0):
        if any(isinstance(a, RunRound) for a in f.step(t)):
            f.round_done(t, [])
    f.unpublished()
    f.round_done(1.5, [])  # a round while we were not on the wire
    f.advert_seen(2.0, _ad("b.local", Role.CANDIDATE, "9", phase=v.BOUND, vote="5"))
    f.round_done(2.0, [_ad("b.local", Role.CANDIDATE, "9", phase=v.BOUND, vote="5")])
    assert f.step(2.1) == [] and f.released is None
    f.published(3.0, Role.BOOTSTRAP)
    f.round_done(3.0, [_ad("b.local", Role.CANDIDATE, "9", phase=v.BOUND, vote="5")])
    assert f.step(3.1)[0] == Release("cluster-init")


@pytest.mark.parametrize("phase", [v.STARTING, v.SERVING])
def test_a_released_bootstrapper_is_a_cluster_whatever_its_key(phase: str) -> None:
    f = _node(key="5", bound=KEY["5"], bound_host="a.local")
    released = _ad("b.local", Role.BOOTSTRAP, "9", phase=phase)
    acked = _ad("c.local", Role.CANDIDATE, "3", phase=v.BOUND, vote="5")
    actions = Lan(f, [released, acked]).run(20.0)
    assert not any(isinstance(a, Release) and a.mode == "cluster-init" for a in actions)
    assert Prove(released) in actions


def test_a_vanished_server_advert_is_held_for_dead_hold() -> None:
    # Scenario of rule 3: its avahi-daemon restarts, its advert is gone for 2.5-4 s.
    f = _node(key="1")
    server = _ad("b.local", Role.SERVER, "9", phase=v.STARTING)
    f.advert_seen(0.0, server)
    f.advert_gone(1.0, server.name)
    assert server in f.view.known(10.9)
    assert server not in f.view.known(11.1)


# -- rule 6: joins ---------------------------------------------------------------------------------


def test_server_advert_is_proven_then_joined_as_server_or_agent() -> None:
    f = _node(servers=2)
    server = _ad("s.local", Role.SERVER, "1", ca="c" * 64, admit="5")
    f.advert_seen(0.0, server)
    lan = Lan(f, [server])
    lan.serving.add("s.local")
    actions = lan.run(5.0, stop=lambda f: f.released)
    assert [a for a in actions if isinstance(a, Prove)] == [Prove(server)]  # one proof at a time
    release = actions.index(Release("join-server", server))
    assert f.status == "joined https://s.local:6443"
    # Taken slot said at once, in place: a rename would hide it for ~1 s.
    assert actions[release + 1] == Advertise(Role.CANDIDATE, v.JOINING, "s.local", vote=KEY["1"])

    g = _node(servers=2)
    other = _ad("t.local", Role.SERVER, "2")
    for advert in (server, other):
        g.advert_seen(0.0, advert)
    lan = Lan(g, [server, other])
    lan.serving.add("s.local")
    actions = lan.run(5.0, stop=lambda f: f.released)
    release = actions.index(Release("join-agent", server))
    assert actions[release + 1] == Advertise(Role.AGENT, v.SERVING, "s.local", vote=KEY["1"])


def test_a_join_is_decided_on_a_live_round_started_after_the_proof() -> None:
    # Avahi's browser had only s1 (a cold cache, a healed partition); the wire has three.
    f = _node(servers=3)
    first = _ad("s1.local", Role.SERVER, "1")
    f.advert_seen(0.0, first)
    lan = Lan(f, [])
    lan.serving.add("s1.local")
    lan.run(0.9)  # proven at once; the round of t=0 started with the proof: not after it
    assert f.joins.joined == first and f.released is None
    assert f.status == "join: counting servers before joining s1.local"
    lan.live = [first, _ad("s2.local", Role.SERVER, "2"), _ad("s3.local", Role.SERVER, "3")]
    lan.run(3.0, stop=lambda f: f.released)
    assert f.released == Release("join-agent", first)


def test_a_server_join_waits_until_a_server_admits_this_node() -> None:
    f = _node(key="9", servers=5)
    server = _ad("s.local", Role.SERVER, "1", admit="5")
    other = _ad("l.local", Role.CANDIDATE, "5", phase=v.BOUND, vote="1")
    lan = Lan(f, [server, other])
    lan.serving.add("s.local")
    for advert in lan.live:
        f.advert_seen(0.0, advert)
    lan.run(60.0)
    assert f.released is None
    assert f.status == (
        "join: waiting for s.local to admit this node as a server (it admits l.local now; "
        "etcd admits one learner at a time)"
    )
    # A key it never saw (a node since gone, or unheard here) is said to be one, not no one.
    unseen = _ad("u.local", Role.SERVER, "3", admit="7")
    lan.live = [unseen, other]
    f.advert_gone(lan.t, server.name)
    f.advert_seen(lan.t, unseen)
    lan.serving.add("u.local")
    lan.run(80.0)
    assert f.status == (
        "join: waiting for u.local to admit this node as a server (it admits a node not seen "
        "here now; etcd admits one learner at a time)"
    )
    # Any server's admission will do: etcd has one learner slot, whichever server is asked.
    lan.live = [server, other]
    f.advert_seen(lan.t, server)
    f.advert_seen(lan.t, _ad("t.local", Role.SERVER, "2", admit="9"))
    lan.run(82.0, stop=lambda f: f.released)
    assert f.released == Release("join-server", server)


def _admitting(servers: int = 5, key: str = "1") -> tuple[Formation, Lan]:
    """A member server whose API answers from t=0 and whose rounds hear lan.live."""
    f = _node(key=key, servers=servers, member=Role.SERVER, ca_on_disk="c" * 64)
    lan = Lan(f)
    f.step(0.0)
    f.local_api(0.0, "c" * 64)
    return f, lan


def _admits(f: Formation) -> str:
    advert = f._advertised
    assert advert is not None
    return advert.admit


def test_the_lowest_serving_server_admits_the_lowest_live_fresh_node_one_at_a_time() -> None:
    f, lan = _admitting()
    low = _ad("l.local", Role.CANDIDATE, "5", phase=v.BOUND, vote="1")
    high = _ad("h.local", Role.CANDIDATE, "7")
    cached = _ad("c.local", Role.CANDIDATE, "3")  # in the browser only: maybe long dead
    for advert in (low, high, cached):
        f.advert_seen(0.0, advert)
    lan.live = [low, high]
    lan.run(1.0)
    assert _admits(f) == KEY["5"]  # alone so far: at once, before its voter settle
    lan.run(10.0)
    assert _admits(f) == KEY["5"]
    # The grantee takes it: released, k3s joining (an etcd learner) until it serves.
    joining = _ad("l.local", Role.CANDIDATE, "5", phase=v.JOINING, vote="1")
    f.advert_seen(lan.t, joining)
    lan.live = [joining, high]
    lan.run(40.0)
    assert _admits(f) == ""
    serving = _ad("l.local", Role.SERVER, "5")
    f.advert_gone(lan.t, joining.name)
    f.advert_seen(lan.t, serving)
    lan.live = [serving, high]
    lan.run(41.0)
    assert _admits(f) == KEY["7"]
    # A lower serving server admits instead.
    lower = _ad("z.local", Role.SERVER, "0")
    f.advert_seen(lan.t, lower)
    lan.live = [serving, high, lower]
    lan.run(43.0)
    assert _admits(f) == ""


def test_a_grant_stands_unheard_until_order_wait_then_the_grantee_goes_last() -> None:
    f, lan = _admitting()
    low = _ad("l.local", Role.CANDIDATE, "5")
    high = _ad("h.local", Role.CANDIDATE, "7")
    for advert in (low, high):
        f.advert_seen(0.0, advert)
    lan.live = [low, high]
    lan.run(1.0)
    assert _admits(f) == KEY["5"]
    lan.live = [high]  # its advert lost on the wire: the grant is not passed on for that
    lan.run(100.0)
    assert _admits(f) == KEY["5"]
    lan.live = [low, high]
    lan.run(121.5)
    assert _admits(f) == KEY["7"]  # lapsed after order_wait: the next one
    lan.run(243.0)
    assert _admits(f) == KEY["5"]  # and round again


def test_no_admission_while_a_server_is_starting_or_the_slots_are_full() -> None:
    f, lan = _admitting(servers=3)
    fresh = _ad("f.local", Role.CANDIDATE, "7")
    starting = _ad("s.local", Role.SERVER, "4", phase=v.STARTING)
    for advert in (fresh, starting):
        f.advert_seen(0.0, advert)
    lan.live = [fresh, starting]
    lan.run(10.0)
    assert _admits(f) == ""  # a restarting member: etcd's health check would refuse a join
    up = _ad("s.local", Role.SERVER, "4")
    f.advert_seen(lan.t, up)
    lan.live = [fresh, up]
    lan.run(11.0)
    assert _admits(f) == KEY["7"]
    third = _ad("t.local", Role.SERVER, "6")
    f.advert_seen(lan.t, third)
    lan.live = [fresh, up, third]
    lan.run(12.0)
    assert _admits(f) == ""  # three servers of three: it joins as an agent


def test_a_server_waits_for_its_voter_settle_before_admitting_next_to_other_servers() -> None:
    f, lan = _admitting()
    fresh = _ad("f.local", Role.CANDIDATE, "7")
    other = _ad("o.local", Role.SERVER, "4")
    for advert in (fresh, other):
        f.advert_seen(0.0, advert)
    lan.live = [fresh, other]
    lan.run(5.0)
    assert _admits(f) == ""
    lan.run(6.5)
    assert _admits(f) == KEY["7"]


def test_ca_mismatch_is_refused_for_good_and_unreachable_held_down() -> None:
    f = _node()
    f.step(0.0)
    impostor = _ad("evil.local", Role.SERVER, "0")
    f.advert_seen(0.0, impostor)
    assert Prove(impostor) in f.step(0.0)
    event = f.proof_done(0.1, impostor, ok=False, reason="ca_mismatch")
    assert event.name == "join_refused"
    assert Prove(impostor) not in f.step(100.0)
    dead = _ad("dead.local", Role.SERVER, "1")
    f.advert_seen(1.0, dead)
    assert Prove(dead) in f.step(1.0)
    assert f.proof_done(1.1, dead, ok=False, reason="unreachable").name == "wire_proof_failed"
    assert Prove(dead) not in f.step(2.0)
    assert f.phase in (Phase.DISCOVER, Phase.ELECT)  # a dead server does not block the election
    assert Prove(dead) in f.step(11.2)  # retried after the hold-down


def test_an_authenticated_server_refused_keeps_blocking_a_bootstrap_and_is_proven_again() -> None:
    """With authenticated adverts a refused server is a node of this cluster whatever its
    address serves now (an impostor took it): it is retried, and no second cluster starts."""
    f = _node(authenticated=True, servers=1)
    server = _ad("b.local", Role.SERVER, "1", ca="c" * 64)
    f.advert_seen(0.0, server)
    lan = Lan(f, [server])
    lan.refusal = "ca_mismatch"
    actions = lan.run(120.0)
    assert not any(isinstance(a, Release) for a in actions)
    assert sum(a == Prove(server) for a in actions) >= 3  # each dead_hold, again
    assert f.joins.failed is not None and f.joins.failed.reason == "ca_mismatch"


def test_a_bootstrapper_that_does_not_serve_for_minutes_is_reported_once() -> None:
    f = _node(key="5", bound=KEY["1"], bound_host="b.local")
    boot = _ad("b.local", Role.BOOTSTRAP, "1", phase=v.STARTING)
    f.advert_seen(0.0, boot)
    lan = Lan(f, [boot])
    lan.run(170.0)
    assert f.status == "waiting for b.local to serve (last proof: refused)" and not f.stalled
    actions = lan.run(200.0)
    assert _events(actions).count("join_stalled") == 1
    assert f.stalled
    assert f.status == "waiting 3 min for b.local to serve (last proof: refused)"
    lan.serving.add("b.local")
    admits = _ad("b.local", Role.BOOTSTRAP, "1", phase=v.STARTING, admit="5")
    f.advert_seen(lan.t, admits)
    lan.live = [admits]
    lan.run(203.0, stop=lambda f: f.released)
    assert not f.stalled and f.released == Release("join-server", admits)


# -- ineligible nodes ------------------------------------------------------------------------------


def test_a_node_that_cannot_run_k3s_neither_stands_nor_votes_nor_rounds() -> None:
    f = _node(servers=1, ineligible="the memory cgroup controller is off")
    actions = Lan(f).run(30.0)
    assert actions == [Advertise(Role.CANDIDATE, v.INELIGIBLE)]
    assert f.status == "not standing: the memory cgroup controller is off"
    g = _node(key="5")
    lan = Lan(g, [_ad("x.local", Role.CANDIDATE, "1", phase=v.INELIGIBLE)])
    lan.run(20.0)
    assert "1 of 3 servers visible" in g.status  # it is no candidate


def test_a_failed_round_is_asked_for_again_only_after_round_retry() -> None:
    """A round that fails at once (no address, sockets refused) must not be retried in a loop:
    seen on qemu-user, where every round failed in microseconds, as 300 warnings a second."""
    f = _node()
    assert RunRound() in f.step(0.0)
    f.round_failed(0.0)
    assert RunRound() not in f.step(0.001)
    assert f.wake_at(0.001) <= 1.0
    assert RunRound() in f.step(1.0)
    f.round_failed(1.0)
    assert RunRound() not in f.step(1.5)


# -- the view -------------------------------------------------------------------------------------


def test_the_view_tells_live_nodes_from_cached_ones() -> None:
    view = v.View(KEY["5"], v.Holds(candidate=3.0, dead=10.0, live_ttl=5.0))
    cached = _ad("c.local", Role.CANDIDATE, "1")
    view.seen(0.0, cached)
    assert view.known(1.0) == [cached] and view.live(1.0) == []
    view.heard(1.0, [cached])
    assert view.live(5.9) == [cached] and view.live(6.1) == []
    assert view.next_change(2.0) == 6.0
    renamed = _ad("c.local", Role.BOOTSTRAP, "1")
    view.gone(7.0, cached.name)
    view.seen(7.5, renamed)
    assert view.known(8.0) == [renamed]  # one node, its newest name
    assert len(view.adverts(8.0)) == 2  # both names while the old one is held


def test_supporters_follow_promises_and_survive_forged_cycles() -> None:
    live = [
        _ad("b.local", Role.CANDIDATE, "2", phase=v.BOUND, vote="1"),
        _ad("c.local", Role.CANDIDATE, "3", phase=v.BOUND, vote="2"),
        _ad("d.local", Role.CANDIDATE, "4", phase=v.BOUND, vote="9"),
        _ad("e.local", Role.CANDIDATE, "5", phase=v.DISCOVER, vote="1"),  # a vote, no promise
        _ad("x.local", Role.CANDIDATE, "7", phase=v.BOUND, vote="8"),
        _ad("y.local", Role.CANDIDATE, "8", phase=v.BOUND, vote="7"),
    ]
    assert supporters(KEY["1"], live) == {KEY["2"], KEY["3"]}
    assert supporters(KEY["7"], live) == set()  # bound itself: no root; the cycle ends


@given(st.dictionaries(st.sampled_from("0123456789"), st.sampled_from("0123456789"), max_size=10))
def test_each_node_supports_at_most_one_root(bindings: dict[str, str]) -> None:
    live = [
        _ad(f"{k}.local", Role.CANDIDATE, k, phase=v.BOUND, vote=t) for k, t in bindings.items()
    ]
    roots = {k: {r for r in "0123456789" if KEY[k] in supporters(KEY[r], live)} for k in bindings}
    assert all(len(r) <= 1 for r in roots.values()), roots


def test_a_joiner_no_round_hears_holds_admission_until_k3s_would_remove_it() -> None:
    # A joiner that lost power as a learner: its advert stays in Avahi's cache, and etcd keeps
    # it until k3s removes it (5 min without progress); a join before that is refused.
    f, lan = _admitting()
    learner = _ad("j.local", Role.CANDIDATE, "3", phase=v.JOINING)
    fresh = _ad("f.local", Role.CANDIDATE, "7")
    for advert in (learner, fresh):
        f.advert_seen(0.0, advert)
    lan.live = [learner, fresh]
    lan.run(30.0)
    assert _admits(f) == ""
    lan.live = [fresh]
    lan.run(300.0)
    assert _admits(f) == ""  # past join_order_wait
    lan.run(500.0, stop=_admits)
    assert _admits(f) == KEY["7"]
    assert 30.0 + 328.0 <= lan.t <= 30.0 + 331.0  # LEARNER_REMOVAL after it was last heard


# -- rule 8: a server join cut short before etcd started ---------------------------------------


def test_a_join_cut_short_before_etcd_started_joins_again_admitted_and_never_stands() -> None:
    # Bound to itself too: a bootstrapper that lost and joined. Its disk has the cluster's CA.
    f = _node(key="5", rejoin=True, bound=KEY["5"], bound_host="a.local")
    peer = _ad("p.local", Role.CANDIDATE, "7", vote="5")
    lan = Lan(f, [peer])
    f.advert_seen(0.0, peer)
    actions = lan.run(30.0)
    assert f.released is None and not any(isinstance(a, Bind) for a in actions)
    assert {a for a in actions if isinstance(a, Advertise)} == {
        Advertise(Role.CANDIDATE, v.BOUND, "a.local")  # neither free (no vote) nor standing
    }
    assert f.status.startswith("rejoin: a server join was cut short")
    server = _ad("s.local", Role.SERVER, "1")
    f.advert_seen(lan.t, server)
    lan.live = [server]
    lan.serving.add("s.local")
    lan.run(40.0)
    assert f.released is None and "to admit this node" in f.status
    admits = _ad("s.local", Role.SERVER, "1", admit="5")
    f.advert_seen(lan.t, admits)
    lan.live = [admits]
    lan.run(42.0, stop=lambda f: f.released)
    assert f.released == Release("join-server", admits)


# -- rule 9: a K10 token that pins a CA this node does not hold ---------------------------------


def test_a_node_whose_token_pins_another_ca_never_stands_alone_and_joins() -> None:
    f = _node(key="1", servers=1, join_only="the K10 token pins CA 0123456789ab")
    lan = Lan(f)
    actions = lan.run(60.0)
    assert f.released is None and not any(isinstance(a, Bind) for a in actions)
    assert f.status == "not standing: the K10 token pins CA 0123456789ab; waiting for a server"
    server = _ad("s.local", Role.SERVER, "5")
    f.advert_seen(lan.t, server)
    lan.live = [server]
    lan.serving.add("s.local")
    lan.run(70.0, stop=lambda f: f.released)
    assert f.released == Release("join-agent", server)  # servers=1: the one slot is taken


def test_no_admission_while_a_serving_server_goes_unheard_for_up_to_order_wait() -> None:
    # A voter that says it serves but no round hears: down, maybe (a power cut). etcd refuses
    # a member while a voter is down, and one that comes back needs 5 s connected first.
    f, lan = _admitting()
    fresh = _ad("f.local", Role.CANDIDATE, "7")
    other = _ad("o.local", Role.SERVER, "4")
    for advert in (fresh, other):
        f.advert_seen(0.0, advert)
    lan.live = [fresh, other]
    lan.run(10.0)
    assert _admits(f) == KEY["7"]
    lan.live = [fresh]
    lan.run(20.0)
    assert _admits(f) == ""
    lan.live = [fresh, other]
    lan.run(22.0)
    assert _admits(f) == KEY["7"]
    lan.live = [fresh]  # silent again: waited for afresh (from 27), at most join_order_wait
    lan.run(22.0 + 110.0)
    assert _admits(f) == ""
    lan.run(22.0 + 130.0)
    assert _admits(f) == KEY["7"]


def test_a_joiner_joins_through_the_server_that_admits_it() -> None:
    f = _node(key="5", servers=5)
    low = _ad("s.local", Role.SERVER, "1")  # maybe down: it is not the one that admits
    admitting = _ad("t.local", Role.SERVER, "2", admit="5")
    lan = Lan(f, [low, admitting])
    lan.serving |= {"s.local", "t.local"}
    for advert in lan.live:
        f.advert_seen(0.0, advert)
    lan.run(10.0, stop=lambda f: f.released)
    assert f.released == Release("join-server", admitting)


def test_etcd_says_whether_a_learner_is_pending_and_how_many_members_there_are() -> None:
    # After a power cut the admitting server may never have heard of a learner that is off;
    # its etcd (k3s's /db/info) has. And a member powered off still takes a slot.
    f, lan = _admitting(servers=3)
    fresh = _ad("f.local", Role.CANDIDATE, "7")
    f.advert_seen(0.0, fresh)
    lan.live = [fresh]
    f.etcd_members(0.0, 2, 1)
    lan.run(1.0)
    assert _admits(f) == ""  # a learner in etcd, unheard of
    f.etcd_members(lan.t, 2, 0)
    lan.run(2.0)
    assert _admits(f) == KEY["7"]
    f.etcd_members(lan.t, 3, 0)  # a third member, powered off: no slot left
    lan.run(3.0)
    assert _admits(f) == ""
    lan.run(3.0 + TIMINGS.etcd_ttl + 1.0)  # etcd's answer too old: back to what rounds hear
    assert _admits(f) == KEY["7"]
    f.etcd_members(lan.t, 3, 0)
    lan.run(lan.t + 8.0)
    advert = f._advertised
    assert advert is not None and advert.members == 3  # said on the wire, for joiners' slots


def test_a_joiner_counts_the_servers_etcd_has_not_only_those_it_sees() -> None:
    f = _node(key="9", servers=3)
    server = _ad("s.local", Role.SERVER, "1", admit="9")
    counted = NodeAdvert(server.name, server.host, server.role, server.key, server.ca,
                         server.address, server.phase, server.vote, server.admit, members=3)
    f.advert_seen(0.0, counted)
    lan = Lan(f, [counted])
    lan.serving.add("s.local")
    lan.run(10.0, stop=lambda f: f.released)
    assert f.released == Release("join-agent", counted)  # one server seen, three in etcd


def test_with_etcd_known_a_silent_joiner_is_waited_for_as_a_silent_server() -> None:
    # Cached "joining", never heard: dead before etcd added it, removed, or a voter now that
    # is down. etcd's answer says whether a learner is pending; a silent voter is waited for
    # as any silent server, join_order_wait, not until k3s would remove a learner.
    f, lan = _admitting()
    learner = _ad("j.local", Role.CANDIDATE, "3", phase=v.JOINING)
    fresh = _ad("f.local", Role.CANDIDATE, "7")
    for advert in (learner, fresh):
        f.advert_seen(0.0, advert)
    lan.live = [fresh]
    while lan.t < 130.0:
        f.etcd_members(lan.t, 2, 0)
        lan.run(lan.t + 1.0)
        if lan.t < 125.0:
            assert _admits(f) == "", lan.t
    assert _admits(f) == KEY["7"]


def test_a_lower_server_heard_under_its_joiner_name_still_admits_instead() -> None:
    # 30 % loss: the browser lists the lower node's "(server)" advert, rounds heard only its
    # "(candidate)" one from before the rename. It is heard: it admits, this one does not.
    f, lan = _admitting(key="5")
    fresh = _ad("f.local", Role.CANDIDATE, "7")
    joining = _ad("l.local", Role.CANDIDATE, "4", phase=v.JOINING)
    serving = _ad("l.local", Role.SERVER, "4")
    f.advert_seen(0.0, fresh)
    f.advert_seen(0.0, joining)
    lan.live = [fresh, joining]
    lan.run(8.0)
    f.advert_gone(lan.t, joining.name)
    f.advert_seen(lan.t, serving)
    lan.run(9.0)
    assert _admits(f) == ""


# -- agent-only nodes ----------------------------------------------------------------------------


def test_an_agent_only_node_never_stands_nor_votes_and_joins_as_an_agent_in_any_case() -> None:
    # The lowest key, alone with a quorum of free candidates voting for it: a node that can
    # run only `k3s agent` must not bootstrap (cluster-init would be ignored by k3s agent).
    f = _node(key="1", agent_only=True)
    peers = [_ad("p.local", Role.CANDIDATE, "5", vote="1"), _ad("q.local", Role.CANDIDATE, "7",
                                                                vote="1")]
    lan = Lan(f, peers)
    for advert in peers:
        f.advert_seen(0.0, advert)
    actions = lan.run(60.0)
    assert f.released is None and not any(isinstance(a, Bind) for a in actions)
    assert {a for a in actions if isinstance(a, Advertise)} == {
        Advertise(Role.CANDIDATE, v.INELIGIBLE, "a.local")  # others neither wait for nor count it
    }
    assert f.status.startswith("agent only (k3s-agent.service, no k3s.service here)")
    # A server with free slots admitting it: it still joins as an agent.
    server = _ad("s.local", Role.SERVER, "2", ca="c" * 64, admit="1")
    f.advert_seen(lan.t, server)
    lan.live = [server]
    lan.serving.add("s.local")
    lan.run(70.0, stop=lambda f: f.released)
    assert f.released == Release("join-agent", server)


def _failing(f: Formation, live: list[NodeAdvert], reason: str, why: str, until: float) -> bool:
    """Step F to UNTIL with every proof failing for REASON (WHY); whether it released."""
    t = 0.0
    while t <= until and f.released is None:
        for action in f.step(t):
            if isinstance(action, RunRound):
                f.round_done(t, list(live))
            elif isinstance(action, Advertise):
                f.published(t, action.role)
            elif isinstance(action, Prove):
                f.proof_done(t, action.advert, ok=False, reason=reason, why=why)
        t += 0.25
    return f.released is not None


def test_a_server_that_answers_but_fails_its_proof_still_blocks_bootstrap_and_says_why() -> None:
    # This node's clock is behind: the live cluster's certificate is "not yet valid" here. The
    # server is alive (it answered TLS), so its cluster exists: no bootstrap next to it.
    server = _ad("s.local", Role.SERVER, "1", ca="c" * 64)
    f = _node(servers=1)
    f.advert_seen(0.0, server)
    why = "certificate not yet valid: this node's clock is behind (...)"
    assert not _failing(f, [server], "verify_failed", why, 30.0)
    assert f.status.endswith(f"; s.local refused: {why}"), f.status
    # A dead one (nothing answered) does not block: the lone node forms alone.
    g = _node(servers=1)
    g.advert_seen(0.0, server)
    assert _failing(g, [], "unreachable", "timeout: no answer on 6443", 30.0)
    assert g.released == Release("single")


def test_the_absence_count_in_status_never_passes_what_is_needed() -> None:
    # Rounds go on counting while the settle window runs (a long one here): STATUS said 3/2.
    f = Formation(host="a.local", key=KEY["1"], servers=1, stype="_k3s-sugar-dev._tcp",
                  timings=dataclasses.replace(TIMINGS, settle=30.0))  # fmt: skip
    statuses = set()
    lan = Lan(f)
    while lan.t < 25.0:
        lan.run(lan.t + 0.25)
        statuses.add(f.status)
    assert "elect: absence 2/2 for _k3s-sugar-dev._tcp" in statuses
    assert not any(s.startswith("elect: absence 3/") for s in statuses), statuses


def test_a_grant_taken_is_done_even_when_no_slot_was_free_to_see_it_taken() -> None:
    # The last free slot's grantee joins, serves (no slot left), is wiped and comes back
    # fresh under a new key: it is admitted once its old adverts are gone, not kept waiting
    # for the old key's grant to lapse (order_wait after it was given; ~95 s in the wipe lab).
    f, lan = _admitting(servers=3)
    other = _ad("o.local", Role.SERVER, "4")
    fresh = _ad("w.local", Role.CANDIDATE, "5")
    for advert in (other, fresh):
        f.advert_seen(0.0, advert)
    lan.live = [other, fresh]
    lan.run(7.0)
    assert _admits(f) == KEY["5"]
    joining = _ad("w.local", Role.CANDIDATE, "5", phase=v.JOINING)
    f.advert_seen(lan.t, joining)
    lan.live = [other, joining]
    lan.run(20.0)
    serving = _ad("w.local", Role.SERVER, "5")
    f.advert_gone(lan.t, joining.name)
    f.advert_seen(lan.t, serving)
    lan.live = [other, serving]
    lan.run(30.0)
    assert _admits(f) == ""  # three servers of three
    f.advert_gone(lan.t, serving.name)  # wiped: goodbye packets, its state and key gone
    lan.live = [other]
    lan.run(45.0)
    again = _ad("w.local", Role.CANDIDATE, "8")
    f.advert_seen(lan.t, again)
    lan.live = [other, again]
    lan.run(50.0)
    assert _admits(f) == KEY["8"]
