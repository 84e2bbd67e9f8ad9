"""What a node's mDNS adverts say: service type, instance name and TXT, built and read back.

Pure: no I/O. The layout is the contract of DESIGN.md §A "mDNS records". Reading is tolerant of
what real networks carry (RFC 6763 §6); a TXT we cannot use raises RecordError and nothing else.
"""

import ipaddress
import re
import unicodedata
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass, fields, replace
from enum import StrEnum
from typing import Literal

from agent.const import DNS_LABEL_MAX, ELECTION_KEY_HEX, TXT_STRING_MAX
from agent.mdns.auth import BOOT_HEX

SCHEMA_VERSION = 1


class Role(StrEnum):
    """What a node advertises itself as."""

    CANDIDATE = "candidate"
    BOOTSTRAP = "bootstrap"
    SERVER = "server"
    AGENT = "agent"


def split_txt(rdata: bytes) -> tuple[bytes, ...]:
    """TXT rdata as its strings in wire order (RFC 1035 §3.3.14); a string cut short is dropped."""
    items: list[bytes] = []
    offset = 0
    while offset < len(rdata):
        length = rdata[offset]
        item = rdata[offset + 1 : offset + 1 + length]
        if len(item) < length:
            break
        items.append(item)
        offset += 1 + length
    return tuple(items)


class RecordError(ValueError):
    """A record we cannot build or use; the message is one line, safe to log."""


@dataclass(frozen=True)
class Advert:
    """What a node says about itself in its TXT record."""

    cluster: str
    env: str
    role: Role
    phase: str
    host: str
    leader: str = ""
    ip4: str = ""
    ip6: str = ""
    key: str = ""
    ca: str = ""
    vote: str = ""  # the election key this node votes for, or is bound to (agent/cluster/)
    admit: str = ""  # a serving server: the key of the fresh node it admits to join as a server
    members: str = ""  # a serving server: etcd's members (voters and learners), "" unknown
    servers: str = ""  # the SUGARKUBE_SERVERS this node runs with ("" from older agents)
    boot: str = ""  # this start's nonce (agent/mdns/auth.py): a replay of an older start shows
    v: int = SCHEMA_VERSION


@dataclass(frozen=True)
class ServiceRecord:
    """One resolved mDNS service as a browser sees it on one interface and protocol."""

    name: str
    stype: str
    domain: str
    host: str
    address: str
    port: int
    txt: tuple[bytes, ...]
    interface: int = -1
    protocol: int = -1  # Avahi protocol: 0 inet, 1 inet6, -1 unspec
    local: bool = False  # published by this host's avahi-daemon

    @property
    def key(self) -> tuple[str, str, str]:
        """(name, stype, domain): the same advert seen on any interface or protocol."""
        return (self.name, self.stype, self.domain)


# Control and format characters (C0, DEL, C1, bidi overrides, zero-width), line and paragraph
# separators, and lone surrogates (surrogateescape'd bytes): never part of a name, and able to
# break or spoof a log line.
_INVISIBLE = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
# Cluster and env end up inside a DNS-SD service type label; Avahi accepts any label of up to
# 63 bytes (avahi-common/domain.c), we keep to characters that need no escaping there and cannot
# be confused with the instance name's "@" and " (" separators.
_NAME_PART = re.compile(r"[a-z0-9_-]+")
_VERSION = re.compile(r"[0-9]{1,9}")  # ASCII digits: int() also takes "+1", "1_0", non-ASCII digits
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_COUNT = re.compile(r"[0-9]{1,3}")
_ELECTION_KEY = re.compile(rf"[0-9a-f]{{{ELECTION_KEY_HEX}}}")
_BOOT = re.compile(rf"[0-9a-f]{{{BOOT_HEX}}}")
_REQUIRED = ("cluster", "env", "role")
# DESIGN.md §A: the bash scripts' keys, then ours from v on.
_TXT_ORDER = (
    "k3s", "cluster", "env", "role", "phase", "leader", "host", "ip4", "ip6", "v", "key", "ca",
    "vote", "admit", "members", "servers", "boot",
)  # then mac=, which agent/mdns/auth.py appends


def _show(text: str) -> str:
    """Text quoted for a one-line message: repr escapes every non-printable character."""
    return repr(text if len(text) <= 40 else text[:40] + "...")


def _drop_invisible(text: str) -> str:
    """Text without control, format or separator characters."""
    return "".join(c for c in text if unicodedata.category(c) not in _INVISIBLE)


def normalize_host(name: str) -> str:
    """Lowercase host name with one ".local" suffix where it had no domain; "" stays ""."""
    text = re.sub(r"[\s.]+\Z", "", _drop_invisible(name).strip()).lower()
    if not text:
        return ""
    labels = text.split(".")
    # "node1.local.local" comes from scripts that append ".local" to a name that had it already.
    while len(labels) > 1 and labels[-1] == labels[-2] == "local":
        labels.pop()
    if len(labels) == 1:
        labels.append("local")
    return ".".join(labels)


def _host_flaw(host: str) -> str | None:
    """Why a normalized host name cannot be used, or None."""
    if "\ufffd" in host:
        return "not UTF-8"
    if any(c.isspace() for c in host):
        return "contains whitespace"
    if any(not 0 < len(label.encode()) <= DNS_LABEL_MAX for label in host.split(".")):
        return f"has an empty label or one over {DNS_LABEL_MAX} bytes (RFC 1035 §2.3.4)"
    return None


def _name_part(what: str, value: str) -> str:
    """Cluster or env, lowercased, as it goes into a service type; RecordError when unfit."""
    lowered = value.lower()
    if not _NAME_PART.fullmatch(lowered):
        raise RecordError(f"{what} {_show(value)} must be letters, digits, '-' or '_'")
    return lowered


def service_type(cluster: str, env: str) -> str:
    """The DNS-SD type the existing scripts browse: "_k3s-<cluster>-<env>._tcp"."""
    label = f"_k3s-{_name_part('cluster', cluster)}-{_name_part('env', env)}"
    if len(label) > DNS_LABEL_MAX:
        raise RecordError(f"service type {_show(label)} is over {DNS_LABEL_MAX} bytes")
    return f"{label}._tcp"


def instance_name(cluster: str, env: str, hostname: str, role: Role) -> str:
    """The instance name "k3s-<cluster>-<env>@<host>.local (<role>)"; RecordError when unfit."""
    host = normalize_host(hostname)
    flaw = "is empty" if not host else _host_flaw(host)
    if flaw:
        raise RecordError(f"host name {_show(hostname)} {flaw}")
    name = f"k3s-{_name_part('cluster', cluster)}-{_name_part('env', env)}@{host} ({role})"
    if len(name.encode()) > DNS_LABEL_MAX:
        raise RecordError(f"instance name {_show(name)} is over {DNS_LABEL_MAX} bytes")
    return name


# --- TXT ---------------------------------------------------------------------------------------


def _host_value(text: str) -> str:
    """A peer's normalized host name, "" for none; ValueError(why) when unusable."""
    host = normalize_host(text)
    flaw = _host_flaw(host) if host else None
    if flaw:
        raise ValueError(flaw)
    return host


def _ip_value(version: int) -> Callable[[str], str]:
    """A rule giving the canonical text of an IPv4 or IPv6 address (IPv6 may carry a %zone)."""

    def canonical(text: str) -> str:
        if not text:
            return ""
        with suppress(ValueError):
            address = ipaddress.ip_address(text)
            # ipaddress takes any IPv6 zone text; U+FFFD means it came from undecodable bytes.
            if address.version == version and "\ufffd" not in text:
                return str(address)
        raise ValueError(f"not an IPv{version} address")

    return canonical


def _version_value(text: str) -> str:
    """The schema version as canonical digits; any v above ours is read forward-compatibly."""
    if not _VERSION.fullmatch(text) or int(text) < 1:
        raise ValueError(f"not a positive integer, read as {SCHEMA_VERSION}")
    return str(int(text))


def _count_value(text: str) -> str:
    """A small count (etcd's members, servers), "" for unknown."""
    if text and not _COUNT.fullmatch(text):
        raise ValueError("not a count of 1-3 digits")
    return str(int(text)) if text else ""


def _ca_value(text: str) -> str:
    """The cluster CA's sha256 as lowercase hex, "" for none."""
    lowered = text.lower()
    if lowered and not _SHA256_HEX.fullmatch(lowered):
        raise ValueError("not a sha256 hex digest")
    return lowered


def _fixed_hex(pattern: re.Pattern[str], what: str) -> Callable[[str], str]:
    """A rule for a fixed-length lowercase hex value ("" for none)."""

    def canonical(text: str) -> str:
        lowered = text.lower()
        if lowered and not pattern.fullmatch(lowered):
            raise ValueError(f"not {what}")
        return lowered

    return canonical


# Per-key rules after the generic cleaning: the canonical value, or ValueError(why) to drop it.
_FIELD_RULES: dict[str, Callable[[str], str]] = {
    "cluster": str.lower, "env": str.lower, "role": str.lower,
    "host": _host_value, "leader": _host_value, "ip4": _ip_value(4), "ip6": _ip_value(6),
    "v": _version_value, "ca": _ca_value, "members": _count_value, "servers": _count_value,
    "key": _fixed_hex(_ELECTION_KEY, f"{ELECTION_KEY_HEX} hex digits"),
    "vote": _fixed_hex(_ELECTION_KEY, f"{ELECTION_KEY_HEX} hex digits"),
    "admit": _fixed_hex(_ELECTION_KEY, f"{ELECTION_KEY_HEX} hex digits"),
    "boot": _fixed_hex(_BOOT, f"{BOOT_HEX} hex digits"),
}
_FALLBACK = {"v": str(SCHEMA_VERSION)}  # what a dropped value reads as; "" otherwise


def _clean_value(text: str) -> str:
    """Value without invisible characters, surrounding whitespace or one pair of quotes."""
    text = _drop_invisible(text).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def parse_txt(items: Iterable[bytes]) -> tuple[dict[str, str], list[str]]:
    """Cleaned values by lowercase key, and what was wrong, as one-line strings; never raises."""
    values: dict[str, str] = {}
    problems: list[str] = []
    for index, item in enumerate(items):
        raw = bytes(item)
        if not raw:
            continue  # RFC 6763 §6.1: a lone empty string is how an empty TXT is sent
        if len(raw) > TXT_STRING_MAX:
            problems.append(f"item {index}: {len(raw)} bytes > {TXT_STRING_MAX} (RFC 6763 §6.1)")
            continue
        raw_key, _, raw_value = raw.partition(b"=")
        if not raw_key:
            problems.append(f"item {index}: starts with '=', ignored (RFC 6763 §6.4)")
            continue
        try:
            text_key = raw_key.decode()
        except UnicodeDecodeError:
            problems.append(f"item {index}: key is not UTF-8, ignored")
            continue
        # RFC 6763 §6.4: keys compare case-insensitively; spaces in a key are significant.
        key = _drop_invisible(text_key).lower()
        if not key:
            problems.append(f"item {index}: key is only control characters, ignored")
            continue
        if key in values:
            # RFC 6763 §6.4: all but the first occurrence of a key are ignored.
            problems.append(f"item {index}: repeated key {_show(key)} ignored (RFC 6763 §6.4)")
            continue
        try:
            text = raw_value.decode()
        except UnicodeDecodeError:
            text = raw_value.decode(errors="replace")
            problems.append(f"item {index}: value of {_show(key)} is not UTF-8")
        if key != text_key.lower() or _drop_invisible(text) != text:
            problems.append(f"item {index}: control characters removed from {_show(key)}")
        # An item without "=" is a boolean attribute (RFC 6763 §6.4): present, with value "".
        value = _clean_value(text)
        rule = _FIELD_RULES.get(key)
        if rule is not None:
            try:
                value = rule(value)
            except ValueError as err:
                problems.append(f"item {index}: {key}={_show(value)} dropped: {err}")
                value = _FALLBACK.get(key, "")
        values[key] = value
    return values, problems


def parse_advert(items: Iterable[bytes]) -> Advert:
    """The Advert a TXT record carries; RecordError with the reason when it is unusable."""
    values, _ = parse_txt(items)
    if "k3s" not in values:
        raise RecordError("no k3s=1: not a sugarkube k3s advert")
    if values["k3s"] != "1":
        raise RecordError(f"k3s={_show(values['k3s'])}, expected k3s=1")
    for name in _REQUIRED:
        if not values.get(name):
            raise RecordError(f"advert has no {name}=")
    try:
        role = Role(values["role"])
    except ValueError as err:
        raise RecordError(f"unknown role {_show(values['role'])}") from err
    return Advert(
        cluster=values["cluster"], env=values["env"], role=role, phase=values.get("phase", ""),
        host=values.get("host", ""), leader=values.get("leader", ""), ip4=values.get("ip4", ""),
        ip6=values.get("ip6", ""), key=values.get("key", ""), ca=values.get("ca", ""),
        vote=values.get("vote", ""), admit=values.get("admit", ""),
        members=values.get("members", ""), servers=values.get("servers", ""),
        boot=values.get("boot", ""), v=int(values.get("v", SCHEMA_VERSION)),
    )


def _canonical(advert: Advert) -> Advert:
    """The advert with the normalizations parsing applies; values it would drop are kept."""

    def norm(name: str) -> str:
        value: str = getattr(advert, name)
        with suppress(ValueError):  # kept as is: the read-back check in encode_txt names it
            value = _FIELD_RULES[name](value)
        return value

    return replace(
        advert, cluster=norm("cluster"), env=norm("env"), host=norm("host"),
        leader=norm("leader"), ip4=norm("ip4"), ip6=norm("ip6"), ca=norm("ca"),
        members=norm("members"), servers=norm("servers"), key=norm("key"), vote=norm("vote"),
        admit=norm("admit"), boot=norm("boot"),
    )


def encode_txt(advert: Advert) -> list[bytes]:
    """The TXT strings in contract order; RecordError unless they read back as this advert."""
    advert = _canonical(advert)
    items: list[bytes] = []
    for key in _TXT_ORDER:
        value = "1" if key == "k3s" else str(getattr(advert, key))
        try:
            item = f"{key}={value}".encode()
        except UnicodeEncodeError as err:  # lone surrogates, e.g. from a surrogateescape'd name
            raise RecordError(f"TXT item {key}= is not encodable as UTF-8") from err
        if len(item) > TXT_STRING_MAX:
            raise RecordError(f"TXT item {key}= is {len(item)} bytes, over {TXT_STRING_MAX}")
        items.append(item)
    _, problems = parse_txt(items)
    if problems:
        raise RecordError(f"advert would not read back: {problems[0]}")
    parsed = parse_advert(items)
    for field in fields(Advert):
        if getattr(parsed, field.name) != getattr(advert, field.name):
            shown = _show(str(getattr(advert, field.name)))
            raise RecordError(f"advert {field.name}={shown} would not read back as written")
    return items


# -- what publishers take and browsers give: shared by the D-Bus path (agent/avahi/) and the
# no-D-Bus fallback (agent/mdns/fallback.py), so that neither imports the other --------------

Identity = tuple[str, str, str]  # name, type, domain: one advert across interfaces/protocols
EventKind = Literal["added", "updated", "removed", "all_for_now"]


@dataclass(frozen=True)
class Advertisement:
    """One instance name published under several service types, with one port and TXT."""

    name: str
    stypes: tuple[str, ...]
    port: int
    txt: tuple[bytes, ...]
    interface: int = -1  # AVAHI_IF_UNSPEC: every interface
    protocol: int = -1  # AVAHI_PROTO_UNSPEC


@dataclass(frozen=True)
class BrowseEvent:
    """A change in what a browser sees; ms_elapsed counts from the browser's start."""

    kind: EventKind
    record: ServiceRecord | None
    ms_elapsed: float

