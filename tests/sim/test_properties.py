"""The election under random schedules, checked the way consensus code is checked.

Hypothesis draws schedules (nodes, arrivals, loss, k3s speed, faults: tests/sim/strategies.py),
the simulator runs each one (tests/sim/world.py), and every property is checked over the whole
run (tests/sim/outcome.py). A failure is shrunk to its shortest schedule, printed as a
Schedule(...) that tests/sim/test_regressions.py can keep.

One property per test, so that a defect the machine has today is marked on its own test while
the others keep guarding. The tests share one seed and one cache of outcomes: each schedule is
simulated once. `make test` runs 500 schedules, `make test-all` 20 000 more (marked slow).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings

from tests.sim.outcome import Outcome
from tests.sim.schedule import Schedule
from tests.sim.strategies import schedules
from tests.sim.world import World

SEED = 6762  # fixed, with no example database: the default run is the same every time
QUICK = settings(
    max_examples=500, database=None, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
MANY = settings(QUICK, max_examples=20_000)
# A property the machine is known to break is marked xfail, not strict: whether 500 schedules
# meet a rare defect depends on details of the machine that have nothing to do with it, so the
# strict check is the defect's own schedule in test_regressions.py. Nor is it shrunk: that
# schedule is the shrunk one. Drop both marks once those regressions pass.
UNSHRUNK = (Phase.explicit, Phase.reuse, Phase.generate)

_outcomes: dict[Schedule, Outcome] = {}


def run(schedule: Schedule) -> Outcome:
    """The schedule's outcome, simulated once per session."""
    outcome = _outcomes.get(schedule)
    if outcome is None:
        outcome = _outcomes[schedule] = World(schedule).run()
    return outcome


def one_cluster(schedule: Schedule) -> None:
    o = run(schedule)
    assert not (o.split_brain and o.guaranteed), o.problems()


def servers_bounded(schedule: Schedule) -> None:
    o = run(schedule)
    assert o.servers_max <= schedule.servers, o.problems()


def no_failed_join(schedule: Schedule) -> None:
    o = run(schedule)
    assert not o.failed_joins, o.problems()


def ineligible_never_released(schedule: Schedule) -> None:
    o = run(schedule)
    assert not o.ineligible_released and not o.ineligible_k3s, o.problems()


def released_within_bound(schedule: Schedule) -> None:
    o = run(schedule)
    assert not o.liveness_failed, o.problems()


FAILED_JOINS = (
    "several faults at once: a re-flashed bootstrapper's old member (a voter down for good) "
    "holds an admitted joiner's MemberAdd past its 120 s turn, and the next admitted one "
    "overtakes it (two of 5000; test_regressions.py, a dead voter)"
)


@seed(SEED)
@QUICK
@given(schedules())
def test_never_two_clusters(schedule: Schedule) -> None:
    one_cluster(schedule)


@seed(SEED)
@settings(QUICK, phases=UNSHRUNK)
@given(schedules())
def test_never_more_servers_than_wanted(schedule: Schedule) -> None:
    servers_bounded(schedule)


@pytest.mark.xfail(strict=False, reason=FAILED_JOINS)
@seed(SEED)
@settings(QUICK, phases=UNSHRUNK)
@given(schedules())
def test_no_failed_joins(schedule: Schedule) -> None:
    no_failed_join(schedule)


@seed(SEED)
@QUICK
@given(schedules())
def test_a_node_that_cannot_run_k3s_is_never_released(schedule: Schedule) -> None:
    ineligible_never_released(schedule)


@seed(SEED)
@QUICK
@given(schedules())
def test_every_node_up_is_released_within_the_bound(schedule: Schedule) -> None:
    released_within_bound(schedule)


@pytest.mark.slow
@seed(SEED + 1)
@MANY
@given(schedules())
def test_never_two_clusters_many(schedule: Schedule) -> None:
    one_cluster(schedule)


@pytest.mark.slow
@seed(SEED + 1)
@settings(MANY, phases=UNSHRUNK)
@given(schedules())
def test_never_more_servers_than_wanted_many(schedule: Schedule) -> None:
    servers_bounded(schedule)


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=FAILED_JOINS)
@seed(SEED + 1)
@settings(MANY, phases=UNSHRUNK)
@given(schedules())
def test_no_failed_joins_many(schedule: Schedule) -> None:
    no_failed_join(schedule)


@pytest.mark.slow
@seed(SEED + 1)
@MANY
@given(schedules())
def test_a_node_that_cannot_run_k3s_is_never_released_many(schedule: Schedule) -> None:
    ineligible_never_released(schedule)


@pytest.mark.slow
@seed(SEED + 1)
@settings(MANY, phases=UNSHRUNK)
@given(schedules())
def test_every_node_up_is_released_within_the_bound_many(schedule: Schedule) -> None:
    released_within_bound(schedule)
