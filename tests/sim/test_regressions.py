"""Counterexamples the simulator found, each as the shortest schedule that shows it.

Each test names what it exercises and, where the machine fails it today, carries an
xfail(strict=True) with the rule in agent/cluster/election.py (or joins.py) that breaks: when
the machine is fixed the test passes, strict xfail fails the run, and the mark goes. The
comment in each test tells what the machine did when the simulator found it.
`python -m tests.sim trace '<the schedule>'` prints the whole run.
"""

from __future__ import annotations

import pytest

from tests.sim.outcome import Outcome
from tests.sim.schedule import (
    BOOT,
    AgentRestart,
    AvahiRestart,
    Partition,
    Power,
    PowerCut,
    Schedule,
)
from tests.sim.world import World

SLOW = (25.0, 60.0)  # s from k3s start to serving on a Pi


def run(schedule: Schedule) -> Outcome:
    return World(schedule).run()


# -- overlapping server joins (failed joins, too many servers) ------------------------------


def test_two_nodes_that_find_a_server_at_once_do_not_both_take_the_last_slot() -> None:
    # Two servers serve; n2 and n3 boot together while the second server's rename to
    # "(server)" is being announced, so their Avahi caches hold it before their agents start.
    # Both prove it, see two servers and no one ahead of them, and release join-server in the
    # same instant without ever having advertised: four servers for three, and etcd refuses the
    # second learner ("too many learner members in cluster") until the first is promoted.
    o = run(Schedule(starts=(0.0, 0.0, 30.0, 30.0), seed=1))
    assert o.servers_max <= 3
    assert o.failed_joins == []


def test_a_bootstrapper_that_lost_and_a_candidate_do_not_join_at_once() -> None:
    # n0 waits alone; n1-n3 arrive together. n0 stands first (it has not heard n2 live yet) and
    # wins n1 and n3; n2, the lowest key, stands a moment later with no one left to back it.
    # When n0 serves, n2 (as a server: its slot) and n3 (n2 is not a candidate, so nobody is
    # ahead of it) release join-server together: etcd refuses the second learner.
    o = run(Schedule(starts=(0.0, 12.6, 12.6, 12.6), seed=24))
    assert o.failed_joins == []


def test_joiners_that_cannot_see_each_other_do_not_join_at_once() -> None:
    # n0 and n2 cannot reach each other for the first 40 s; both reach n1, back it and join it
    # 0.5 s apart. No order over mDNS among the joiners can serialise them: the serving node
    # does (it says whom it admits next, `admit=` in its advert; joins.py, admission).
    o = run(Schedule(starts=(0.0, 3.0, 6.0), faults=(Partition(((0, 2),), heal=40.0),)))
    assert o.failed_joins == []


def test_a_joiner_that_dies_as_a_learner_does_not_cause_refused_joins() -> None:
    # n0 bootstraps, n1 (next key) joins as a server and loses power 6 s after its release,
    # once etcd has it as a learner. Its "joining" advert stays in every cache (no goodbye),
    # so n2 waited join_order_wait (120 s) for it, then joined: refused ("too many learner
    # members") every 5 s until k3s dropped the dead learner 5 minutes after it stopped. Now a
    # joiner no round hears is waited for until k3s would have removed it (LEARNER_REMOVAL).
    o = run(Schedule(starts=(0.0, 0.0, 0.0, 0.0), ranks=(0, 1, 2, 3), faults=(
        Power(1, at=6.0, after="release"),)))
    assert o.failed_joins == []


def test_five_servers_a_dead_joiner_does_not_hold_the_last_one_back_for_minutes() -> None:
    # servers=5, five Pis together. n1 joins first and dies as a learner. The waits stacked:
    # n2 waited 120 s for it and was refused by etcd; n3 waited 120 s for n1, then for n2; n4,
    # last, was not released 300 s after the fault. Now each waits on n1 side by side until k3s
    # would have removed it, then they join in turn, within the stated LIVENESS_BOUND.
    o = run(Schedule(starts=(0.0, 0.0, 0.0, 0.0, 0.0), servers=5, ranks=(0, 1, 2, 3, 4),
                     faults=(Power(1, at=6.0, after="release"),)))
    assert not o.liveness_failed
    assert o.failed_joins == []


def test_a_grant_is_not_passed_on_when_the_grantees_next_advert_is_lost() -> None:
    # 30 % loss. n5 bootstraps and admits n0; n0 releases, and its "joining" advert is lost on
    # n5's side while its fresh advert ages out: n5 admitted n4 0.003 s later, and n4's join was
    # refused behind n0's learner. Now a grant stands until its node is seen to take it or
    # join_order_wait passes.
    o = run(Schedule(starts=(4.9, 2.8, 1.3, None, 11.4, 2.6, 6.9), loss=0.3, seed=8383, faults=(
        AvahiRestart(1, at=5.6, off=2.5, crash=True), AvahiRestart(1, at=5.6, off=3.1, crash=True),
        AvahiRestart(BOOT, at=3.8, off=2.6, after="bind"))))
    assert o.failed_joins == []


def test_a_learner_whose_agent_restarts_still_holds_the_next_join() -> None:
    # n3 joins (an etcd learner) and its agent restarts for 6 s: its "joining" advert, a
    # candidate's, was held only 3 s (candidate_hold), so n1 admitted n2, refused behind n3.
    # Now a joiner's advert is held as long as a server's (dead_hold).
    o = run(Schedule(starts=(6.9, 0.6, 10.1, 13.2), loss=0.02, seed=4, faults=(
        AgentRestart(3, at=13.7, off=5.9, after="publish"),)))
    assert o.failed_joins == []


def test_an_admitted_node_does_not_wait_on_its_own_order_of_joins() -> None:
    # Found while admission was built, when joiners still kept their own key order as well:
    # n5 admitted n1 while n1 waited on n6, a lower key n5 had not heard yet; the grant lapsed
    # 120 s later just as n1's own wait ended, and n1 and n6 joined together. The cluster's
    # admission is the only order a joiner follows.
    o = run(Schedule(starts=(8.3, 0.6, None, None, 13.1, 7.3, 12.8), ineligible=(2,), seed=1694,
                     faults=(AvahiRestart(0, at=55.6, off=2.5, crash=True, after="publish"),
                             Power(-2, at=0.9, off=14.4))))
    assert o.failed_joins == []


def test_a_power_cut_between_a_release_and_its_member_add_does_not_collide() -> None:
    # n3 released join-server 2.4 s before a power cut of all nodes, before its k3s asked etcd
    # to add it. After the power-on n0 serves alone and admits n2 (re-flashed); n3 came back
    # as a member, its k3s joined from its drop-in and was refused behind n2's learner. Now a
    # join cut short before etcd started is joined again, admitted (election.py, rule 8).
    o = run(Schedule(starts=(4.9, 11.2, 8.2, 10.4), seed=1590, faults=(
        PowerCut(at=9.0, off=5.6, reflash=2, after="publish", who=-1),)))
    assert o.failed_joins == []


def test_a_learner_powered_off_across_a_power_cut_holds_the_next_join() -> None:
    # n1 is an etcd learner when all lose power; n2 (the bootstrapper) comes back alone and,
    # having never heard of n1 since its boot, admitted n0: refused behind n1's learner every
    # 6 s for a minute. Now the admitting server asks its etcd (k3s's /db/info) first.
    o = run(Schedule(starts=(0.5, 7.5, 0.0, 12.8), servers=5, seed=36888, faults=(
        PowerCut(at=15.8, off=16.6, after="serve", who=2), Power(0, at=39.3, off=21.9),
        AgentRestart(0, at=24.2, off=1.6, after="release"))))
    assert o.failed_joins == []


def test_no_admission_while_a_voter_is_silent() -> None:
    # Found while etcd's answer was added, when a silent "joining" advert was no longer
    # waited for once etcd listed no learner: n3 became a voter and lost power 4 s later, its
    # advert still "joining"; n0 admitted n2, whose k3s retried its MemberAdd until n3 came
    # back and met etcd's 5 s health check. A server no round hears is waited for
    # (join_order_wait) before anyone is admitted, whatever its phase.
    o = run(Schedule(starts=(8.2, None, 9.9, 12.7), seed=7511, faults=(
        AvahiRestart(-2, at=50.6, off=3.7, after="stand"), AgentRestart(2, at=21.1, off=3.4,
        after="bind"), Power(3, at=30.6, off=36.4, after="publish"))))
    assert o.failed_joins == []


def test_two_servers_do_not_both_admit_when_one_is_heard_only_under_its_old_name() -> None:
    # No fault: 30 % loss, slow k3s, seven Pis for five servers. n4 (lower key) serves and
    # admits n5; n6's rounds had heard n4 only as "joining" (its "(server)" rename not yet
    # heard live), so n6 did not defer to it and admitted n1 too: refused behind n5's learner.
    o = run(Schedule(starts=(1.8, 6.1, 10.1, 1.8, 10.1, 12.8, 3.1), servers=5, loss=0.3,
                     k3s=SLOW, seed=1155))
    assert o.failed_joins == []


@pytest.mark.xfail(strict=True, reason=(
    "joins.py admission: a joiner whose MemberAdd a voter down for good holds back is waited "
    "for 120 s, then the next node is admitted; if that one is the re-flashed node whose old "
    "member is the dead voter (its join removes it), the first joiner's retry meets its learner"
))
def test_a_joiner_held_back_by_a_dead_voter_is_not_overtaken() -> None:
    # n4 bootstraps; after a power cut it comes back re-flashed, its old member a voter down
    # for good. n1 admits n2, whose MemberAdd etcd refuses (a voter is down) every 6 s; 120 s
    # later n1 admits the re-flashed n4, whose join removes its old member; n2's next retry
    # meets n4's learner. Real k3s refuses the re-flashed node ("duplicate node name") until the
    # operator deletes the old node, and v1.26.5+ waits on a second learner instead of exiting.
    o = run(Schedule(starts=(0.3, 12.4, 12.8, 4.1, 1.1, 4.8), servers=5, loss=0.1, seed=493,
                     ineligible=(0,), faults=(
        PowerCut(at=53.2, off=30.3, reflash=BOOT, after="release", who=4),
        Power(BOOT, at=39.9, after="release"))))
    assert o.failed_joins == []


def test_a_join_cut_short_does_not_make_a_fourth_server() -> None:
    # n2 releases join-server 1.3 s before a power cut of all nodes (its k3s had not asked
    # anyone yet), n5 (the bootstrapper) comes back re-flashed. n2 returns as a cut-short join;
    # n6 and n4 take the two free slots first, and n2 joins as an agent, but its ballot kept
    # "released: join-server" from the first release: four servers for three on record, and
    # a cut-short server join again at its next boot. The ballot now keeps the latest release.
    o = run(Schedule(starts=(9.6, 1.4, 5.0, 2.4, 14.6, 7.4, 13.0), loss=0.1, seed=34131,
                     faults=(PowerCut(at=9.6, off=5.2, reflash=5, after="stand", who=BOOT),
                             PowerCut(at=9.6, off=5.2, reflash=5, after="stand", who=BOOT))))
    assert o.servers_max <= 3


def test_a_server_release_that_never_reached_k3s_takes_no_slot() -> None:
    # n4 released join-server and lost power for good in the same instant. The others formed
    # three servers without it (n0 admitted the next joiner once n4's grant lapsed, etcd
    # listing no learner), and the run was counted four servers for three: n4 took nothing,
    # and were it to return it would join again, admitted (rule 8). Counted now: nodes whose
    # k3s took a server's state, and releases of this boot.
    o = run(Schedule(starts=(0.7, 0.0, 12.8, None, 0.8, 10.7, 14.6), loss=0.1, seed=1571,
                     faults=(Power(4, at=0.0, after="release"),)))
    assert o.servers_max <= 3
    assert o.problems() == []


# -- two clusters beyond the proven bound (more fresh nodes than `servers`) -----------------
# The docstring's proof covers at most `servers` fresh nodes; beyond it, it says, "two sides
# of a partition at power-on that each hold q nodes can each bootstrap; without a partition the
# lowest key wins". These runs have no partition.


def test_no_fault_five_pis_ten_percent_loss_one_cluster() -> None:
    # Five Pis, servers=3, 10 % loss, no fault. n1 and n4 both stand; n4 (lower) wins n0 and n2
    # and releases; n3 missed n4's bootstrap advert and backs n1, which releases 0.8 s after n4
    # although its browser lists n4 "bootstrap, starting": in the hold-down after a refused
    # proof, cluster_known says no cluster. Two clusters, both live.
    o = run(Schedule(starts=(3.7, 4.1, 0.0, 6.2, 4.9), loss=0.1, seed=0))
    assert len(o.cas) == 1


def test_avahi_crash_on_the_bootstrapper_while_k3s_starts_one_cluster() -> None:
    # Four Pis, servers=3, no loss. n0 and n1 form (n1 bootstraps, k3s slow); n2 and n3 arrive
    # and wait for n1 to serve. n1's avahi-daemon crashes 8 s after its release (no goodbye,
    # back 3 s later): rounds stop hearing it, the proofs of its cached advert are refused, and
    # n2 and n3 elect and bootstrap a second cluster.
    o = run(Schedule(starts=(0.0, 0.0, 5.0, 5.0), k3s=SLOW, faults=(
        AvahiRestart(BOOT, at=8.0, after="release", crash=True),)))
    assert len(o.cas) == 1


def test_a_bootstrapper_that_dies_after_minting_and_returns_leaves_one_cluster() -> None:
    # n1 bootstraps with n0's support and loses power right after minting its CA; n2 and n3
    # arrive, wait for it to serve, then bootstrap a cluster of their own (n0 joins it). n1
    # comes back 60 s later as a member of its own cluster: two clusters, both serving.
    o = run(Schedule(starts=(0.0, 0.0, 4.5, 4.5), faults=(Power(BOOT, at=7.1, off=60.0),)))
    assert o.coexisting == 1


def test_single_server_four_pis_powered_together_one_cluster() -> None:
    # servers=1 (one server, the rest agents), four Pis within a second, no loss. n0 stands
    # before a live round heard n3; n3 (lower) stands 0.5 s later; both have their quorum of one
    # and release. Every servers=1 run is beyond the proof's bound (two fresh nodes > 1).
    o = run(Schedule(starts=(0.0, 0.0, 0.1, 0.9), servers=1, seed=36162))
    assert len(o.cas) == 1


# -- holds today: kept so that it keeps holding ----------------------------------------------


def test_a_new_cluster_whose_only_member_is_reflashed_is_gone_for_good() -> None:
    # n0 bootstraps and is re-flashed (power cut) before anyone joined: its CA dies with its
    # disk. n2, which had stood too (beaten), bootstraps after the power-on with n0's new
    # identity behind it. Two CAs were minted but only one cluster ever has a member after the
    # cut: beyond the bound (a re-flashed node that had promised counts again), not a split.
    o = run(Schedule(starts=(0.0, 0.0, 1.0), faults=(
        PowerCut(at=5.0, off=1.0, reflash=BOOT, after="publish"),)))
    assert o.coexisting == 1
    assert o.problems() == []
