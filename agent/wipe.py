"""`sugarkube-agent wipe`: make this node fresh again, and prove its adverts left the wire.

In order, each step only once the one before succeeded:
1. close the gate and withdraw the adverts (the running daemon: `gate` no longer returns 0 until
   a restarted daemon forms again; first, so that nothing restarts k3s into the cluster it is
   leaving: k3s re-adds a removed etcd member that starts again with its old name);
2. leave etcd: another server removes this server's member (agent/cluster/etcd.py); the last
   voting member has nothing to leave;
3. k3s-killall.sh's work (agent/killall.py): stop the units, kill the containers' shims,
   unmount k3s's and the kubelet's mounts, delete the CNI links, filter k3s's iptables rules;
4. remove k3s's state with its tokens and our drop-in, the release marker, then the ballot;
5. the double-absence gate against our own host name: two live rounds >= 1 s apart in which no
   advert names this host.
A failure ends the run there with one line: what was done, what failed, what is left. Idempotent:
run it again once the cause is fixed.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent import const, killall
from agent.cluster import etcd, k3s
from agent.cluster.gate import AbsenceGate
from agent.config import Settings
from agent.daemon import ballot
from agent.daemon.control import request
from agent.daemon.netlink import choose_interface
from agent.mdns import wire
from agent.mdns.records import normalize_host, parse_advert, service_type


class WipeError(Exception):
    """A step of the wipe failed; one line."""


# Domain errors carry a one-line message of their own; anything else is named by its type.
_KNOWN = (WipeError, etcd.EtcdError, killall.KillallError, k3s.K3sError, ballot.BallotError)


@dataclass(frozen=True)
class Step:
    """One step of the wipe: its work (returns a progress line), said when done, left if not."""

    done: str
    left: str
    run: Callable[[], Awaitable[str]]


def failure_line(steps: Sequence[Step], failed: int, error: BaseException) -> str:
    """`<done>; <what failed>; left: <what the failed and later steps would have removed>`."""
    done = ", ".join(s.done for s in steps[:failed])
    reason = str(error) if isinstance(error, _KNOWN) else f"{type(error).__name__}: {error}"
    left = ", ".join(s.left for s in steps[failed:])
    return f"{done + '; ' if done else 'nothing done; '}{reason}; left: {left}"


async def run_steps(steps: Sequence[Step], out_lines: list[str]) -> str | None:
    """Run the steps in order; None when all are done, else the failure line."""
    for index, step in enumerate(steps):
        try:
            out_lines.append(await step.run())
        except Exception as err:  # every failure is one line, never a traceback
            return failure_line(steps, index, err)
    return None


def steps(root: Path) -> list[Step]:
    """The wipe's steps for the node at root, in their order."""

    def thread(work: Callable[[], str]) -> Callable[[], Awaitable[str]]:
        return lambda: asyncio.to_thread(work)

    return [
        Step("closed the gate", "open gate and adverts (if the daemon runs)", _withdraw),
        Step("left etcd", "etcd member", thread(lambda: etcd.leave(root))),
        Step("stopped k3s", "k3s running", thread(killall.stop_units)),
        Step("killed containers", "containers", thread(killall.kill_shims)),
        Step("unmounted", "k3s and kubelet mounts", thread(lambda: killall.unmount_all(root))),
        Step("deleted CNI links", "CNI links", thread(lambda: killall.delete_links(root))),
        Step("filtered the firewall", "k3s's iptables rules",
             thread(lambda: killall.filter_firewall(root))),
        Step("removed k3s state", "k3s state, tokens, drop-in", thread(lambda: _state(root))),
        Step("removed the ballot", "ballot", thread(lambda: _ballot(root))),
    ]


async def wipe(settings: Settings, out_lines: list[str], root: Path = Path("/")) -> tuple[int, str]:
    """Wipe this node; (exit code, reason). Progress lines are appended to out_lines."""
    failed = await run_steps(steps(root), out_lines)
    if failed is not None:
        return const.EXIT_FAIL, failed
    host = f"{socket.gethostname()}.local"
    try:
        iface = await asyncio.to_thread(choose_interface, settings.mdns.interface)
        stype = service_type(settings.cluster, settings.env)
        return await confirm_absent(stype, host, iface.mdns_addr)
    except Exception as err:  # the disk is clean; only the proof is missing
        return const.EXIT_FAIL, (
            f"everything removed; cannot check the wire ({type(err).__name__}: {err}); "
            "left: adverts not proven gone"
        )


def _state(root: Path) -> str:
    removed = k3s.wipe_state(root)
    marker = ballot.marker(root)
    if marker.exists():
        marker.unlink()
        removed.append(str(const.GATE_RELEASED_MARKER))
    return f"removed: {', '.join(removed)}" if removed else "removed: no k3s state left"


def _ballot(root: Path) -> str:
    if ballot.remove(root):  # its key and promises: start afresh
        return f"removed: {const.BALLOT_FILE}"
    return "ballot: none"


async def confirm_absent(stype: str, host: str, address: str) -> tuple[int, str]:
    """The double-absence gate for adverts of `host`; (0, ...) confirmed, (1, reason) not."""
    gate = AbsenceGate()
    deadline = time.monotonic() + const.WIPE_CONFIRM_TIMEOUT
    still: list[str] = []
    while not gate.passed and time.monotonic() < deadline:
        due = gate.next_round_at()
        if due is not None and due > time.monotonic():
            await asyncio.sleep(due - time.monotonic())
        started = time.monotonic()
        try:
            records = await wire.live_round(stype, interface_addr=address, complete=True)
        except wire.IncompleteRound:
            gate.reset()  # what it did not hear proves nothing: start over
            continue
        still = [r.name for r in records if _names_host(r, host)]
        gate.observe(started, bool(still))
    if gate.passed:
        return const.EXIT_OK, f"confirmed: no advert of {host} on the wire in two live rounds"
    return const.EXIT_FAIL, (
        f"not confirmed within {const.WIPE_CONFIRM_TIMEOUT:g} s: still answered on the wire: "
        f"{', '.join(sorted(set(still))) or 'rounds did not complete'}"
    )


def _names_host(record: wire.LiveRecord, host: str) -> bool:
    if f"@{host} (" in record.name.lower():
        return True
    try:
        return parse_advert(record.txt).host == normalize_host(host)
    except ValueError:
        return False


async def _withdraw() -> str:
    try:
        reader, writer = await request("wipe")
        line = await asyncio.wait_for(reader.readline(), const.SHUTDOWN_GRACE + 2)
        writer.close()
        answer = json.loads(line or b"{}")
    except (OSError, TimeoutError, ValueError):
        return "gate: the daemon is not running (gate cannot pass; no adverts of ours to withdraw)"
    withdrawn = answer.get("withdrawn") if isinstance(answer, dict) else None
    if withdrawn is None:
        raise WipeError(f"the daemon did not close its gate (it answered {str(answer)[:80]})")
    if withdrawn:
        return "gate: closed by the daemon; adverts withdrawn (goodbye packets sent)"
    return "gate: closed by the daemon; it could not confirm the adverts' withdrawal"
