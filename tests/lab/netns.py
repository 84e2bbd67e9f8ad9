"""Network plumbing of the lab: names, bridge, namespaces, veths and the nftables rules."""

from __future__ import annotations

import json
import re
import subprocess

from tests.lab.errors import LabError

IP_TIMEOUT = 10.0  # s for one `ip` command
NFT_TABLE = "sugarkube_lab"  # our table inside a node's netns; nothing else uses this name
MDNS_PORT = 5353  # RFC 6762 section 3

_PREFIX_RE = re.compile(r"[a-z]{1,8}")  # letters only: "skt" + "1" must never read as "skt1" + ""
_SUBNET_RE = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})")
MAX_NODES = 200


def check_prefix(prefix: str) -> str:
    """Return PREFIX if it is 1-8 lowercase letters (interface names stay under 16 bytes)."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(f"lab prefix {prefix!r} must be 1-8 lowercase letters")
    return prefix


def check_subnet(subnet: str) -> str:
    """Return SUBNET if it is three dotted octets, such as "10.251.0"."""
    match = _SUBNET_RE.fullmatch(subnet)
    if not match or any(int(octet) > 255 for octet in match.groups()):
        raise ValueError(f"lab subnet {subnet!r} must be three octets such as 10.251.0")
    return subnet


def bridge_name(prefix: str) -> str:
    """The lab's bridge on the host."""
    return f"br-{prefix}"


def ns_name(prefix: str, index: int) -> str:
    """The network namespace of node INDEX."""
    return f"{prefix}{index}"


def veth_name(prefix: str, index: int) -> str:
    """The host end of node INDEX's veth (its other end is eth0 in the namespace)."""
    return f"v{prefix}{index}"


def is_lab_namespace(prefix: str, name: str) -> bool:
    """True if NAME is one of PREFIX's namespaces."""
    return re.fullmatch(rf"{re.escape(prefix)}\d+", name) is not None


def is_lab_link(prefix: str, name: str) -> bool:
    """True if NAME is PREFIX's bridge or one of its veths."""
    return (
        name == bridge_name(prefix) or re.fullmatch(rf"v{re.escape(prefix)}\d+", name) is not None
    )


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; LabError (with ip's message) if CHECK and it fails or hangs."""
    try:
        done = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"`ip {' '.join(args)}` hung for {IP_TIMEOUT:g} s") from exc
    if check and done.returncode != 0:
        raise LabError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def _json_names(args: list[str]) -> list[str]:
    """Names from a JSON listing of `ip -j ARGS` (empty when there is nothing)."""
    out = ip("-j", *args).stdout.strip()
    if not out:
        return []
    rows = json.loads(out)
    return [row.get("name") or row.get("ifname") or "" for row in rows]


def lab_namespaces(prefix: str) -> list[str]:
    """PREFIX's namespaces that exist now."""
    return sorted(n for n in _json_names(["netns", "list"]) if is_lab_namespace(prefix, n))


def lab_links(prefix: str) -> list[str]:
    """PREFIX's bridge and veths that exist now on the host."""
    return sorted(n for n in _json_names(["link", "show"]) if is_lab_link(prefix, n))


def namespace_pids(ns: str) -> list[int]:
    """PIDs of every process inside namespace NS."""
    done = ip("netns", "pids", ns, check=False)
    return [int(word) for word in done.stdout.split() if word.isdigit()]


def create_bridge(prefix: str) -> None:
    """Create the lab bridge, up, flooding multicast to every port (no snooping querier here)."""
    ip("link", "add", bridge_name(prefix), "type", "bridge", "mcast_snooping", "0")
    ip("link", "set", bridge_name(prefix), "up")


def create_node_network(prefix: str, index: int, addr: str) -> None:
    """Create node INDEX's namespace with eth0 at ADDR/24 on the bridge, lo up, default via eth0."""
    ns, veth = ns_name(prefix, index), veth_name(prefix, index)
    ip("netns", "add", ns)
    ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
    ip("link", "set", veth, "master", bridge_name(prefix), "up")
    ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
    ip("-n", ns, "link", "set", "eth0", "up", "multicast", "on")
    ip("-n", ns, "link", "set", "lo", "up")
    ip("-n", ns, "route", "add", "default", "dev", "eth0")


def delete_namespace(ns: str) -> None:
    """Delete namespace NS (its eth0 and the veth's host end go with it); quiet if absent."""
    ip("netns", "del", ns, check=False)


def delete_link(name: str) -> None:
    """Delete host link NAME; quiet if absent."""
    ip("link", "del", name, check=False)


def _replace_table(rules: list[str]) -> str:
    """An nft script that atomically replaces our table with one holding RULES in both hooks."""
    body = "; ".join(rules)
    return (
        f"table inet {NFT_TABLE}\n"
        f"delete table inet {NFT_TABLE}\n"
        f"table inet {NFT_TABLE} {{\n"
        f"  chain input {{ type filter hook input priority 0; policy accept; {body}; }}\n"
        f"  chain output {{ type filter hook output priority 0; policy accept; {body}; }}\n"
        "}\n"
    )


def loss_ruleset(percent: int) -> str:
    """nft script dropping PERCENT % of mDNS packets (each packet drawn once) in and out."""
    if not 0 <= percent <= 100:
        raise ValueError(f"mDNS loss must be 0-100 %, not {percent}")
    if percent == 0:
        return heal_ruleset()
    if percent == 100:
        return partition_ruleset()  # nft refuses `mod 100 < 100`
    drop = f"numgen random mod 100 < {percent} drop"
    # Sport and dport rules are disjoint so a 5353->5353 packet is not drawn twice.
    return _replace_table(
        [
            f"udp dport {MDNS_PORT} {drop}",
            f"udp sport {MDNS_PORT} udp dport != {MDNS_PORT} {drop}",
        ]
    )


def partition_ruleset() -> str:
    """nft script dropping every mDNS packet in and out."""
    return _replace_table([f"udp dport {MDNS_PORT} drop", f"udp sport {MDNS_PORT} drop"])


def heal_ruleset() -> str:
    """nft script removing our table, whether or not it exists."""
    return f"table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n"
