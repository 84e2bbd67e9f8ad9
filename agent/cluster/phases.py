"""The formation machine's phases and timing windows (election.py, joining.py)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from agent import const


class Phase(StrEnum):
    """Where the node is in forming or joining the cluster."""

    MEMBER = "member"  # held cluster state at start
    DISCOVER = "discover"  # browsing and voting
    ELECT = "elect"  # lowest key with a quorum of votes: absence rounds running
    BOOTSTRAP = "bootstrap"  # stood: waiting for a quorum of supporters
    BOUND = "bound"  # promised to a bootstrapper: waiting for a server to join
    JOIN = "join"  # proving a server, or waiting for its turn to join it
    INELIGIBLE = "ineligible"  # cannot run k3s here: does not stand
    RELEASED = "released"  # gate released, k3s starting
    SERVING = "serving"  # the local API answers


@dataclass(frozen=True)
class Timings:
    """The machine's windows, in seconds; tests shrink them."""

    settle: float = const.SETTLE_WINDOW
    candidate_hold: float = const.CANDIDATE_HOLD
    dead_hold: float = const.DEAD_SERVER_HOLD
    live_ttl: float = const.LIVE_SEEN_TTL
    bootstrap_retry: float = const.BOOTSTRAP_PROVE_RETRY
    round_retry: float = const.ROUND_RETRY
    join_order_wait: float = const.JOIN_ORDER_WAIT
    learner_removal: float = const.LEARNER_REMOVAL
    voter_settle: float = const.ETCD_VOTER_SETTLE
    etcd_ttl: float = const.ETCD_INFO_TTL
    stall_warn: float = const.JOIN_STALL_WARN
