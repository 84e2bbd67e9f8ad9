"""This node's addresses, from `ip -j` (the lab has no DNS: nothing here resolves a name)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
from collections.abc import Mapping
from typing import Any

IP_TIMEOUT = 5.0  # s for one `ip` command


def _ip_json(*args: str) -> list[dict[str, Any]]:
    with contextlib.suppress(OSError, subprocess.SubprocessError, ValueError):
        out = subprocess.run(
            ["ip", "-j", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=True
        ).stdout
        rows = json.loads(out)
        if isinstance(rows, list):
            return rows
    return []


def local_addresses() -> list[str]:
    """This network namespace's addresses, loopback included (a serving certificate's SANs)."""
    found = ["127.0.0.1", "::1"]
    for link in _ip_json("addr", "show"):
        found += [info["local"] for info in link.get("addr_info", []) if "local" in info]
    return list(dict.fromkeys(found))


def config_list(config: Mapping[str, object], key: str) -> list[str]:
    """A k3s list flag's values (a string, a list, or comma-separated items in either)."""
    value = config.get(key)
    items = value if isinstance(value, list) else [] if value is None else [value]
    return [str(v).strip() for item in items for v in str(item).split(",") if str(v).strip()]


def node_address(config: Mapping[str, object], bind: str) -> str:
    """The address etcd advertises to peers, chosen as k3s chooses it.

    `node-ip` (or `advertise-address`) when set; else a specific --bind; else the IPv4 address of
    the default route's interface (k8s ChooseHostInterface); else any global IPv4 address.
    """
    for key in ("node-ip", "advertise-address"):
        for value in config_list(config, key):
            with contextlib.suppress(ValueError):
                return str(ipaddress.ip_address(value))
    if bind not in ("", "0.0.0.0", "::"):
        return bind
    devices = {route.get("dev") for route in _ip_json("-4", "route", "show", "default")}
    candidates: list[tuple[bool, str]] = []
    for link in _ip_json("-4", "addr", "show", "scope", "global"):
        for info in link.get("addr_info", []):
            if "local" in info:
                candidates.append((link.get("ifname") not in devices, info["local"]))
    if not candidates:
        return "127.0.0.1"
    return sorted(candidates, key=lambda c: c[0])[0][1]


def url_host(address: str) -> str:
    """ADDRESS as the host part of a URL (IPv6 bracketed)."""
    return f"[{address}]" if ":" in address else address
