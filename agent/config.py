"""Settings from /etc/sugarkube/agent.yaml overridden by the environment (DESIGN.md §A).

Every problem becomes one ConfigError line that names the key, the value and the file (or the
environment variable); the join token never appears in one.
"""

import difflib
import hmac
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from agent import const, tokens

WireProof = Literal["auto", "on", "off"]

ENVIRONMENTS = ("dev", "staging", "prod")
DEFAULT_CLUSTER = "sugar"
DEFAULT_ENV = "dev"
DEFAULT_SERVERS = 3
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
_TOKEN_LINE = re.compile(r"\s*['\"]?token['\"]?\s*:")
_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

_SECTIONS: dict[str, tuple[str, ...]] = {
    "mdns": ("interface", "dbus", "wire_proof", "debug"),
    "metrics": ("listen",),
    "report": ("path",),
    "log": ("redact_addresses",),
}
_TOP_KEYS = ("cluster", "env", "servers", "token", "token_file", *_SECTIONS)
_LEAF_KEYS = (
    *(key for key in _TOP_KEYS if key not in _SECTIONS),
    *(f"{section}.{key}" for section, keys in _SECTIONS.items() for key in keys),
)

T = TypeVar("T")


class ConfigError(Exception):
    """One operator-facing line naming the key, the value and the file (or the env variable)."""

    exit_code: int = const.EXIT_CONFIG

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


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


@dataclass(frozen=True)
class MdnsSettings:
    """Where and how the agent publishes and browses."""

    interface: str | None  # None: the default-route interface
    dbus: bool
    wire_proof: WireProof
    debug: bool


@dataclass(frozen=True)
class MetricsSettings:
    """The Prometheus endpoint's bind address (host without brackets)."""

    host: str
    port: int


@dataclass(frozen=True)
class Settings:
    """The agent's configuration, validated."""

    cluster: str
    env: str
    servers: int
    token: Secret | None
    mdns: MdnsSettings
    metrics: MetricsSettings
    report_path: Path
    redact_addresses: bool
    source: Path | None  # the YAML file read, None when the default path did not exist


def load_settings(
    path: Path | None = None, environ: Mapping[str, str] | None = None, *, root: Path = Path("/")
) -> Settings:
    """Settings from the YAML file and the environment; raises ConfigError.

    path None = the default path, which may be absent; an explicitly given path that does not exist
    is an error. root is the directory the default paths are taken under (tests give a tmp dir).
    """
    source, doc = _read_yaml(path, root)
    yaml_values = _flatten(doc, source) if source is not None else {}
    layer = _Layer(yaml_values, source, os.environ if environ is None else environ)
    env = layer.value("env", "SUGARKUBE_ENV", _environment, DEFAULT_ENV)
    listen_default = (DEFAULT_METRICS_HOST, const.METRICS_PORT)
    host, port = layer.value("metrics.listen", "SUGARKUBE_METRICS_ADDR", _listen, listen_default)
    report = layer.value("report.path", "SUGARKUBE_REPORT_PATH", _file_path, None)
    return Settings(
        cluster=layer.value("cluster", "SUGARKUBE_CLUSTER", _cluster, DEFAULT_CLUSTER),
        env=env,
        servers=layer.value("servers", "SUGARKUBE_SERVERS", _servers, DEFAULT_SERVERS),
        token=layer.token(env),
        mdns=MdnsSettings(
            interface=layer.value("mdns.interface", "SUGARKUBE_MDNS_INTERFACE", _interface, None),
            dbus=layer.value("mdns.dbus", "SUGARKUBE_MDNS_DBUS", _flag, True),
            wire_proof=layer.value(
                "mdns.wire_proof", "SUGARKUBE_MDNS_WIRE_PROOF", _wire_proof, "auto"
            ),
            debug=layer.value("mdns.debug", "SUGARKUBE_DEBUG_MDNS", _flag, False),
        ),
        metrics=MetricsSettings(host=host, port=port),
        report_path=report if report is not None else _default_report_path(root),
        redact_addresses=layer.value(
            "log.redact_addresses", "SUGARKUBE_LOG_REDACT_ADDRESSES", _flag, True
        ),
        source=source,
    )


class _Invalid(Exception):
    """A value parser's complaint: what is wrong and what to do, without the value."""


@dataclass(frozen=True)
class _Origin:
    """Where a value came from: a dotted YAML key in a file, or an environment variable."""

    name: str
    file: Path | None  # None: the environment

    def describe(self, value: object, *, secret: bool = False) -> str:
        """'key=<value> in <file>' with the value hidden when secret."""
        place = f"in {_show_path(self.file)}" if self.file else "in the environment"
        return f"{self.name}{'' if secret else _show(value)} {place}"

    def parse(self, value: object, parse: Callable[[object], T], *, secret: bool = False) -> T:
        """parse(value), or a ConfigError naming this origin."""
        try:
            return parse(value)
        except _Invalid as exc:
            raise ConfigError(f"{self.describe(value, secret=secret)}: {exc}") from exc


class _Layer:
    """The flattened YAML values under the environment; env beats yaml, empty env means unset."""

    def __init__(
        self, yaml_values: dict[str, object], file: Path | None, environ: Mapping[str, str]
    ) -> None:
        self.yaml = yaml_values
        self.file = file
        self.environ = environ

    def env(self, name: str) -> str | None:
        """The variable's value, None when unset or blank (an EnvironmentFile template line)."""
        raw = self.environ.get(name)
        return raw if raw is not None and raw.strip() else None

    def value(self, key: str, var: str, parse: Callable[[object], T], default: T) -> T:
        """The env value if set, else the YAML value, else default."""
        # A bad YAML value fails even when the environment overrides it: the file must stand alone.
        result = default
        if key in self.yaml:
            result = _Origin(key, self.file).parse(self.yaml[key], parse)
        raw = self.env(var)
        if raw is not None:
            result = _Origin(var, None).parse(raw, parse)
        return result

    def token(self, env: str) -> Secret | None:
        """SUGARKUBE_TOKEN_<ENV>, then SUGARKUBE_TOKEN, then yaml token, then yaml token_file."""
        from_yaml = None
        if "token" in self.yaml:
            from_yaml = _Origin("token", self.file).parse(self.yaml["token"], _token, secret=True)
        token_file = None
        if "token_file" in self.yaml:
            token_file = _Origin("token_file", self.file).parse(self.yaml["token_file"], _file_path)
        for var in (f"SUGARKUBE_TOKEN_{env.upper()}", "SUGARKUBE_TOKEN"):
            raw = self.env(var)
            if raw is not None:
                return _Origin(var, None).parse(raw, _token, secret=True)
        if from_yaml is not None or token_file is None:
            return from_yaml
        # Read only when it is the token in use: an env token may stand in for an unreadable file.
        return _read_token_file(token_file, _Origin("token_file", self.file))


def _read_yaml(path: Path | None, root: Path) -> tuple[Path | None, object]:
    """(the file read or None, its YAML document); a missing default file is (None, None)."""
    file = path if path is not None else root / const.DEFAULT_CONFIG_PATH.relative_to("/")
    shown = _show_path(file)
    try:
        data = _read_bounded(file, const.CONFIG_MAX_BYTES)
    except FileNotFoundError as exc:
        if path is None:
            return None, None
        raise ConfigError(
            f"config file {shown} does not exist; create it or name an existing file"
        ) from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read config file {shown}: {_reason(exc)}") from exc
    if len(data) > const.CONFIG_MAX_BYTES:
        raise ConfigError(
            f"config file {shown} is larger than {const.CONFIG_MAX_BYTES} bytes; "
            "name the agent's YAML file"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {shown} is not UTF-8 text (bad byte at offset {exc.start}); "
            "save it as UTF-8"
        ) from exc
    return file, _parse_yaml(text, shown)


def _parse_yaml(text: str, shown: str) -> object:
    """The YAML document in text, or a ConfigError with the line and column of the problem."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or "invalid YAML"
        if exc.context and exc.problem:
            problem = f"{exc.context}, {problem}"
        problem = problem if len(problem) <= 2 * _SHOWN_MAX else problem[: 2 * _SHOWN_MAX] + "..."
        problem += "; fix the file"
        # PyYAML quotes the text at fault ('found undefined alias', a '!tag'): on the token's
        # line that text is the token, so only the place is given.
        lines = text.splitlines()
        if mark and mark.line < len(lines) and _TOKEN_LINE.match(lines[mark.line]):
            problem = "the token is not valid YAML as written; put it in single quotes"
        raise ConfigError(f"YAML error in {shown}{where}: {problem}") from exc
    except yaml.reader.ReaderError as exc:
        raise ConfigError(
            f"YAML error in {shown}: control character #x{exc.character:04x} at character "
            f"{exc.position}; remove it"
        ) from exc
    except yaml.YAMLError as exc:  # no mark: not one raised while loading, kept as a backstop
        raise ConfigError(f"YAML error in {shown}: {type(exc).__name__}") from exc
    except RecursionError as exc:
        raise ConfigError(f"YAML error in {shown}: nested too deeply") from exc
    except Exception as exc:
        # PyYAML's constructors fail on explicitly tagged nonsense with plain exceptions:
        # `!!int ""` IndexError, `!!bool x` KeyError, `!!timestamp x` AttributeError, and
        # ValueError for a 5000-digit number or 2001-02-30.
        raise ConfigError(
            f"YAML error in {shown}: a value cannot be converted ({type(exc).__name__}); "
            "check numbers, dates and !! tags"
        ) from exc


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which PyYAML would silently resolve to the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                ident = (key_node.tag, key_node.value)
                if ident in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                    )
                seen.add(ident)
        return super().construct_mapping(node, deep=deep)


def _flatten(doc: object, file: Path) -> dict[str, object]:
    """{dotted key: value} of the document's settings; null values count as absent."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(
            f"config file {_show_path(file)} holds {_kind(doc)}, not a mapping of settings; "
            "write one 'key: value' per line"
        )
    flat: dict[str, object] = {}
    for key, value in doc.items():
        name = str(key)
        if name not in _TOP_KEYS:
            raise _unknown(name, file, _TOP_KEYS)
        if value is None:
            continue
        if name not in _SECTIONS:
            flat[name] = value
            continue
        if not isinstance(value, dict):
            raise ConfigError(
                f"{name}{_show(value)} in {_show_path(file)}: must be a mapping of "
                f"{', '.join(_SECTIONS[name])}"
            )
        for sub, sub_value in value.items():
            dotted = f"{name}.{sub}"
            if str(sub) not in _SECTIONS[name]:
                raise _unknown(dotted, file, _SECTIONS[name], prefix=f"{name}.")
            if sub_value is not None:
                flat[dotted] = sub_value
    return flat


def _unknown(key: str, file: Path, known: tuple[str, ...], prefix: str = "") -> ConfigError:
    """The error for a key the schema lacks, with the closest known key when one is near."""
    close = difflib.get_close_matches(key, _LEAF_KEYS, n=1, cutoff=0.75)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {prefix}{', '.join(known)}"
    return ConfigError(f"unknown key {_clip(key)!r} in {_show_path(file)}; {hint}")


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


def _read_token_file(path: Path, origin: _Origin) -> Secret:
    """The token held in path, stripped; a ConfigError naming token_file when it is unusable."""
    try:
        data = _read_bounded(path, const.TOKEN_FILE_MAX_BYTES)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{origin.describe(path)}: cannot read it: {_reason(exc)}") from exc
    try:
        return _token(_token_text(data))
    except _Invalid as exc:
        raise ConfigError(f"{origin.describe(path)}: the file {exc}") from exc


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


def _read_bounded(path: Path, limit: int) -> bytes:
    """Up to limit + 1 bytes of path; refuses directories, FIFOs and sockets (reading them blocks
    or fails), allows character devices such as /dev/null."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(21, "Is a directory")
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            raise OSError("not a regular file")
        return file.read(limit + 1)


def _default_report_path(root: Path) -> Path:
    """The firmware partition where bookworm mounts it, else /boot as on older images."""
    firmware = root / const.BOOT_FIRMWARE_DIR.relative_to("/")
    base = firmware if firmware.is_dir() else root / const.BOOT_DIR.relative_to("/")
    return base / const.REPORT_FILENAME


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
