"""The faults DESIGN.md and the election's docstring name, one schedule each, every property
checked over the whole run (tests/sim/outcome.py). These hold today; test_regressions.py keeps
the schedules that do not."""

from __future__ import annotations

import pytest

from tests.sim.schedule import (
    BOOT,
    LOW,
    AgentRestart,
    AvahiRestart,
    Partition,
    Power,
    PowerCut,
    Schedule,
)
from tests.sim.world import World

SLOW = (25.0, 60.0)  # s from k3s start to serving on a Pi

SCENARIOS = {
    # Real Pis boot 5-15 s apart; one may never come up.
    "three_pis_apart": Schedule(starts=(0.0, 6.0, 12.0)),
    "three_pis_slow_k3s": Schedule(starts=(0.0, 6.0, 12.0), k3s=SLOW),
    "one_of_three_never_arrives": Schedule(starts=(0.0, 9.0, None)),
    "thirty_percent_loss": Schedule(starts=(0.0, 5.0, 10.0), loss=0.3),
    "seven_pis_three_servers": Schedule(starts=(0.0, 1.0, 3.0, 5.0, 8.0, 11.0, 14.0)),
    "seven_pis_five_servers": Schedule(starts=(0.0, 1.0, 3.0, 5.0, 8.0, 11.0, 14.0), servers=5),
    "single_server_and_agents": Schedule(starts=(0.0, 6.0, 12.0), servers=1),
    # Partitions at power-on, healed 40 s later.
    "partition_2_1": Schedule(starts=(0.0, 3.0, 6.0), faults=(Partition(((0, 1), (2,)), heal=40),)),
    "partition_1_1_1": Schedule(starts=(0.0, 3.0, 6.0), faults=(Partition(((0,), (1,), (2,)),
                                                                          heal=40),)),
    "one_way_partition": Schedule(starts=(0.0, 3.0, 6.0), faults=(
        Partition(((0,), (1, 2)), heal=40, oneway=True),)),
    # Power cuts: of everything once formed (the bootstrapper re-flashed or not), and mid-election.
    "power_cut_all": Schedule(starts=(0.0, 3.0, 6.0), faults=(PowerCut(at=60.0),)),
    "power_cut_all_bootstrapper_reflashed": Schedule(starts=(0.0, 3.0, 6.0), faults=(
        PowerCut(at=60.0, reflash=BOOT),)),
    "power_cut_all_as_one_stands": Schedule(starts=(0.0, 3.0, 6.0), faults=(
        PowerCut(at=0.5, after="stand"),)),
    # The bootstrapper's agent restarts, and its avahi-daemon restarts or crashes, while its k3s
    # starts.
    "bootstrapper_agent_restart_k3s_starting": Schedule(starts=(0.0, 3.0, 6.0), k3s=SLOW, faults=(
        AgentRestart(BOOT, at=1.0, off=2.0, after="release"),)),
    "bootstrapper_avahi_restart_k3s_starting": Schedule(starts=(0.0, 3.0, 6.0), k3s=SLOW, faults=(
        AvahiRestart(BOOT, at=1.0, after="release"),)),
    "bootstrapper_avahi_crash_k3s_starting": Schedule(starts=(0.0, 3.0, 6.0), k3s=SLOW, faults=(
        AvahiRestart(BOOT, at=1.0, after="release", crash=True),)),
    # The lowest-keyed node dies without a goodbye: once its advert is up, or once it stood.
    "lowest_key_dies_mid_election": Schedule(starts=(0.0, 3.0, 6.0, 7.0), faults=(
        Power(LOW, at=0.2, after="publish"),)),
    "lowest_key_dies_standing": Schedule(starts=(0.0, 3.0, 6.0, 7.0), faults=(
        Power(LOW, at=0.2, after="stand"),)),
    # A node whose k3s cannot run (memory cgroup off) never stands, votes or is released.
    "memory_cgroup_off": Schedule(starts=(0.0, 3.0, 6.0, 9.0), ineligible=(1,)),
}


@pytest.mark.parametrize("schedule", SCENARIOS.values(), ids=SCENARIOS.keys())
def test_scenario_keeps_every_property(schedule: Schedule) -> None:
    outcome = World(schedule).run()
    assert outcome.problems() == []
    assert len(outcome.cas) == 1
    assert outcome.released_in is not None, outcome.excused
