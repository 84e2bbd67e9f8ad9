"""What the gate's release leaves on disk, and what a node's disk says at its next start.

A release writes, in this order: our k3s drop-in (atomic, 0600; a member's k3s needs none, and
a member removes the drop-in's temporary copies a crash left, as a write would), the
ballot's record of it (the mode, the cluster/env/servers it released under and the address
etcd's peers know it by: fsynced, so that after a power cut the node is a member even if k3s
never ran), and this boot's marker under /run. At the next start the record answers: which
role the node holds (local.held_role), whether a server join was cut short before etcd
started (rule 8 of election.py), whether it is configured for another cluster
(local.settings_refusal) and whether its address moved since.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from agent import const, tokens
from agent.cluster import k3s
from agent.cluster.actions import Release
from agent.cluster.election import Formation
from agent.config import Settings
from agent.daemon import ballot, local
from agent.daemon.netlink import Interface
from agent.log import EventLog
from agent.mdns.records import Role, service_type


def machine_from_disk(
    root: Path, settings: Settings, *, host: str, can_join: bool, log: EventLog
) -> tuple[ballot.Ballot, bool, Formation]:
    """The ballot (a new one when there is none or it is damaged), whether it was damaged, and
    the formation machine as this node's disk starts it: member, rejoin, agent only."""
    damaged = ""
    try:
        stored = ballot.load(root)
    except ballot.BallotError as err:
        stored, damaged = None, str(err)
        log.event("ballot_damaged", "error", error=damaged)
    record = stored or ballot.Ballot.new()
    if not damaged:  # this start, counted: FormationRunner.run saves it before the first advert
        record = dataclasses.replace(record, starts=str(int(record.starts) + 1))
    member = local.held_role(root, record.released)
    rejoin = join_cut_short(root, record)
    if rejoin:
        member = None
        log.event("rejoin", "warning", reason="server join cut short before etcd started")
    machine = Formation(
        host=host,
        key=record.key,
        servers=settings.servers,
        member=member,
        ca_on_disk=k3s.ca_on_disk(root) if member == Role.SERVER else "",
        stype=service_type(settings.cluster, settings.env),
        can_join=can_join,
        authenticated=settings.token is not None,
        ineligible=damaged,
        rejoin=rejoin,
        join_only=unpinned_ca(root, settings) if member is None else "",
        agent_only=member is None and k3s.agent_only(root),
        bound=record.bound,
        bound_host=record.bound_host,
    )
    if machine.agent_only:
        log.event("agent_only", "notice",
                  reason="k3s-agent.service is installed and k3s.service is not")  # fmt: skip
    return record, bool(damaged), machine


def unpinned_ca(root: Path, settings: Settings) -> str:
    """Why this fresh node must not run cluster-init (rule 9 of election.py), "" when it may:
    its K10 token pins a CA that no CA on its disk matches."""
    token = tokens.parse_token(settings.token.reveal()) if settings.token else None
    if token is None or token.ca_hash is None or k3s.ca_on_disk(root) == token.ca_hash:
        return ""
    return (
        f"the K10 token pins CA {token.ca_hash[:12]}, which no CA on this disk matches: it can "
        "only join that cluster (to form a new one, give the token's password part alone)"
    )


def write(
    root: Path,
    release: Release,
    *,
    settings: Settings,
    iface: Interface,
    server: tuple[str, str] | None,
    stored: ballot.Ballot,
    damaged: bool,
    log: EventLog,
) -> ballot.Ballot:
    """Write the release (drop-in, ballot record, marker); the ballot as it now stands.

    `server` is (address, CA hash) where the joined server passed its proof: k3s joins that
    address with the token pinned to that CA, so that it too refuses any other server (an
    impostor that took the address since). A member's record is worth a line when it cannot be
    written, never its release; a damaged ballot's file is left alone.
    """
    theirs = operator_config_notice(root, log)
    fresh = release.mode != "member"
    if release.mode != "member":
        token = settings.token.reveal() if settings.token else None
        if token is not None and server is not None:
            token = tokens.pinned(token, server[1])
        k3s.write_dropin(root, k3s.Release(
            mode=release.mode,
            server_url=k3s.api_url(server[0]) if server else None,
            token=token,
            node_labels=(f"sugarkube.io/cluster={settings.cluster}",),
            etcd_settings=tuple((k, v) for k, v in const.K3S_ETCD_SNAPSHOTS if k not in theirs)
            if release.mode in ("cluster-init", "join-server") else (),
        ))  # fmt: skip
    else:
        # A member writes no drop-in, so nothing else would remove the temporary copy (with
        # the token) that a crash or power cut during an earlier boot's write left behind.
        with contextlib.suppress(OSError):
            k3s.remove_stale_tmp(root)
    record = dataclasses.replace(
        stored,
        released=release.mode if fresh else stored.released,
        joined=stored.joined if stored.joined and not fresh else local.joined_under(settings),
        address=stored.address if stored.address and not fresh else iface.ip4 or iface.ip6,
    )
    if record != stored and not (damaged and not fresh):
        try:
            ballot.save(root, record)
            stored = record
        except ballot.BallotError as err:
            if fresh:
                raise
            log.event("ballot_not_saved", "warning", error=str(err))
    marker = ballot.marker(root)
    with contextlib.suppress(OSError):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(release.mode + "\n")
    return stored


def operator_config_notice(root: Path, log: EventLog) -> dict[str, object]:
    """The operator's own k3s settings; say so when they already decide what our drop-in
    writes ({} when they cannot be read: said too)."""
    try:
        theirs = k3s.merged_config(root, include_ours=False)
    except k3s.K3sConfigError as err:
        log.event("operator_k3s_config_unreadable", "warning", error=str(err))
        return {}
    decided = sorted({"server", "cluster-init", "token"} & set(theirs))
    if decided:
        log.event(
            "operator_k3s_config", "notice", keys=",".join(decided),
            note="k3s merges config.yaml, then config.yaml.d/ in name order: later files win",
        )
    return theirs


def join_cut_short(root: Path, stored: ballot.Ballot) -> bool:
    """Rule 8 (election.py): released as a joining server at an earlier boot (no release
    marker this boot), and its etcd never started."""
    marker = ballot.marker(root)
    return (
        not marker.exists() and stored.released == "join-server"
        and not k3s.etcd_initialized(root)
        and k3s.membership(root) != k3s.Membership.AGENT
    )


def moved_note(stored: ballot.Ballot, iface: Interface) -> str:
    """For a server whose address is not the one it joined with (home DHCP after a power cut
    hands out another lease): what STATUS adds, else ""."""
    if not stored.address or stored.address in (iface.ip4, iface.ip6):
        return ""
    return (
        "; this node's address changed since it joined: etcd's peers know it by the old "
        "one (give it a fixed DHCP lease, or wipe and join it again)"
    )
