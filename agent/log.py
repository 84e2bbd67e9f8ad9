"""One sanitized `event=<name> key=value ...` line per event, for the journal (DESIGN.md §A).

Address rules of the Redactor. An address is a whole word: no letter, digit, `_`, `.` or `:` may
touch it on the left (except the `:` of a label that is not all hex, as in `ip6:fe80::1`), nor a
letter, digit, `_`, `.<digit>`, `:<word>` or `::` on the right.
- IPv4 is exactly four dot-separated decimal octets of 0..255 (`010` reads as ten); `0.47.3` and
  `1.2.3.4.5` are not.
- IPv6 is any run of hex groups and colons (with an optional dotted IPv4 tail) that `ipaddress`
  accepts; a `%zone` after it and `[...]:port` around it stay readable. A run that fails is retried
  without one trailing `:` (end of a clause) and without a trailing `:<decimal>` (an unbracketed
  port). `12:30:45` and colon runs such as `a:a:a` fail and are left alone.
- `1::`, `a::` and `::1` are valid addresses, so they are replaced: a pseudonym for a rare false
  positive costs less than a leaked address.
- The unspecified address (`::` alone, `0.0.0.0`, `0:0:0:0:0:0:0:0`) is kept: it identifies no host,
  and `::` alone is also C++/Ruby scope syntax.
- `::ffff:a.b.c.d` (IPv4-mapped) is the IPv4 host a dual-stack socket reports, so it gets the
  IPv4 address's pseudonym.
- MAC is six two-hex-digit groups joined by `:` or by `-` (not part of a longer dash-pair run).
"""

import contextlib
import hashlib
import hmac
import ipaddress
import math
import os
import re
import sys
import tempfile
import threading
import unicodedata
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal, TextIO

from agent import const

Level = Literal["debug", "info", "notice", "warning", "error", "critical"]

# sd-daemon(3) prefixes: journald strips `<N>` and stores N as the syslog PRIORITY.
_PRIORITY: dict[str, int] = {
    "critical": 2,
    "error": 3,
    "warning": 4,
    "notice": 5,
    "info": 6,
    "debug": 7,
}

_REDACTED = "<token>"

# k3s tokens: secure `K10<ca-sha256>::<user>:<password>`, any other `K10...` word, and the bare
# `...::server:<password>` / `::node:` and bootstrap `::<id6>.<secret16>` shapes. Every branch may
# start only at a word start, so a long word is scanned once: no quadratic backtracking.
_TOKEN = re.compile(
    r"(?<!\w)K10[^\s\"'`]{8,}"
    r"|(?<![\w.+/-])[\w.+/-]*::(?:server|node):[^\s\"'`]+"
    r"|(?<![\w.+/-])[\w.+/-]*::[a-z0-9]{6}\.[a-z0-9]{16}(?![a-z0-9])"
)

_HEX = "[0-9A-Fa-f]"
_V4 = r"(?:\d{1,3}\.){3}\d{1,3}"
# One pass finds candidates of three shapes and code validates them. Each repetition must consume a
# separator and no shape may start inside a run, so a match attempt never backtracks quadratically.
# A colon run may follow a `label:` that is not all hex (`ip6:fe80::1`, `HWaddr:aa:bb:...`).
_ADDRESS = re.compile(
    r"(?<![\w:.])(?P<label>(?=\w*?[G-Zg-z_])\w+:)?"
    rf"(?P<colon>(?:{_HEX}{{0,4}}:){{2,}}(?:{_V4}(?::\d{{1,5}})?|{_HEX}{{1,4}})?)"
    r"(?!\w|\.\d|:[\w:])"
    rf"|(?<![\w.])(?P<v4>{_V4})(?!\w|\.\d)"
    rf"|(?<!\w)(?<!(?<!\w){_HEX}{{2}}-)(?P<dash>{_HEX}{{2}}(?:-{_HEX}{{2}}){{5}})(?!\w|-{_HEX})"
)
_MAC_COLON = re.compile(rf"{_HEX}{{2}}(?::{_HEX}{{2}}){{5}}")

_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
# C0, DEL, C1, line/paragraph separators, zero-width and bidi controls, BOM, lone surrogates.
_CONTROL = (
    r"\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff\ud800-\udfff"
)
_NEEDS_QUOTES = re.compile(rf'[\s"=\\{_CONTROL}]')
_ESCAPED = re.compile(rf'["\\{_CONTROL}]')
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Redactor:
    """Removes tokens and configured secrets; replaces addresses by salted pseudonyms."""

    def __init__(self, salt: bytes, *, addresses: bool = True, secrets: Iterable[str] = ()) -> None:
        self._salt = salt
        self._addresses = addresses
        self._secrets: set[str] = set()
        self._secret_re: re.Pattern[str] | None = None
        for value in secrets:
            self.add_secret(value)

    def add_secret(self, value: str) -> None:
        """Always redact `value` and a k3s token's password part; ignore values under 8 chars."""
        parts = {value}
        after = value.partition("::")[2]
        parts.update((after, after.partition(":")[2]))
        new = {p for p in parts if len(p) >= const.SECRET_MIN_LENGTH} - self._secrets
        if new:
            self._secrets |= new
            ordered = sorted(self._secrets, key=len, reverse=True)
            self._secret_re = re.compile("|".join(map(re.escape, ordered)))

    def __call__(self, text: str) -> str:
        """`text` with secrets and tokens as `<token>` and addresses as pseudonyms."""
        if self._secret_re is not None:
            # A replacement can join its neighbours into a new match; every pass shrinks the text
            # (secrets are longer than the mark), so this ends.
            count = 1
            while count:
                text, count = self._secret_re.subn(_REDACTED, text)
        text = _TOKEN.sub(_REDACTED, text)
        if self._addresses:
            text = _ADDRESS.sub(self._replace, text)
        return text

    def _replace(self, match: re.Match[str]) -> str:
        """The pseudonym text for one `_ADDRESS` match, or the match unchanged if it is none."""
        if (colon := match["colon"]) is not None:
            return (match["label"] or "") + self._colon_run(colon)
        if (v4 := match["v4"]) is not None:
            octets = [int(octet) for octet in v4.split(".")]
            if max(octets) > 255:
                return v4
            return self._ip(ipaddress.IPv4Address(bytes(octets)), v4)
        return self._pseudonym("mac", match["dash"].lower().replace("-", ":"))

    def _colon_run(self, text: str) -> str:
        """`text` (hex groups and colons) with the MAC or IPv6 address it holds replaced."""
        candidates = [(text, "")]
        if text.endswith(":"):
            candidates.append((text[:-1], ":"))
        head, _, port = text.rpartition(":")
        if head and port.isdigit():
            candidates.append((head, ":" + port))
        for candidate, rest in candidates:
            if _MAC_COLON.fullmatch(candidate):
                return self._pseudonym("mac", candidate.lower()) + rest
            try:
                address = ipaddress.IPv6Address(candidate)
            except ValueError:
                continue
            return self._ip(address, candidate) + rest
        return text

    def _ip(self, address: _Address, text: str) -> str:
        """The pseudonym of `address` (IPv4-mapped as IPv4); `text` if it is unspecified."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_unspecified:
            return text
        return self._pseudonym("ip", str(address))

    def _pseudonym(self, kind: str, normalized: str) -> str:
        """`<kind>-<hex>`: a salted HMAC-SHA256 of the normalized address, truncated."""
        digest = hmac.new(self._salt, f"{kind}:{normalized}".encode(), hashlib.sha256)
        return f"{kind}-{digest.hexdigest()[: const.PSEUDONYM_HEX_DIGITS]}"


def load_salt(path: Path) -> bytes:
    """The 16-byte salt stored at `path`, created (0600, atomically) if missing; random on error."""
    try:
        return _read_or_create_salt(path)
    except OSError:
        return os.urandom(const.LOG_SALT_SIZE)


def _read_or_create_salt(path: Path) -> bytes:
    """The salt at `path`, or a fresh one published there; raises OSError."""
    with contextlib.suppress(FileNotFoundError):
        salt = path.read_bytes()
        if len(salt) == const.LOG_SALT_SIZE:
            return salt
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fresh = os.urandom(const.LOG_SALT_SIZE)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(fresh)
            file.flush()
            os.fsync(file.fileno())
        try:
            # link() publishes only if absent: two first runs racing end up with one salt.
            os.link(tmp, path)
        except FileExistsError:
            salt = path.read_bytes()
            if len(salt) == const.LOG_SALT_SIZE:
                return salt
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return fresh


def format_event(event: str, fields: Mapping[str, object], redactor: Redactor | None = None) -> str:
    """`event=<name> k=v ...` in field order; None skipped; values redacted, quoted, one line."""
    parts = [f"event={_name(event)}"]
    for key, value in fields.items():
        if value is None:
            continue
        text = _render(value)
        if redactor is not None:
            text = redactor(text)
        parts.append(f"{_name(key)}={_quote(text)}")
    return " ".join(parts)


def _name(name: str) -> str:
    """`name` with every character that could break a key or event name replaced by `_`."""
    return _NAME_UNSAFE.sub("_", name) or "_"


def _render(value: object) -> str:
    """`value` as text: bools as true/false, floats to at most 3 decimals, else str()."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            return repr(value)
        text = f"{value:.3f}".rstrip("0")
        text = text + "0" if text.endswith(".") else text
        return "0.0" if text == "-0.0" else text
    try:
        return str(value)
    except Exception:  # a log line must not crash its caller over a broken __str__
        return f"<unprintable {type(value).__name__}>"


def _quote(text: str) -> str:
    """`text` as is when safe, else double-quoted with quotes, backslashes and controls escaped."""
    if text and _NEEDS_QUOTES.search(text) is None:
        return text
    return '"' + _ESCAPED.sub(_escape, text) + '"'


def _escape(match: re.Match[str]) -> str:
    """The escape sequence of one unsafe character."""
    return _escape_char(match[0])


def _escape_char(char: str) -> str:
    """`\\n`, `\\x1b`, `\\u202e` or `\\U000e0041`: the escape sequence of `char`."""
    if (known := _ESCAPES.get(char)) is not None:
        return known
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """`text` safe to print on a terminal: backslashes and every control, format (bidi,
    zero-width), unassigned and separator character but the space escaped, the rest kept."""
    return "".join(
        _escape_char(c) if c == "\\" or (c != " " and unicodedata.category(c)[0] in "CZ") else c
        for c in text
    )


def _is_journal(stream: TextIO) -> bool:
    """Whether `stream` is the journal stream systemd names in JOURNAL_STREAM (systemd.exec(5))."""
    device, sep, inode = os.environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        info = os.fstat(stream.fileno())
        return bool(sep) and (info.st_dev, info.st_ino) == (int(device), int(inode))
    except (OSError, ValueError):  # no fileno (io.UnsupportedOperation), closed, or not numbers
        return False


class EventLog:
    """Writes one redacted line per event to a stream, journald-prefixed when it is the journal."""

    debug_enabled: bool

    def __init__(
        self,
        stream: TextIO | None = None,
        redactor: Redactor | None = None,
        *,
        journal: bool | None = None,
    ) -> None:
        self._stream = sys.stderr if stream is None else stream
        # Safe before the configuration is read: tokens and addresses go even without a salt file.
        self._redactor = Redactor(os.urandom(const.LOG_SALT_SIZE)) if redactor is None else redactor
        self._journal = _is_journal(self._stream) if journal is None else journal
        # Lines may come from worker threads (asyncio.to_thread, the GLib thread): keep each whole.
        self._lock = threading.Lock()
        self.debug_enabled = False

    def set_redactor(self, redactor: Redactor) -> None:
        """Use `redactor` for every later line."""
        self._redactor = redactor

    def redact(self, text: str) -> str:
        """`text` as this log would write it: tokens removed, addresses as pseudonyms."""
        return self._redactor(text)

    def event(self, name: str, level: Level = "info", /, **fields: object) -> None:
        """Write and flush one line for `name` (debug only when enabled); never raise."""
        if level == "debug" and not self.debug_enabled:
            return
        line = format_event(name, fields, self._redactor)
        if self._journal:
            line = f"<{_PRIORITY.get(level, _PRIORITY['info'])}>{line}"
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._stream.write(line + "\n")
            self._stream.flush()
