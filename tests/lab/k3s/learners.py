"""Promoting learners as k3s's learner manager does (pkg/etcd/etcd.go manageLearners).

Every server runs the loop once it is up (k3s: after AgentReady); each tick (15 s in k3s) only
the etcd leader acts. It takes the first learner in MemberList and tries MemberPromote: etcd
refuses while the learner has not caught up with the leader's log. If refused, it records the
learner's raftAppliedIndex (from the learner's own client URL) and the last time that grew; a
learner that made no progress for 5 minutes is removed from the cluster. k3s keeps that record
in etcd (key k3s/etcd/learnerProgress) so a new leader inherits it; ours lives in the leader's
memory, so a change of leader restarts the 5 minutes: the only place the stand-in is kinder.

The joining side waits for its promotion before it serves; a learner manager that waits a tick
is what makes a second joiner meet "too many learner members" for seconds, not milliseconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from .const import ETCD_TIMEOUT, LEARNER_MAX_STALL
from .etcd import EtcdError, Gateway, Member
from .events import log

STATUS_TIMEOUT = 2.0  # s to ask a learner for its status, k3s defaultDialTimeout


@dataclass(frozen=True)
class Progress:
    """What the leader knows of the learner it is waiting on."""

    member_id: int
    applied: int  # the highest raftAppliedIndex seen
    since: float  # monotonic s when `applied` last grew (or the learner was first seen)
    seen: float  # monotonic s when the learner was first seen


def track(progress: Progress | None, learner: Member, applied: int | None, now: float) -> Progress:
    """trackLearnerProgress's bookkeeping: start over for a new learner, move on when it grows."""
    if progress is None or progress.member_id != learner.id:
        progress = Progress(learner.id, 0, now, now)
    if applied is not None and applied > progress.applied:
        progress = replace(progress, applied=applied, since=now)
    return progress


def label(member: Member) -> str:
    """A member's name, or its ID while it has not started (it has no name yet)."""
    return member.name or f"unstarted-{member.id:x}"


class LearnerManager:
    """The periodic promote-or-evict loop of one server."""

    def __init__(
        self,
        gateway: Gateway,
        tick: float,
        max_stall: float = LEARNER_MAX_STALL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.gateway = gateway
        self.tick = tick
        self.max_stall = max_stall
        self.clock = clock
        self.progress: Progress | None = None

    def step(self) -> None:
        """One tick: on the leader, promote the first learner, or track and maybe remove it."""
        status = self.gateway.status()
        if status.member_id != status.leader:
            return
        _, members = self.gateway.members()
        learner = next((m for m in members if m.learner), None)
        if learner is None:
            self.progress = None
            return
        now = self.clock()
        try:
            self.gateway.promote(learner.id)
        except EtcdError:
            pass
        else:
            known = self.progress is not None and self.progress.member_id == learner.id
            seen = self.progress.seen if known and self.progress else now
            log("promoted", name=label(learner), ms_seen=round((now - seen) * 1000))
            self.progress = None
            return
        self.progress = track(self.progress, learner, self._applied(learner), now)
        stalled = now - self.progress.since
        if stalled > self.max_stall:
            self.gateway.remove(learner.id)
            log("learner_removed", name=label(learner), stalled_s=round(stalled))
            self.progress = None
        elif stalled > 0:
            log("learner_stalled", name=label(learner), applied=self.progress.applied,
                stalled_s=round(stalled))  # fmt: skip

    def _applied(self, learner: Member) -> int | None:
        """The learner's raftAppliedIndex from its first client URL that answers."""
        for url in learner.client_urls:
            try:
                return Gateway(url, STATUS_TIMEOUT, self.gateway.tls).status().applied
            except EtcdError:
                continue
        return None

    async def run(self) -> None:
        """Tick forever (cancel to stop); a failed tick is logged and the next one tries again."""
        while True:
            await asyncio.sleep(self.tick)
            try:
                await asyncio.wait_for(asyncio.to_thread(self.step), 3 * ETCD_TIMEOUT)
            except (EtcdError, TimeoutError) as exc:
                log("learners_check_failed", detail=str(exc)[:160])
