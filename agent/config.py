"""Settings from /etc/sugarkube/agent.yaml overridden by the environment (DESIGN.md §A).

Every problem becomes one ConfigError line that names the key, the value and the file (or the
environment variable); the join token never appears in one.

This module is the public face and the layering (env over YAML, token sources in order); the file
is read in configfile.py and each value parsed in configvalues.py, which holds ConfigError and
Secret so that both can raise and return them.
"""

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from agent import const
from agent.configfile import _flatten, _read_yaml
from agent.configvalues import (
    DEFAULT_METRICS_HOST,
    ENVIRONMENTS,
    REDACTED,
    ConfigError,
    Secret,
    WireProof,
    _cluster,
    _environment,
    _file_path,
    _flag,
    _interface,
    _Invalid,
    _listen,
    _private,
    _read_bounded,
    _reason,
    _servers,
    _show,
    _show_path,
    _token,
    _token_text,
    _wire_proof,
)
from agent.mdns.auth import AdvertKey
from agent.tokens import parse_token

__all__ = [
    "DEFAULT_CLUSTER",
    "DEFAULT_ENV",
    "DEFAULT_METRICS_HOST",
    "DEFAULT_SERVERS",
    "ENVIRONMENTS",
    "REDACTED",
    "ConfigError",
    "MdnsSettings",
    "MetricsSettings",
    "Secret",
    "Settings",
    "WireProof",
    "load_settings",
]

DEFAULT_CLUSTER = "sugar"
DEFAULT_ENV = "dev"
DEFAULT_SERVERS = 3

T = TypeVar("T")


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

    def advert_key(self) -> AdvertKey | None:
        """The key adverts are signed and checked with; None without a token (nothing to derive
        it from: such a node signs nothing and can tell no forged advert from a real one)."""
        if self.token is None:
            return None
        return AdvertKey.derive(parse_token(self.token.reveal()).password, self.cluster, self.env)


def load_settings(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    root: Path = Path("/"),
    owner: int = 0,
) -> Settings:
    """Settings from the YAML file and the environment; raises ConfigError.

    path None = the default path, which may be absent; an explicitly given path that does not exist
    is an error. root is the directory the default paths are taken under (tests give a tmp dir).
    A file holding a token (agent.yaml with `token:`, the token_file) must be owned by `owner`
    (root) and readable by neither its group nor others.
    """
    source, doc = _read_yaml(path, root, owner)
    yaml_values = _flatten(doc, source) if source is not None else {}
    layer = _Layer(yaml_values, source, os.environ if environ is None else environ, owner)
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
        self,
        yaml_values: dict[str, object],
        file: Path | None,
        environ: Mapping[str, str],
        owner: int,
    ) -> None:
        self.yaml = yaml_values
        self.file = file
        self.environ = environ
        self.owner = owner

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
        return _read_token_file(token_file, _Origin("token_file", self.file), self.owner)


def _read_token_file(path: Path, origin: _Origin, owner: int) -> Secret:
    """The token held in path, stripped; a ConfigError naming token_file when it is unusable."""
    try:
        data, info = _read_bounded(path, const.TOKEN_FILE_MAX_BYTES)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{origin.describe(path)}: cannot read it: {_reason(exc)}") from exc
    _private(path, info, owner)
    try:
        return _token(_token_text(data))
    except _Invalid as exc:
        raise ConfigError(f"{origin.describe(path)}: the file {exc}") from exc


def _default_report_path(root: Path) -> Path:
    """The firmware partition where bookworm mounts it, else /boot as on older images."""
    firmware = root / const.BOOT_FIRMWARE_DIR.relative_to("/")
    base = firmware if firmware.is_dir() else root / const.BOOT_DIR.relative_to("/")
    return base / const.REPORT_FILENAME
