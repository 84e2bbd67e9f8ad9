"""The stand-in's pure parts: learner bookkeeping and the promote-or-evict tick, join answers."""

from __future__ import annotations

import pytest

from tests.lab.k3s import cli
from tests.lab.k3s.const import LEARNER_MAX_STALL, TOO_MANY_LEARNERS, seconds_from_env
from tests.lab.k3s.etcd import EtcdError, Member, Status, initial_cluster
from tests.lab.k3s.learners import LearnerManager, Progress, track
from tests.lab.k3s.server import node_of, refusal_reason

LEADER, LEARNER = 1, 2


def member(id_: int, name: str, address: str, learner: bool = False) -> Member:
    return Member(id_, name, (f"http://{address}:2380",), (), learner)


class FakeGateway:
    """The calls LearnerManager makes, answered from a member list; promotions can be refused."""

    def __init__(self, members: list[Member], *, leader: bool = True, ready: bool = True) -> None:
        self.list = members
        self.leader = leader
        self.ready = ready
        self.promoted: list[int] = []
        self.removed: list[int] = []

    def status(self) -> Status:
        return Status(7, LEADER, LEADER if self.leader else 3, False, 10)

    def members(self) -> tuple[int, list[Member]]:
        return 7, self.list

    def promote(self, member_id: int) -> None:
        if not self.ready:
            raise EtcdError("etcdserver: can only promote a learner member which is in sync")
        self.promoted.append(member_id)

    def remove(self, member_id: int) -> None:
        self.removed.append(member_id)


def manager(gateway: FakeGateway, clock: list[float]) -> LearnerManager:
    return LearnerManager(gateway, tick=15.0, clock=lambda: clock[0])  # type: ignore[arg-type]


def test_progress_starts_over_for_a_new_learner_and_moves_only_on_growth() -> None:
    first = member(LEARNER, "", "10.0.0.2", learner=True)
    progress = track(None, first, None, now=100.0)
    assert progress == Progress(LEARNER, 0, 100.0, 100.0)
    assert track(progress, first, None, now=115.0) == progress  # unreachable: no progress
    grown = track(progress, first, 5, now=130.0)
    assert (grown.applied, grown.since, grown.seen) == (5, 130.0, 100.0)
    assert track(grown, first, 5, now=145.0).since == 130.0
    other = member(9, "", "10.0.0.3", learner=True)
    assert track(grown, other, 3, now=160.0) == Progress(9, 3, 160.0, 160.0)


def test_only_the_leader_promotes_and_only_the_first_learner() -> None:
    learners = [member(LEADER, "n1-a", "10.0.0.1"), member(LEARNER, "n2-b", "10.0.0.2", True),
                member(5, "n3-c", "10.0.0.3", True)]  # fmt: skip
    follower = FakeGateway(learners, leader=False)
    manager(follower, [0.0]).step()
    assert follower.promoted == []
    leader = FakeGateway(learners)
    manager(leader, [0.0]).step()
    assert leader.promoted == [LEARNER]


def test_a_learner_without_progress_is_removed_after_the_stall_limit() -> None:
    stuck = FakeGateway([member(LEADER, "n1-a", "10.0.0.1"),
                         member(LEARNER, "", "10.0.0.2", True)], ready=False)  # fmt: skip
    clock = [0.0]
    loop = manager(stuck, clock)
    for now in (0.0, 15.0, LEARNER_MAX_STALL):
        clock[0] = now
        loop.step()
    assert stuck.removed == [] and loop.progress is not None
    clock[0] = LEARNER_MAX_STALL + 15.0
    loop.step()
    assert stuck.removed == [LEARNER] and loop.progress is None


def test_initial_cluster_names_our_unstarted_member_after_us() -> None:
    members = [member(LEADER, "node1-aaaaaaaa", "10.0.0.1"), member(LEARNER, "", "10.0.0.2", True)]
    assert initial_cluster(members, "node2-bbbbbbbb", "10.0.0.2") == (
        "node1-aaaaaaaa=http://10.0.0.1:2380,node2-bbbbbbbb=http://10.0.0.2:2380"
    )


@pytest.mark.parametrize(
    ("name", "node"),
    [("node1-1a2b3c4d", "node1"), ("pi-rack-2-1a2b3c4d", "pi-rack-2"), ("a-1a2b3c4d", "a-1a2b3c4d"),
     ("plain", "plain")],
)  # fmt: skip
def test_node_name_of_a_member_is_up_to_the_last_hyphen(name: str, node: str) -> None:
    assert node_of(name) == node


def test_refusals_name_etcd_s_reason() -> None:
    assert refusal_reason(EtcdError(TOO_MANY_LEARNERS)) == "too_many_learners"
    assert refusal_reason(EtcdError("etcdserver: unhealthy cluster")) == "etcd_unhealthy"
    assert refusal_reason(EtcdError("etcdserver: Peer URLs already exists")) == "etcd_refused"


def test_older_spellings_become_subcommands() -> None:
    assert cli._modern(["--agent", "--root", "/x"]) == ["agent", "--root", "/x"]
    assert cli._modern(["--query", "ca", "https://h:6443"]) == ["query", "ca", "https://h:6443"]
    assert cli._modern(["server", "--serve-delay", "3"]) == ["server", "--serve-delay", "3"]


def test_seconds_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("K3S_STANDIN_X", raising=False)
    assert seconds_from_env("K3S_STANDIN_X", 20.0) == 20.0
    monkeypatch.setenv("K3S_STANDIN_X", " 2.5 ")
    assert seconds_from_env("K3S_STANDIN_X", 20.0) == 2.5
    for bad in ("-1", "nan", "soon"):
        monkeypatch.setenv("K3S_STANDIN_X", bad)
        with pytest.raises(ValueError):
            seconds_from_env("K3S_STANDIN_X", 20.0)
