"""The per-value parsers of the settings, and how a value is shown in an operator's message.

Each parser takes one YAML or environment value and returns it parsed, or raises _Invalid saying
what is wrong and what to do without the value; config.py adds the key and the file. ConfigError
and Secret live here, below configfile.py and config.py, so all three can use them; config.py is
where the rest of the agent imports them from.
"""

import hmac
import ipaddress
import os
import re
import stat
from pathlib import Path
from typing import Literal

from agent import const, tokens

WireProof = Literal["auto", "on", "off"]

ENVIRONMENTS = ("dev", "staging", "prod")
DEFAULT_METRICS_HOST = "0.0.0.0"
REDACTED = "<redacted>"

_SHOWN_MAX = 60  # chars of a value quoted in a message
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})

# The service type is _k3s-<cluster>-<env>._tcp. RFC 6763 §7.2 (via RFC 6335 §5.1) limits a
# *registered* service name to 15 characters to save bytes in names; the DNS limit is 63 bytes a
# label (RFC 1035 §2.3.4). We keep RFC 6335's character rules (letters, digits, single inner
# hyphens), which python-zeroconf's browser enforces even when not strict, but not the 15-character
# cap: it would refuse the default cluster in staging (_k3s-sugar-staging, 17), which the existing
# scripts advertise, while Avahi (avahi_is_valid_service_type_strict), mDNSResponder (it only logs
# for .local) and zeroconf's browser all accept longer names. const.CLUSTER_NAME_MAX bounds the
# length by the instance-name label instead.
_CLUSTER = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


class ConfigError(Exception):
    """One operator-facing line naming the key, the value and the file (or the env variable)."""

    exit_code: int = const.EXIT_CONFIG

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


class _Invalid(Exception):
    """A value parser's complaint: what is wrong and what to do, without the value."""


class Secret:
    """The join token: prints as '<redacted>' everywhere; .reveal() is the only way to the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The token itself, for the k3s config file and nothing else."""
        return self._value

    def __str__(self) -> str:
        return REDACTED

    def __repr__(self) -> str:
        return REDACTED

    def __format__(self, spec: str) -> str:
        return format(REDACTED, spec)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(_utf8(self._value), _utf8(other._value))

    def __hash__(self) -> int:
        return hash(self._value)


def _cluster(value: object) -> str:
    """The cluster name, lowercased; a DNS-SD service-name fragment (see _CLUSTER)."""
    name = _text(value).lower()
    if len(name) > const.CLUSTER_NAME_MAX or not _CLUSTER.fullmatch(name):
        raise _Invalid(
            f"must be 1 to {const.CLUSTER_NAME_MAX} letters, digits and single inner hyphens, "
            "such as 'sugar'"
        )
    return name


def _environment(value: object) -> str:
    """dev, staging or prod, any case."""
    name = _text(value).lower()
    if name not in ENVIRONMENTS:
        raise _Invalid(f"must be one of {', '.join(ENVIRONMENTS)}")
    return name


def _servers(value: object) -> int:
    """A count of at least 1, from a YAML integer or decimal digits."""
    problem = "must be a whole number of control-plane nodes, at least 1, such as 3"
    if isinstance(value, str):
        text = value.strip()
        if not (text.isascii() and text.isdigit()):
            raise _Invalid(problem)
        try:
            value = int(text)
        except ValueError:  # more digits than int() converts
            raise _Invalid(problem) from None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid(problem)
    return value


def _flag(value: object) -> bool:
    """A YAML boolean, 0 or 1, or one of the words in _TRUE and _FALSE."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
    raise _Invalid("must be one of 1, 0, true, false, yes, no, on, off")


def _wire_proof(value: object) -> WireProof:
    """auto, or a flag read as on or off (YAML 1.1 loads a bare `on` as true)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return "on" if _flag(value) else "off"
    except _Invalid:
        raise _Invalid("must be auto, on or off") from None


def _interface(value: object) -> str:
    """A Linux interface name as dev_valid_name() (net/core/dev.c) accepts, printable."""
    name = _text(value)
    if (
        not name
        or name in (".", "..")
        or any(c in "/:" or c.isspace() or not c.isprintable() for c in name)
        or len(name.encode()) > const.IFNAME_MAX
    ):
        raise _Invalid(
            f"is not a network interface name (1 to {const.IFNAME_MAX} bytes, no '/', ':' or "
            "spaces), such as 'eth0'; leave it unset for the default-route interface"
        )
    return name


def _listen(value: object) -> tuple[str, int]:
    """(host, port) from HOST:PORT, [IPv6]:PORT or :PORT (all IPv4 interfaces)."""
    text = _text(value)
    usage = "use HOST:PORT, such as 0.0.0.0:9469 or [::]:9469"
    host, colon, port_text = text.rpartition(":")
    if not colon:
        raise _Invalid(f"has no port; {usage}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not _is_ip(host, ipaddress.IPv6Address):
            raise _Invalid(f"has no IPv6 address between the brackets; {usage}")
    elif ":" in host:
        raise _Invalid(f"needs brackets around an IPv6 address; {usage}")
    elif not host:
        host = DEFAULT_METRICS_HOST
    elif not (_is_ip(host, ipaddress.IPv4Address) or _is_hostname(host)):
        raise _Invalid(f"has no valid host; {usage}")
    if not (port_text.isascii() and port_text.isdigit() and 1 <= int(port_text) <= 65535):
        raise _Invalid(f"needs a port from 1 to 65535; {usage}")
    return host, int(port_text)


def _file_path(value: object) -> Path:
    """An absolute path that names a file rather than a directory."""
    text = _text(value)
    if not text.startswith("/") or text.endswith("/") or "\0" in text:
        raise _Invalid("must be an absolute path to a file, starting with '/'")
    return Path(text)


def _token(value: object) -> Secret:
    """A non-empty token without whitespace or control characters."""
    token = _text(value)
    if not token:
        raise _Invalid("is empty; set the k3s join token or remove the setting")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise _Invalid("holds spaces, line breaks or control characters; a k3s token has none")
    try:
        tokens.parse_token(token)  # the rules k3s itself applies; its message never shows the token
    except tokens.TokenError as err:
        raise _Invalid(f"is not a token k3s accepts: {err}") from None
    return Secret(token)


def _token_text(data: bytes) -> str:
    """A token file's bytes as text, if small enough and UTF-8."""
    if len(data) > const.TOKEN_FILE_MAX_BYTES:
        raise _Invalid(
            f"is larger than {const.TOKEN_FILE_MAX_BYTES} bytes; it should hold only the token"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid("is not UTF-8 text; it should hold only the token") from None


def _read_bounded(path: Path, limit: int) -> tuple[bytes, os.stat_result]:
    """Up to limit + 1 bytes of path and the status of the file read; refuses directories, FIFOs
    and sockets (reading them blocks or fails), allows character devices such as /dev/null."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise IsADirectoryError(21, "Is a directory")
        if stat.S_ISFIFO(info.st_mode) or stat.S_ISSOCK(info.st_mode):
            raise OSError("not a regular file")
        return file.read(limit + 1), info


def _private(path: Path, info: os.stat_result, owner: int) -> None:
    """ConfigError unless the file holding a token, as read (info), is owned by `owner` (root)
    and readable by neither its group nor others."""
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != owner:
        problem = f"is owned by uid {info.st_uid}: chown root and chmod 600 it"
    elif mode & (stat.S_IRGRP | stat.S_IROTH):
        problem = f"is mode {mode:04o}: chmod 600 it"
    else:
        return
    raise ConfigError(
        f"{_show_path(path)} holds a token but {problem} (root-owned, not readable by others)"
    )


def _text(value: object) -> str:
    """A YAML or env string, trimmed; anything else is invalid."""
    if not isinstance(value, str):
        quote = "" if isinstance(value, dict | list) else "; put it in quotes"
        raise _Invalid(f"must be text, not {_kind(value)}{quote}")
    return value.strip()


def _is_ip(host: str, kind: type[ipaddress.IPv4Address] | type[ipaddress.IPv6Address]) -> bool:
    """Whether host is an address of that kind."""
    try:
        kind(host)
    except ValueError:
        return False
    return True


def _is_hostname(host: str) -> bool:
    """Whether host is an RFC 1123 host name."""
    labels = host.removesuffix(".").split(".")
    # An all-numeric last label would be a mistyped IPv4 address (RFC 3696 §2).
    return (
        len(host) <= 253
        and all(_HOST_LABEL.fullmatch(label) for label in labels)
        and not labels[-1].isdigit()
    )


def _kind(value: object) -> str:
    """How a YAML value's type reads in a sentence."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", str: "text"}
    kinds |= {dict: "a mapping", list: "a list", bytes: "binary data", type(None): "null"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _show(value: object) -> str:
    """'=<repr>' for a scalar, ' (<kind>)' for anything else; clipped, one line."""
    if isinstance(value, str):
        return f"={_clip(value)!r}"
    if isinstance(value, Path):  # a file we tried: shown whole, so the operator can find it
        return f"={str(value)!r}"
    if isinstance(value, bool | int | float) and len(text := repr(value)) <= _SHOWN_MAX:
        return f"={text}"
    return f" ({_kind(value)})"


def _show_path(path: Path) -> str:
    """A path as is, or quoted when it holds spaces or unprintable characters."""
    text = str(path)
    return text if text.isprintable() and " " not in text else repr(text)


def _clip(text: str) -> str:
    """text cut to _SHOWN_MAX characters."""
    return text if len(text) <= _SHOWN_MAX else text[: _SHOWN_MAX - 3] + "..."


def _reason(exc: Exception) -> str:
    """The OS's words for a failed read, lower-cased to sit mid-sentence, with a hint."""
    if isinstance(exc, PermissionError):
        return "permission denied; make it readable by the agent's user (root)"
    if isinstance(exc, IsADirectoryError):
        return "it is a directory; name the file in it"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[0].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


def _one_line(message: str) -> str:
    """message with every unprintable character (line breaks included) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)


def _utf8(text: str) -> bytes:
    """text's bytes, lone surrogates included (from undecodable environment bytes)."""
    return text.encode("utf-8", "surrogatepass")
