"""Tables keyed by what the network sends stay bounded under a flood of names, and what is still
in force (a live advert, a hold-down not run out, the newest entries) survives it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import const
from agent.bounded import Bounded, trim
from agent.cluster import view as v
from agent.cluster.joins import Joins
from agent.cluster.peers import PeerTable
from agent.cluster.view import Holds, NodeAdvert, View
from agent.mdns.records import Role, ServiceRecord

FLOOD = 5000


@pytest.fixture(autouse=True)
def small_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(const, "PEER_TABLE_MAX", 64)
    monkeypatch.setattr(const, "VIEW_ADVERTS_MAX", 256)


@given(st.lists(st.integers(min_value=0, max_value=300), max_size=400),
       st.integers(min_value=1, max_value=50))
def test_a_bounded_dict_keeps_at_most_its_limit_and_always_the_newest(
    keys: list[int], limit: int
) -> None:
    table: dict[int, int] = Bounded(limit)
    for n, key in enumerate(keys):
        if n % 2:
            table.setdefault(key, n)
        else:
            table[key] = n
        assert len(table) <= limit
        assert key in table


def test_trim_drops_only_expendable_entries_oldest_first() -> None:
    table = {n: n % 4 == 0 for n in range(12)}  # value: still in use
    trim(table, 10, lambda _, in_use: not in_use)
    assert list(table) == [0, 4, 8, 10, 11]  # down to half: in use kept, the oldest others went
    trim(table, 4, lambda _, in_use: not in_use)
    assert list(table) == [0, 4, 8]  # only those in use are left, even past the limit


def _record(name: str, txt: tuple[bytes, ...]) -> ServiceRecord:
    return ServiceRecord(name, "_k3s-sugar-dev._tcp", "local", "h.local", "10.0.0.9", 6443, txt)


def test_ignored_records_are_remembered_boundedly_and_the_recent_ones_still_once() -> None:
    table = PeerTable("sugar", "dev")
    foreign = (b"k3s=1", b"cluster=other", b"env=dev", b"role=server")
    changes = [table.seen(_record(f"forged-{n}", foreign)) for n in range(FLOOD)]
    assert all(c is not None and c.kind == "ignored" for c in changes)
    assert len(table._ignored) <= const.PEER_TABLE_MAX
    assert table.seen(_record(f"forged-{FLOOD - 1}", foreign)) is None  # reported once


def _advert(n: int, role: Role = Role.CANDIDATE) -> NodeAdvert:
    return NodeAdvert(f"k3s-sugar-dev@h{n}.local ({role})", f"h{n}.local", role, f"{n:016x}",
                      phase=v.DISCOVER if role == Role.CANDIDATE else v.SERVING)


def test_a_flood_of_names_leaves_the_view_bounded_and_live_nodes_in_it() -> None:
    view = View("f" * 16, Holds(candidate=3.0, dead=10.0, live_ttl=5.0))
    server, peer = _advert(1, Role.SERVER), _advert(2)
    view.seen(0.0, server)  # listed by the browser: held for as long as it is
    now = 0.0
    for n in range(FLOOD):
        now = n * 0.25
        view.heard(now, [peer, _advert(1000 + n)])  # a forged name in every round
        assert len(view._seen) <= const.VIEW_ADVERTS_MAX
    assert {server, peer} <= set(view.known(now))
    assert peer in view.live(now)
    # The forged adverts heard within live_ttl (5 s: 20 rounds) are all there: no live one went.
    assert len([a for a in view.live(now) if a.host != peer.host]) == 20


def test_refusals_are_bounded_and_hold_downs_go_only_once_run_out() -> None:
    joins = Joins("f" * 16, 3, retry=0.5, dead_hold=10.0, order_wait=120.0,
                  learner_removal=330.0, etcd_ttl=10.0)
    for n in range(FLOOD):
        joins.proof_done(n * 0.001, _advert(n, Role.SERVER), ok=False, reason="ca_mismatch")
    assert len(joins._refused) <= const.PEER_TABLE_MAX
    assert not joins.counts(_advert(FLOOD - 1, Role.SERVER))  # the newest refusals hold
    for n in range(500):
        joins.proof_done(n * 0.01, _advert(n, Role.SERVER), ok=False, reason="unreachable")
    # 5 s of failed proofs, held down for 10 s each: all still in force, none forgotten.
    assert len(joins._dead_until) == len(joins._retry_at) == 500
    joins.proof_done(20.0, _advert(0, Role.SERVER), ok=False, reason="unreachable")
    assert len(joins._dead_until) <= const.PEER_TABLE_MAX  # once run out, they go
    assert len(joins._retry_at) <= const.PEER_TABLE_MAX
