"""Hypothesis strategies for Schedules: small values first, so a failure shrinks to a short,
readable schedule (fewer nodes, fewer faults, round times, seed 0)."""

from __future__ import annotations

from hypothesis import strategies as st

from tests.sim.schedule import (
    BOOT,
    LOW,
    TRIGGERS,
    AgentRestart,
    AvahiRestart,
    Fault,
    Partition,
    Power,
    PowerCut,
    Schedule,
)


def seconds(lo: float, hi: float) -> st.SearchStrategy[float]:
    """Tenths of a second: reprs stay short and shrink to `lo`."""
    return st.integers(round(lo * 10), round(hi * 10)).map(lambda t: t / 10)


def _faults(n: int) -> st.SearchStrategy[Fault]:
    node = st.integers(0, n - 1)
    subject = st.one_of(st.sampled_from([BOOT, LOW]), node)
    after = st.sampled_from(TRIGGERS)
    at = seconds(0, 60)
    sides = st.lists(st.integers(0, 2), min_size=n, max_size=n).map(
        lambda side: tuple(
            g for g in (tuple(i for i in range(n) if side[i] == k) for k in range(3)) if g
        )
    ).filter(lambda groups: len(groups) > 1)
    pair = st.lists(node, min_size=2, max_size=2, unique=True).map(lambda p: (tuple(p),))
    return st.one_of(
        st.builds(PowerCut, at=seconds(5, 120), off=seconds(1, 60),
                  reflash=st.one_of(st.none(), st.just(BOOT), node), after=after, who=subject),
        st.builds(Power, node=subject, at=at, off=st.one_of(st.none(), seconds(1, 60)),
                  after=after),
        st.builds(AgentRestart, node=subject, at=at, off=seconds(0.1, 6), after=after),
        st.builds(AvahiRestart, node=subject, at=at, off=seconds(2.5, 4), crash=st.booleans(),
                  after=after),
        st.builds(Partition, groups=st.one_of(sides, pair), at=st.one_of(st.just(0.0), at),
                  heal=seconds(5, 60), oneway=st.booleans(), after=after, who=subject),
    )


@st.composite
def schedules(draw: st.DrawFn, max_nodes: int = 7, max_faults: int = 3) -> Schedule:
    """A random run: 2-7 nodes, 1, 3 or 5 servers (mostly 3), agents starting 0-15 s apart
    (one in eight never arrives), loss, slow k3s, nodes that cannot run k3s, and faults."""
    # Tenths of a second past 15 s mean "never arrives": about one node in eight.
    start = st.integers(0, 172).map(lambda t: t / 10 if t <= 150 else None)
    starts = tuple(draw(st.lists(start, min_size=2, max_size=max_nodes)))
    n = len(starts)
    return Schedule(
        starts=starts,
        servers=draw(st.sampled_from([3, 3, 3, 1, 5])),
        loss=draw(st.sampled_from([0.0, 0.0, 0.02, 0.1, 0.3])),
        k3s=draw(st.sampled_from([(2.0, 5.0), (2.0, 5.0), (25.0, 60.0)])),
        ineligible=tuple(draw(st.one_of(
            st.just([]), st.just([]), st.just([]), st.lists(st.integers(0, n - 1), max_size=1)
        ))),
        faults=tuple(draw(st.lists(_faults(n), max_size=max_faults))),
        seed=draw(st.integers(0, 2**16)),
    )
