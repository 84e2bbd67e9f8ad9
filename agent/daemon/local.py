"""A member releases from its local state, whatever else fails (DESIGN.md §A "Gate release").

A node that holds k3s state, or released at an earlier boot, needs nothing from the network or
the configuration to start k3s again: its disk says which role it has. So when the daemon
cannot run whole (a YAML typo in agent.yaml, no usable interface: no default route yet after a
power cut), a member still releases its gate at once, in its role, and the daemon says what it
waits for: `degraded: <reason>; released from local state as <role>` in STATUS and `status`,
`event=degraded_release`, and `sugarkube_degraded{reason}` on the metrics endpoint (the default
or configured one). It stays so until what failed comes right (the configuration reloaded with
SIGHUP, an interface appears), then the daemon starts whole. A fresh node has no such state and
exits as before (78 bad configuration, 69 no interface): forming a cluster needs both.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from pathlib import Path

from agent import __version__, const
from agent.cluster import k3s
from agent.config import DEFAULT_METRICS_HOST, ConfigError, Settings, load_settings
from agent.daemon import ballot
from agent.daemon.control import ControlServer, DaemonState
from agent.daemon.metrics import Metrics, MetricsError, serve_metrics
from agent.daemon.notify import Notifier
from agent.log import EventLog
from agent.mdns.records import Role


def held_role(root: Path, released: str | None = None) -> Role | None:
    """SERVER or AGENT when this node released before (this boot or an earlier one) or holds
    k3s state: it is then a member, whatever k3s is doing now; None for a fresh node.

    `released` is the ballot's release mode when the caller has it (None: read it here; a
    damaged ballot then counts as none: k3s's own files still decide).
    """
    if released is None:
        try:
            stored = ballot.load(root)
        except ballot.BallotError:
            stored = None
        released = stored.released if stored is not None else ""
    mode = released
    with contextlib.suppress(OSError):
        marked = ballot.marker(root).read_text().strip()
        if marked not in ("", "member"):  # "member" says nothing of the role
            mode = marked
    held = k3s.membership(root)
    if held == k3s.Membership.AGENT or mode == "join-agent":
        return Role.AGENT
    if held == k3s.Membership.SERVER or mode:
        return Role.SERVER
    return None


def joined_under(settings: Settings) -> str:
    """The settings a node releases under, as the ballot records them (`joined`)."""
    return f"{settings.cluster}/{settings.env}/{settings.servers}"


def settings_refusal(root: Path, settings: Settings) -> str:
    """Why this member must not run with `settings` ("" when it may): it joined its cluster
    under another cluster, env or servers, and would advertise its old state under a new
    service type (or count slots by another number)."""
    try:
        stored = ballot.load(root)
    except ballot.BallotError:
        return ""  # the runner says so; k3s's files still say it is a member
    if stored is None or not stored.joined or stored.joined == joined_under(settings):
        return ""
    was, now = (_show_joined(j) for j in (stored.joined, joined_under(settings)))
    return (
        f"this node joined {was}, the configuration says {now}: restore it and `systemctl "
        "reload sugarkube-agent`, or move the node with `sugarkube-agent wipe --yes`"
    )


def _show_joined(joined: str) -> str:
    cluster, env, servers = joined.split("/")
    return f"cluster={cluster} env={env} servers={servers}"


async def reloaded(config_path: Path | None, hup: asyncio.Event, log: EventLog) -> Settings:
    """The settings of the first SIGHUP whose configuration loads and suits this member."""
    while True:
        await hup.wait()
        hup.clear()
        try:
            settings = load_settings(config_path)
        except ConfigError as err:
            log.event("config_reload_failed", "error", error=str(err), kept="local state")
            continue
        refusal = await asyncio.to_thread(settings_refusal, Path("/"), settings)
        if refusal:
            log.event("config_reload_failed", "error", error=refusal, kept="local state")
            continue
        log.event("config_reloaded", changed="all")
        return settings


async def hold_released(
    role: Role,
    what: str,
    reason: str,
    *,
    log: EventLog,
    notifier: Notifier,
    until: Awaitable[object],
    metrics_at: tuple[str, int] = (DEFAULT_METRICS_HOST, const.METRICS_PORT),
) -> None:
    """Serve the gate released as `role` (control socket, STATUS, metrics) until `until` is done;
    `what` failed (config, interface) for `reason`.

    The caller then starts the daemon whole (its own control socket takes over; a `gate` that
    is still waiting connects again) or exits on SIGTERM by cancelling this.
    """
    name = "agent" if role == Role.AGENT else "server"
    status = f"degraded: {reason}; released from local state as {name}"
    state = DaemonState()
    await state.update(
        phase="member", role=name, status=status, released=True, release_mode="member",
        release_role=name, degraded={what: reason},
    )
    metrics = Metrics(__version__, "unknown", "unknown")
    metrics.gate_released(True)
    metrics.degraded(what, True)

    async def wiped() -> bool:
        """`wipe`: the gate closes (no advert was published: nothing to withdraw)."""
        wiped_status = "wiped: systemctl restart sugarkube-agent to form again"
        await state.update(
            released=False, release_mode="", release_role="", phase="wiped", status=wiped_status
        )
        metrics.gate_released(False)
        notifier.status(wiped_status)
        return True

    control = ControlServer(state, wipe=wiped)
    endpoint = None
    try:
        await control.start()
        with contextlib.suppress(MetricsError):
            endpoint = await serve_metrics(metrics, *metrics_at)
        log.event("degraded_release", "warning", role=name, what=what, reason=reason)
        notifier.ready()
        notifier.status(status)
        watchdog = asyncio.ensure_future(notifier.watchdog(_loop_alive))
        try:
            await until
        finally:
            watchdog.cancel()
    finally:
        await control.close()
        if endpoint is not None:
            await endpoint.close()


async def _loop_alive() -> None:
    await asyncio.sleep(0)
