"""Authenticated adverts: a MAC over what a node publishes, keyed from the cluster's token.

mDNS lets any host on the link publish anything. Every node of a cluster holds the same join
token, so each advert carries last a `mac=`: HMAC-SHA256 over the instance name, the port and
every TXT string before it, in wire order, under a key derived from the token's secret with
HKDF-SHA256 (RFC 5869) for this purpose and this cluster/env. The token itself never leaves the
node; a key for another purpose or cluster says nothing about this one. The secret is the
token's password part: `K10<ca>::server:<pw>` and a bare `<pw>` are one cluster's token.

An advert whose MAC does not verify never counts for the election, the gates or a join. What a
MAC cannot tell is when an advert was made: `boot=` (a per-start counter, then random) lets a
reader that has seen a node's newer start recognise a replay of an older one (agent/cluster/
peers.py). A forger that replays a node's current advert while that node is away is not caught
here; what it can make others do is wait (see agent/cluster/election.py), never join it: the
token goes only to a server whose TLS chain verifies against the authenticated `ca=`.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

MAC_KEY = "mac"
MAC_HEX = 32  # 128 bits of HMAC-SHA256 (RFC 2104 §5: at least half the hash, and >= 80 bits)
BOOT_HEX = 16  # 8 hex digits of start counter, 8 of random
_LABEL = b"sugarkube advert mac v1"
# Avahi renames an instance whose name another host holds ("name #2", avahi_alternative_service_
# name): the MAC covers the name as the node chose it.
_ALTERNATIVE = re.compile(r" #[0-9]+\Z")
_MAC_ITEM = re.compile(rb"mac=([0-9a-f]{%d})" % MAC_HEX, re.IGNORECASE)


def _hkdf_sha256(secret: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869's extract-then-expand, for one block or more."""
    prk = hmac.new(salt, secret, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out, counter = out + block, counter + 1
    return out[:length]


@dataclass(frozen=True)
class AdvertKey:
    """The MAC key of one cluster/env; repr never shows it."""

    secret: bytes = field(repr=False)

    @classmethod
    def derive(cls, password: str, cluster: str, env: str) -> AdvertKey:
        info = _LABEL + b" " + f"{cluster.lower()}/{env.lower()}".encode()
        return cls(_hkdf_sha256(password.encode("utf-8", "surrogateescape"), _LABEL, info))

    def _mac(self, name: str, port: int, items: Sequence[bytes]) -> str:
        base = _ALTERNATIVE.sub("", name).encode("utf-8", "surrogateescape")
        message = [_LABEL, len(base).to_bytes(2, "big"), base, port.to_bytes(2, "big")]
        for item in items:
            message += [len(item).to_bytes(1, "big"), item]
        digest = hmac.new(self.secret, b"".join(message), hashlib.sha256).hexdigest()
        return digest[:MAC_HEX]

    def sign(self, name: str, port: int, items: Sequence[bytes]) -> list[bytes]:
        """ITEMS with `mac=` appended last."""
        return [*items, f"{MAC_KEY}={self._mac(name, port, items)}".encode()]

    def verify(self, name: str, port: int, items: Sequence[bytes]) -> str | None:
        """None when the advert is authentic; else why not, one word for `reason=`."""
        if not items:
            return "unauthenticated"
        found = _MAC_ITEM.fullmatch(items[-1])
        if found is None:
            return "unauthenticated"
        expected = self._mac(name, port, items[:-1]).encode()
        if not hmac.compare_digest(found.group(1).lower(), expected):
            return "unauthenticated"
        return None


def boot_nonce(starts: int, random_hex: str) -> str:
    """`boot=`: the start counter then random, fixed length; a later start compares higher."""
    return f"{starts % 16**8:08x}{random_hex[:8]:0>8}"


def boot_order(boot: str) -> int:
    """The start counter a well-formed `boot=` carries (-1 for none)."""
    return int(boot[:8], 16) if len(boot) == BOOT_HEX else -1
