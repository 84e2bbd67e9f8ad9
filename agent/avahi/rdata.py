"""A DNS-SD service as the raw records Avahi's EntryGroup.AddRecord takes (pure, no D-Bus).

Why not AddService: it puts the shared PTR and the unique SRV and TXT in one entry group, and
Avahi answers for the PTR while it is still probing the SRV and TXT (avahi-core/announce.c,
avahi_entry_is_registered: a waiting shared record counts as registered). A peer asking in those
~0.75 s learns a name it cannot resolve yet; its resolver queries on and the stock
`avahi-browse -r` hangs past its 1 s all-for-now, which keeps the peer's querier alive and so
keeps a later, withdrawn advert listed from its cache for the full second that RFC 6762 §10.1
grants a goodbye. So the publisher claims the SRV and TXT in one group and adds the pointers in a
second group once the claim is established: a peer sees the advert whole or not at all.

The records are the ones avahi_server_add_service builds (avahi-core/entry.c): SRV (unique,
TTL 120) and TXT (unique, TTL 4500) on `<instance>.<type>.<domain>`; PTR `<type>.<domain>` to it
and PTR `_services._dns-sd._udp.<domain>` to the type (shared, TTL 4500). RFC 6763 §4-7;
RFC 1035 §3.3 for the wire forms.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from agent.mdns.records import Advertisement

CLASS_IN = 1
TYPE_PTR = 12
TYPE_TXT = 16
TYPE_SRV = 33
TTL_HOST_NAME = 120  # AVAHI_DEFAULT_TTL_HOST_NAME, for SRV
TTL_DEFAULT = 4500  # AVAHI_DEFAULT_TTL, for PTR and TXT
SERVICE_ENUMERATION = "_services._dns-sd._udp"  # RFC 6763 §9
_PLAIN = frozenset(b"-_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


@dataclass(frozen=True)
class RawRecord:
    """One record for AddRecord: the name in Avahi's escaped text form, and wire rdata."""

    name: str
    rtype: int
    ttl: int
    rdata: bytes
    unique: bool


def escape_label(label: str) -> str:
    """A label as Avahi's name parser reads it, escaped as avahi_escape_label does."""
    out = []
    for byte in label.encode():
        if byte in (0x2E, 0x5C):  # '.' and '\'
            out.append("\\" + chr(byte))
        elif byte in _PLAIN:
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03d}")
    return "".join(out)


def split_name(name: str) -> list[bytes]:
    """The labels of an escaped name such as Avahi's GetHostNameFqdn returns."""
    labels: list[bytes] = []
    label = bytearray()
    i = 0
    while i < len(name):
        char = name[i]
        if char == "\\" and name[i + 1:i + 4].isdigit() and len(name[i + 1:i + 4]) == 3:
            label.append(int(name[i + 1:i + 4]))
            i += 4
            continue
        if char == "\\" and i + 1 < len(name):
            label += name[i + 1].encode()
            i += 2
            continue
        if char == ".":
            labels.append(bytes(label))
            label.clear()
        else:
            label += char.encode()
        i += 1
    if label:
        labels.append(bytes(label))
    return labels


def wire_name(labels: list[bytes]) -> bytes:
    """Uncompressed wire form: length-prefixed labels, then the root."""
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def txt_rdata(txt: tuple[bytes, ...]) -> bytes:
    """Length-prefixed strings; an empty TXT is one empty string (RFC 6763 §6.1)."""
    return b"".join(bytes([len(item)]) + item for item in txt) if txt else b"\x00"


def claim_records(advert: Advertisement, host_fqdn: str, domain: str) -> list[RawRecord]:
    """The unique SRV and TXT of every service type: what Avahi probes before anything else."""
    target = wire_name(split_name(host_fqdn))
    records = []
    for stype in advert.stypes:
        owner = f"{escape_label(advert.name)}.{stype}.{domain}"
        records.append(RawRecord(owner, TYPE_SRV, TTL_HOST_NAME,
                                 struct.pack("!HHH", 0, 0, advert.port) + target, True))
        records.append(RawRecord(owner, TYPE_TXT, TTL_DEFAULT, txt_rdata(advert.txt), True))
    return records


def pointer_records(advert: Advertisement, domain: str) -> list[RawRecord]:
    """The shared PTRs that make browsers find the instance and its types."""
    records = []
    for stype in advert.stypes:
        type_labels = split_name(f"{stype}.{domain}")
        instance = wire_name([advert.name.encode(), *type_labels])
        records.append(RawRecord(f"{stype}.{domain}", TYPE_PTR, TTL_DEFAULT, instance, False))
        records.append(RawRecord(f"{SERVICE_ENUMERATION}.{domain}", TYPE_PTR, TTL_DEFAULT,
                                 wire_name(type_labels), False))
    return records
