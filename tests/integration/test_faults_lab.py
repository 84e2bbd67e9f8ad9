"""The fault suite on real daemons: every scenario ends with one cluster, as etcd says.

One round of each in `make test`; SUGARKUBE_FAULT_ROUNDS more (default 5) in `make test-all`.
Each scenario failed on the election before quorum and promises (tests/integration/faults.py
says how); now none may split, and no join may be refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.faults import SCENARIOS, Outcome, joiner_dies_as_a_learner

pytestmark = pytest.mark.lab

ROUNDS = int(os.environ.get("SUGARKUBE_FAULT_ROUNDS", "5"))


def _check(result: Outcome) -> None:
    print(result)
    assert not result.split_brain, result
    assert result.cluster_inits == 1, result
    assert result.failed_joins == 0, result


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fault(lab_factory, tmp_path: Path, name: str) -> None:
    _check(SCENARIOS[name](lab_factory(3), tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(ROUNDS))
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_fault_rounds(lab_factory, tmp_path: Path, name: str, round_: int) -> None:
    _check(SCENARIOS[name](lab_factory(3), tmp_path))


@pytest.mark.slow
def test_a_joiner_dead_as_a_learner_holds_the_next_join_until_k3s_removes_it(
    lab_factory, tmp_path: Path
) -> None:
    result = joiner_dies_as_a_learner(lab_factory(3), tmp_path)
    _check(result)
    assert result.formed_s >= 290, result  # it waited for k3s's removal, 5 min, not 120 s
