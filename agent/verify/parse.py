"""Pure parsers for what the checks read: /proc files, k3s drop-ins and tool output.

No I/O here. Every function takes text and either returns plain values or raises ParseError
with a one-line reason; none raises anything else, whatever the input.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_AVAHI_ESCAPE = re.compile(r"\\(\d{3}|.)", re.DOTALL)
_DBUS_INT = re.compile(r"^\s*(?:int32|uint32|byte)\s+(-?\d+)\s*$", re.MULTILINE)
_CLOUD_INIT_STATUS = re.compile(r"^\s*status:\s*(\S.*?)\s*$", re.MULTILINE)
_IPTABLES_BACKEND = re.compile(r"\((nf_tables|legacy)\)")
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class ParseError(ValueError):
    """The text is not in the shape the parser knows; the message says how."""


def cmdline_tokens(text: str) -> set[str]:
    """The whitespace-separated parameters of /proc/cmdline."""
    return set(text.split())


def cgroup2_controllers(text: str) -> set[str]:
    """The controllers listed in cgroup v2's cgroup.controllers."""
    return set(text.split())


def cgroup1_enabled(text: str) -> set[str]:
    """The enabled controllers of /proc/cgroups (subsys, hierarchy, num_cgroups, enabled)."""
    enabled = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 4 and not line.startswith("#") and fields[3] == "1":
            enabled.add(fields[0])
    return enabled


def active_swaps(text: str) -> list[str]:
    """The swap devices or files /proc/swaps lists; ParseError on anything but its table."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("Filename"):
        raise ParseError("no 'Filename Type Size Used Priority' header")
    devices = []
    for line in lines[1:]:
        fields = line.split()
        if len(fields) < 5 or not fields[2].isdigit():
            raise ParseError(f"unexpected line {line[:40]!r}")
        devices.append(fields[0].replace("\\040", " "))
    return devices


def flag_value(text: str) -> int:
    """A /proc/sys flag such as ip_forward: one integer on one line."""
    value = text.strip()
    if not re.fullmatch(r"-?\d{1,9}", value):
        raise ParseError(f"expected a number, found {value[:20]!r}")
    return int(value)


@dataclass(frozen=True)
class Mount:
    """One /proc/self/mountinfo line: where, which device number, what source and type."""

    mount_point: str
    major_minor: str
    source: str
    fstype: str


def mountinfo(text: str) -> list[Mount]:
    """The mounts of /proc/self/mountinfo, in order; malformed lines are left out."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2 or ":" not in fields[2]:
            continue
        point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        mounts.append(Mount(point, fields[2], tail[1], tail[0]))
    return mounts


def mount_of(mounts: list[Mount], path: str) -> Mount | None:
    """The mount that holds `path`: the last-mounted one with the longest matching prefix."""
    best: Mount | None = None
    for mount in mounts:
        point = mount.mount_point.rstrip("/") or "/"
        holds = point in (path, "/") or path.startswith(point + "/")
        if holds and (best is None or len(point) >= len(best.mount_point.rstrip("/") or "/")):
            best = mount
    return best


def block_kind(device: str) -> str:
    """'nvme', 'sd' (SD card or eMMC), 'usb' (sdX: USB or SATA) or 'other', from a device name."""
    name = device.rsplit("/", 1)[-1]
    if name.startswith("nvme"):
        return "nvme"
    if name.startswith("mmcblk"):
        return "sd"
    if re.fullmatch(r"sd[a-z]+\d*", name):
        return "usb"
    return "other"


def local_ipv4(fib_trie: str) -> set[str]:
    """This host's IPv4 addresses: the `/32 host LOCAL` leaves of /proc/net/fib_trie."""
    found, last = set(), None
    for line in fib_trie.splitlines():
        stripped = line.strip()
        if stripped.startswith("|--"):
            last = stripped[3:].strip()
        elif stripped.startswith("/32 host LOCAL") and last:
            try:
                found.add(str(ipaddress.IPv4Address(last)))
            except ValueError:
                continue
    return found


def local_ipv6(if_inet6: str) -> set[str]:
    """This host's IPv6 addresses from /proc/net/if_inet6 (32 hex digits per line)."""
    found = set()
    for line in if_inet6.splitlines():
        fields = line.split()
        if fields and re.fullmatch(r"[0-9a-fA-F]{32}", fields[0]):
            found.add(str(ipaddress.IPv6Address(int(fields[0], 16))))
    return found


def normal_address(text: str) -> str | None:
    """An IP address in canonical form (scope suffix dropped), or None if it is not one."""
    try:
        return str(ipaddress.ip_address(text.strip().split("%", 1)[0]))
    except ValueError:
        return None


def avahi_name(escaped: str) -> str:
    """Undo avahi-browse -p's escaping of instance names (`\\.`, `\\\\`, `\\DDD` decimal bytes)."""
    out = bytearray()
    pos = 0
    for match in _AVAHI_ESCAPE.finditer(escaped):
        out += escaped[pos : match.start()].encode("utf-8", "replace")
        code = match.group(1)
        if len(code) == 3 and int(code) < 256:
            out.append(int(code))
        else:
            out += code.encode("utf-8", "replace")
        pos = match.end()
    out += escaped[pos:].encode("utf-8", "replace")
    return out.decode("utf-8", "replace")


@dataclass(frozen=True)
class BrowseRecord:
    """One resolved (`=`) line of `avahi-browse -rpt`."""

    interface: str
    protocol: str
    instance: str
    service_type: str
    host: str
    address: str
    port: int
    txt: str


def host_key(name: str) -> str:
    """A host name for comparison: lower case, no trailing dots."""
    return name.strip().rstrip(".").lower()


def avahi_browse(text: str) -> list[BrowseRecord]:
    """The resolved records of `avahi-browse -rpt` output; other and malformed lines are skipped."""
    records = []
    for line in text.splitlines():
        fields = line.split(";", 9)
        if len(fields) < 9 or fields[0] != "=" or not fields[8].isdigit():
            continue
        records.append(
            BrowseRecord(
                interface=fields[1],
                protocol=fields[2],
                instance=avahi_name(fields[3]),
                service_type=fields[4],
                host=host_key(fields[6]),
                address=fields[7],
                port=int(fields[8]),
                txt=fields[9] if len(fields) > 9 else "",
            )
        )
    return records


def avahi_resolve(text: str) -> list[tuple[str, str]]:
    """(name, address) pairs of `avahi-resolve` output (`name<TAB>address` per line)."""
    pairs = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2:
            pairs.append((fields[0], fields[1]))
    return pairs


def dbus_int(text: str) -> int:
    """The integer of a `dbus-send --print-reply` answer such as `   int32 2`."""
    match = _DBUS_INT.search(text)
    if match is None:
        raise ParseError("no integer in the D-Bus reply")
    return int(match.group(1))


def cloud_init_status(text: str) -> str:
    """The value of the `status:` line of `cloud-init status`, lower-cased."""
    match = _CLOUD_INIT_STATUS.search(text)
    if match is None:
        raise ParseError("no 'status:' line")
    return match.group(1).lower()


def iptables_backend(text: str) -> str:
    """'nf_tables' or 'legacy', from `iptables --version` (`iptables v1.8.9 (nf_tables)`)."""
    match = _IPTABLES_BACKEND.search(text)
    if not text.startswith("iptables") or match is None:
        raise ParseError(f"unrecognised version line {text.strip()[:40]!r}")
    return match.group(1)


def proxy_mode(value: str) -> str | None:
    """'nftables' or 'iptables' from a K3S_KUBE_PROXY_MODE / proxy-mode value; None otherwise."""
    mode = value.strip().lower()
    return {"nft": "nftables", "nftables": "nftables", "iptables": "iptables"}.get(mode)


def dropin_proxy_mode(text: str) -> str | None:
    """The `proxy-mode=` a k3s config drop-in passes in `kube-proxy-arg`, None when it sets none."""
    try:
        data: Any = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise ParseError(f"not YAML ({one_reason(exc)})") from exc
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ParseError("not a YAML mapping")
    args = data.get("kube-proxy-arg")
    if isinstance(args, str):
        args = [args]
    if args is None:
        return None
    if not isinstance(args, list):
        raise ParseError("kube-proxy-arg is neither a string nor a list")
    for arg in args:
        key, _, value = str(arg).partition("=")
        if key.strip().lstrip("-") == "proxy-mode":
            mode = proxy_mode(value)
            if mode is None:
                raise ParseError(f"unsupported proxy-mode {value.strip()[:20]!r}")
            return mode
    return None


def one_reason(exc: BaseException) -> str:
    """An exception's message on one line (YAML errors span several)."""
    return " ".join(str(exc).split())[:160] or type(exc).__name__


def node_ready(text: str, host: str) -> tuple[bool | None, list[str]]:
    """From `kubectl get nodes -o json`: is `host` Ready (None: not listed), and the node names.

    ParseError when the output is not a node list.
    """
    try:
        data: Any = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ParseError("kubectl printed something that is not JSON") from exc
    items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(items, list):
        raise ParseError("kubectl's JSON has no node list")
    names: list[str] = []
    ready: bool | None = None
    for item in items:
        meta = item.get("metadata") if isinstance(item, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(name, str):
            continue
        names.append(name)
        if ready is None and host_key(name) == host_key(host):
            ready = _is_ready(item.get("status"))
    return ready, names


def _is_ready(status: Any) -> bool:
    """True when a node's status carries the condition Ready=True."""
    conditions = status.get("conditions") if isinstance(status, dict) else None
    return any(
        isinstance(cond, dict) and cond.get("type") == "Ready" and cond.get("status") == "True"
        for cond in (conditions if isinstance(conditions, list) else [])
    )


def check_config_problems(text: str) -> list[str]:
    """The lines of `k3s check-config` that report something missing or failing."""
    problems = []
    for raw in text.splitlines():
        line = _ANSI.sub("", raw).strip()
        lower = line.lower()
        if line.startswith("-") and (lower.endswith("missing") or "fail" in lower):
            problems.append(line.lstrip("- "))
    return problems
