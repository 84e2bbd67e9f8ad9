"""The checks that ask avahi-daemon: its D-Bus name, this node's advert, its host name.

They run the stock Avahi tools (dbus-send, avahi-browse, avahi-resolve) through the probe, so a
verifier needs no D-Bus binding and tests fake them with scripts; parsing lives in parse.py.
"""

from __future__ import annotations

from agent import const
from agent.avahi import defs
from agent.verify import parse
from agent.verify.probe import Probe
from agent.verify.result import Unavailable, Verdict, failed, parsed, passed

# dbus-daemon's errors when activating a missing name fails (DBUS_ERROR_SPAWN_*, dbus-protocol.h)
_SPAWN_ERROR = "org.freedesktop.DBus.Error.Spawn."


def avahi_dbus(probe: Probe) -> Verdict:
    """avahi-daemon owns org.freedesktop.Avahi on the system bus and reports RUNNING."""
    timeout = const.VERIFY_COMMAND_TIMEOUT
    result = probe.run(
        "dbus-send",
        "--system",
        "--print-reply",
        f"--reply-timeout={int(timeout * 1000)}",
        f"--dest={defs.BUS_NAME}",
        defs.SERVER_PATH,
        f"{defs.IFACE_SERVER}.GetState",
        timeout=timeout + 1,
    )
    if not result.ok:
        line = result.first_line()
        if defs.ERR_SERVICE_UNKNOWN in line or defs.ERR_NAME_HAS_NO_OWNER in line:
            return failed(
                f"nothing owns {defs.BUS_NAME} on the system bus: is avahi-daemon running?"
            )
        if _SPAWN_ERROR in line:  # the bus tried to start avahi-daemon on demand and could not
            return failed(f"nothing owns {defs.BUS_NAME} and bus activation failed: {line}")
        return failed(f"GetState failed: {line}")
    state = parsed("the GetState reply", parse.dbus_int, result.stdout)
    if state == defs.ServerState.RUNNING:
        return passed(f"avahi-daemon owns {defs.BUS_NAME} and is RUNNING")
    try:
        name = defs.ServerState(state).name
    except ValueError:
        name = "unknown"
    return failed(f"avahi-daemon state is {name} ({state}), not RUNNING")


def mdns_advertised(probe: Probe) -> Verdict:
    """This node's advert (host `<host>.local`, port 6443) shows in `avahi-browse -rpt`."""
    host, timeout = f"{probe.host()}.local", const.VERIFY_AVAHI_TIMEOUT
    result = probe.run("avahi-browse", "-rpt", probe.service_type, timeout=timeout)
    records = parse.avahi_browse(result.stdout)
    if not records and not result.ok:
        return failed(f"avahi-browse failed: {result.first_line()}")
    named = [r for r in records if r.host == host and r.port == const.K3S_API_PORT]
    local = _local_addresses(probe)
    ours = [r for r in named if not local or parse.normal_address(r.address) in local]
    if named and not ours:
        return failed(
            f"the advert for {host} points at {named[0].address}, not at this host: "
            "another host uses this name (see hostname_unique)"
        )
    if ours:
        first = ours[0]
        return passed(
            f"'{first.instance}' on {first.interface} {first.protocol}, port {first.port}"
        )
    others = len({r.host for r in records})
    return failed(
        f"no {probe.service_type} advert for {host} on port {const.K3S_API_PORT} "
        f"({others} other hosts advertise); is sugarkube-agent running?"
    )


def _local_addresses(probe: Probe) -> set[str]:
    """This host's addresses from /proc/net (empty when they cannot be read)."""
    try:
        v4 = parse.local_ipv4(probe.read_optional("/proc/net/fib_trie") or "")
        v6 = parse.local_ipv6(probe.read_optional("/proc/net/if_inet6") or "")
    except Unavailable:
        return set()
    return v4 | v6


def hostname_unique(probe: Probe) -> Verdict:
    """`<host>.local` resolves to this host, and avahi publishes this host under that name."""
    name, timeout = f"{probe.host()}.local", const.VERIFY_AVAHI_TIMEOUT
    forward = probe.run("avahi-resolve", "-n", name, timeout=timeout)
    pairs = parse.avahi_resolve(forward.stdout)
    address = parse.normal_address(pairs[0][1]) if pairs else None
    if address is None:
        line = forward.first_line()
        if "client object" in line or "daemon not running" in line.lower():
            raise Unavailable(f"avahi-daemon not reachable: {line}")
        return failed(f"nothing answers for {name} ({line}); avahi may have renamed this host")
    local = _local_addresses(probe)
    if local and address not in local:
        return failed(
            f"{name} answers with {address}, not an address of this host: rename one of them"
        )
    reverse = probe.run("avahi-resolve", "-a", address, timeout=timeout)
    names = parse.avahi_resolve(reverse.stdout) if reverse.ok else []
    published = parse.host_key(names[0][1]) if names else None
    if published is not None and published != name:
        return failed(f"avahi publishes this host as {published}: another host holds {name}")
    if address in local or published == name:
        return passed(f"{name} resolves to {address}, this host's")
    raise Unavailable(f"{name} resolves to {address}; cannot tell whether that is this host")


def single_cluster(probe: Probe) -> Verdict:
    """The daemon hears one cluster CA at most in authenticated adverts of this cluster/env
    (agent/daemon/peerwatch.py writes its split-brain alarm where this reads it)."""
    alarm = probe.read_optional(str(const.SPLIT_BRAIN_MARKER))
    if alarm is None:
        if not probe.file(str(const.CONTROL_SOCKET)).exists():
            raise Unavailable("sugarkube-agent is not running: it alone can check the adverts")
        return passed("no second cluster CA advertised under this cluster/env")
    return failed(
        f"split brain: {alarm.strip()}; keep the cluster that holds the workloads and run "
        "`sugarkube-agent wipe --yes` on the nodes of the other"
    )
