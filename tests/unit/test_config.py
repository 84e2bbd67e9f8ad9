"""agent.config: the YAML file, the environment over it, and one-line errors that hide the token."""

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent import const
from agent.config import (
    ConfigError,
    MdnsSettings,
    MetricsSettings,
    Secret,
    Settings,
    load_settings,
)

REPO = Path(__file__).resolve().parents[2]
TOKEN = "K10" + "ab" * 32 + "::server:" + "f00d" * 8

# DESIGN.md §A "Configuration": env variable, yaml key, one valid non-default value for each.
ENV_VARS = (
    "SUGARKUBE_CLUSTER",
    "SUGARKUBE_ENV",
    "SUGARKUBE_SERVERS",
    "SUGARKUBE_TOKEN",
    "SUGARKUBE_TOKEN_DEV",
    "SUGARKUBE_TOKEN_STAGING",
    "SUGARKUBE_TOKEN_PROD",
    "SUGARKUBE_MDNS_INTERFACE",
    "SUGARKUBE_MDNS_DBUS",
    "SUGARKUBE_MDNS_WIRE_PROOF",
    "SUGARKUBE_DEBUG_MDNS",
    "SUGARKUBE_METRICS_ADDR",
    "SUGARKUBE_REPORT_PATH",
    "SUGARKUBE_LOG_REDACT_ADDRESSES",
)
YAML_KEYS = (
    "cluster",
    "env",
    "servers",
    "token",
    "token_file",
    "mdns.interface",
    "mdns.dbus",
    "mdns.wire_proof",
    "mdns.debug",
    "metrics.listen",
    "report.path",
    "log.redact_addresses",
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty filesystem root: no /etc/sugarkube/agent.yaml, no /boot/firmware."""
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


@pytest.fixture
def write(tmp_path: Path):
    """Writes text to a YAML file, root only (it may hold the token), and returns its path."""

    def _write(text: str | bytes, name: str = "agent.yaml") -> Path:
        path = tmp_path / name
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text, encoding="utf-8")
        path.chmod(0o600)
        return path

    return _write


def defaults(root: Path, source: Path | None = None) -> Settings:
    return Settings(
        cluster="sugar",
        env="dev",
        servers=3,
        token=None,
        mdns=MdnsSettings(interface=None, dbus=True, wire_proof="auto", debug=False),
        metrics=MetricsSettings(host="0.0.0.0", port=9469),
        report_path=root / "boot" / "first-boot-report.txt",
        redact_addresses=True,
        source=source,
    )


def error(path: Path | None, environ: dict[str, str], root: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_settings(path, environ, root=root)
    message = str(caught.value)
    assert caught.value.exit_code == const.EXIT_CONFIG == 78
    assert len(message.splitlines()) == 1
    assert TOKEN not in message
    return message


# Defaults and sources


def test_no_file_at_the_default_path_gives_every_default(root: Path) -> None:
    assert load_settings(environ={}, root=root) == defaults(root)


def test_the_default_path_is_read_under_root(root: Path) -> None:
    config = root / "etc" / "sugarkube" / "agent.yaml"
    config.parent.mkdir(parents=True)
    config.write_text("servers: 1\n")
    settings = load_settings(environ={}, root=root)
    assert settings.servers == 1
    assert settings.source == config


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n", "---\n", "~\n"])
def test_an_empty_file_gives_every_default(write, root: Path, text: str) -> None:
    path = write(text)
    assert load_settings(path, {}, root=root) == defaults(root, source=path)


def test_the_report_goes_to_the_firmware_partition_when_it_is_mounted(root: Path) -> None:
    (root / "boot" / "firmware").mkdir(parents=True)
    settings = load_settings(environ={}, root=root)
    assert settings.report_path == root / "boot" / "firmware" / "first-boot-report.txt"


def test_os_environ_is_read_when_no_mapping_is_given(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SUGARKUBE_SERVERS", "5")
    assert load_settings(root=root).servers == 5


def test_a_full_file_sets_every_key(write, root: Path, tmp_path: Path) -> None:
    path = write(
        """
cluster: Garage
env: staging
servers: 1
token: "{token}"
mdns:
  interface: eth0
  dbus: no
  wire_proof: on
  debug: yes
metrics:
  listen: "[::]:9100"
report:
  path: /var/log/report.txt
log:
  redact_addresses: false
""".replace("{token}", TOKEN)
    )
    assert load_settings(path, {}, root=root) == Settings(
        cluster="garage",
        env="staging",
        servers=1,
        token=Secret(TOKEN),
        mdns=MdnsSettings(interface="eth0", dbus=False, wire_proof="on", debug=True),
        metrics=MetricsSettings(host="::", port=9100),
        report_path=Path("/var/log/report.txt"),
        redact_addresses=False,
        source=path,
    )


# Precedence: the environment beats the file


@pytest.mark.parametrize(
    ("yaml_text", "environ", "outcome"),
    [
        ("cluster: sugar", {"SUGARKUBE_CLUSTER": "pie"}, (lambda s: s.cluster, "pie")),
        ("env: staging", {"SUGARKUBE_ENV": "prod"}, (lambda s: s.env, "prod")),
        ("servers: 3", {"SUGARKUBE_SERVERS": "5"}, (lambda s: s.servers, 5)),
        ("mdns: {interface: eth0}", {"SUGARKUBE_MDNS_INTERFACE": "wlan0"},
         (lambda s: s.mdns.interface, "wlan0")),
        ("mdns: {dbus: true}", {"SUGARKUBE_MDNS_DBUS": "0"}, (lambda s: s.mdns.dbus, False)),
        ("mdns: {wire_proof: on}", {"SUGARKUBE_MDNS_WIRE_PROOF": "auto"},
         (lambda s: s.mdns.wire_proof, "auto")),
        ("mdns: {debug: false}", {"SUGARKUBE_DEBUG_MDNS": "1"}, (lambda s: s.mdns.debug, True)),
        ("metrics: {listen: '127.0.0.1:1'}", {"SUGARKUBE_METRICS_ADDR": "[::1]:9469"},
         (lambda s: (s.metrics.host, s.metrics.port), ("::1", 9469))),
        ("report: {path: /a.txt}", {"SUGARKUBE_REPORT_PATH": "/b.txt"},
         (lambda s: s.report_path, Path("/b.txt"))),
        ("log: {redact_addresses: true}", {"SUGARKUBE_LOG_REDACT_ADDRESSES": "off"},
         (lambda s: s.redact_addresses, False)),
    ],
)  # fmt: skip
def test_an_env_variable_beats_its_yaml_key(
    write, root: Path, yaml_text: str, environ: dict[str, str], outcome
) -> None:
    read, want = outcome
    path = write(yaml_text)
    assert read(load_settings(path, {}, root=root)) != want
    assert read(load_settings(path, environ, root=root)) == want


@pytest.mark.parametrize("blank", ["", "  ", "\t"])
def test_a_blank_env_variable_counts_as_unset(write, root: Path, blank: str) -> None:
    path = write("servers: 5\nmdns: {interface: eth1}\n")
    settings = load_settings(
        path, {"SUGARKUBE_SERVERS": blank, "SUGARKUBE_MDNS_INTERFACE": blank}, root=root
    )
    assert (settings.servers, settings.mdns.interface) == (5, "eth1")


def test_env_values_are_trimmed_and_names_lowercased(root: Path) -> None:
    settings = load_settings(
        environ={
            "SUGARKUBE_CLUSTER": " Pie-2 ",
            "SUGARKUBE_ENV": "PROD\n",
            "SUGARKUBE_SERVERS": " 7",
        },
        root=root,
    )
    assert (settings.cluster, settings.env, settings.servers) == ("pie-2", "prod", 7)


def test_a_bad_yaml_value_fails_even_when_the_env_overrides_it(write, root: Path) -> None:
    message = error(write("servers: three\n"), {"SUGARKUBE_SERVERS": "3"}, root)
    assert "servers='three'" in message


# The token


def test_token_precedence(write, root: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file-token\n")
    token_file.chmod(0o600)
    path = write(f"env: prod\ntoken: from-yaml-token\ntoken_file: {token_file}\n")
    env = {"SUGARKUBE_TOKEN_PROD": "env-prod-token", "SUGARKUBE_TOKEN": "env-any-token"}

    def token(environ: dict[str, str], config: Path = path) -> str | None:
        secret = load_settings(config, environ, root=root).token
        return None if secret is None else secret.reveal()

    assert token(env) == "env-prod-token"
    assert token({**env, "SUGARKUBE_ENV": "dev"}) == "env-any-token"
    other_env = {"SUGARKUBE_TOKEN_DEV": "env-dev-token", "SUGARKUBE_TOKEN": "env-any"}
    assert token(other_env) == "env-any"  # the file says env: prod, so _DEV does not count
    assert token({}) == "from-yaml-token"
    assert token({}, write(f"token_file: {token_file}\n", "file-only.yaml")) == "from-file-token"
    assert token({}, write("env: dev\n", "none.yaml")) is None


def test_the_token_file_is_read_only_when_its_token_is_used(write, root: Path) -> None:
    path = write("token_file: /nonexistent/token\n")
    settings = load_settings(path, {"SUGARKUBE_TOKEN": "env-token"}, root=root)
    assert settings.token == Secret("env-token")
    assert "token_file='/nonexistent/token'" in error(path, {}, root)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "empty"),
        (b" \n\n", "empty"),
        (b"first\nsecond\n", "line breaks"),
        (b"\xff\xfe", "UTF-8"),
        (b"x" * (const.TOKEN_FILE_MAX_BYTES + 1), "larger than"),
    ],
)
def test_an_unusable_token_file_names_token_file(
    write, root: Path, tmp_path: Path, content: bytes, problem: str
) -> None:
    token_file = tmp_path / "token"
    token_file.write_bytes(content)
    token_file.chmod(0o600)
    message = error(write(f"token_file: {token_file}\n"), {}, root)
    assert message.startswith(f"token_file='{token_file}' in ")
    assert problem in message


def test_an_unreadable_token_file_names_token_file(
    write, root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    deny(monkeypatch, token_file)
    message = error(write(f"token_file: {token_file}\n"), {}, root)
    assert f"token_file='{token_file}'" in message
    assert "permission denied" in message


def refused(path: Path, problem: str) -> str:
    return f"{path} holds a token but {problem} (root-owned, not readable by others)"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o444], ids=oct)
def test_a_yaml_token_others_can_read_is_refused_even_when_the_env_wins(
    write, root: Path, mode: int
) -> None:
    path = write(f"token: {TOKEN}\n")
    path.chmod(mode)
    expected = refused(path, f"is mode {mode:04o}: chmod 600 it")
    assert error(path, {}, root) == expected
    assert error(path, {"SUGARKUBE_TOKEN": "env-token"}, root) == expected  # it is on disk


def test_a_yaml_token_root_does_not_own_is_refused(write, root: Path) -> None:
    path = write(f"token: {TOKEN}\n")
    os.chown(path, 1000, 0)
    assert error(path, {}, root) == refused(
        path, "is owned by uid 1000: chown root and chmod 600 it"
    )
    assert load_settings(path, {}, root=root, owner=1000).token == Secret(TOKEN)


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700, 0o620], ids=oct)
def test_a_yaml_token_only_root_can_read_loads(write, root: Path, mode: int) -> None:
    path = write(f"token: {TOKEN}\n")
    path.chmod(mode)
    assert load_settings(path, {}, root=root).token == Secret(TOKEN)


def test_a_file_without_a_token_may_be_read_by_anyone(write, root: Path) -> None:
    path = write("servers: 2\n#token: commented out\ntoken:\n")
    path.chmod(0o644)
    os.chown(path, 1000, 1000)
    assert load_settings(path, {}, root=root).servers == 2


def test_a_token_file_others_can_read_or_root_does_not_own_is_refused(
    write, root: Path, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    path = write(f"token_file: {token_file}\n")
    token_file.chmod(0o640)
    assert error(path, {}, root) == refused(token_file, "is mode 0640: chmod 600 it")
    token_file.chmod(0o600)
    os.chown(token_file, 1000, 1000)
    assert error(path, {}, root) == refused(
        token_file, "is owned by uid 1000: chown root and chmod 600 it"
    )
    os.chown(token_file, 0, 0)
    assert load_settings(path, {}, root=root).token == Secret(TOKEN)


@pytest.mark.parametrize(
    ("environ", "yaml_text", "named"),
    [
        ({"SUGARKUBE_TOKEN": f"{TOKEN} {TOKEN}"}, "", "SUGARKUBE_TOKEN in the environment"),
        ({"SUGARKUBE_TOKEN_DEV": f"{TOKEN}\x00"}, "", "SUGARKUBE_TOKEN_DEV in the environment"),
        ({}, f'token: "{TOKEN}\\n{TOKEN}"', "token in "),
        ({}, "token: ''", "token in "),
        ({}, "token: 12345678", "token in "),
        ({}, f"token: [{TOKEN}]", "token in "),
    ],
)
def test_a_bad_token_is_named_but_never_shown(
    write, root: Path, environ: dict[str, str], yaml_text: str, named: str
) -> None:
    message = error(write(yaml_text), environ, root)
    assert message.startswith(named)
    assert "12345678" not in message


def test_token_file_must_be_absolute(write, root: Path) -> None:
    assert "absolute" in error(write("token_file: token.txt\n"), {}, root)


def test_settings_repr_and_str_hide_the_token(root: Path) -> None:
    settings = load_settings(environ={"SUGARKUBE_TOKEN": TOKEN}, root=root)
    assert settings.token is not None
    assert settings.token.reveal() == TOKEN
    for text in (repr(settings), str(settings), f"{settings}", f"{settings.token:>40}"):
        assert TOKEN not in text
        assert "<redacted>" in text


def test_secret_prints_redacted_and_compares_by_value() -> None:
    secret = Secret(TOKEN)
    assert str(secret) == repr(secret) == format(secret, "") == f"{secret}" == "<redacted>"
    assert secret == Secret(TOKEN)
    assert secret != Secret(TOKEN + "x")
    assert secret != TOKEN
    assert hash(secret) == hash(Secret(TOKEN))
    assert len({secret, Secret(TOKEN), Secret("other-token")}) == 2


# Values


@pytest.mark.parametrize(
    ("word", "want"),
    [(w, True) for w in ("1", "true", "TRUE", "yes", "Yes", "on", "ON")]
    + [(w, False) for w in ("0", "false", "False", "no", "NO", "off", "Off")],
)
def test_env_booleans(root: Path, word: str, want: bool) -> None:
    environ = {
        "SUGARKUBE_MDNS_WIRE_PROOF": word,
        "SUGARKUBE_MDNS_DBUS": word,
        "SUGARKUBE_DEBUG_MDNS": word,
        "SUGARKUBE_LOG_REDACT_ADDRESSES": word,
    }
    settings = load_settings(environ=environ, root=root)
    assert (settings.mdns.dbus, settings.mdns.debug, settings.redact_addresses) == (want,) * 3
    assert settings.mdns.wire_proof == ("on" if want else "off")


@pytest.mark.parametrize(
    ("value", "want"),
    [("true", True), ("off", False), ("1", True), ("0", False), ("'no'", False), ("'TRUE'", True)],
)
def test_yaml_booleans(write, root: Path, value: str, want: bool) -> None:
    settings = load_settings(write(f"mdns: {{dbus: {value}, debug: {value}}}\n"), {}, root=root)
    assert (settings.mdns.dbus, settings.mdns.debug) == (want, want)


@pytest.mark.parametrize(
    ("listen", "host", "port"),
    [
        ("0.0.0.0:9469", "0.0.0.0", 9469),
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("[::]:9469", "::", 9469),
        ("[fe80::1%eth0]:65535", "fe80::1%eth0", 65535),
        (":9100", "0.0.0.0", 9100),
        ("localhost:9469", "localhost", 9469),
        ("node1.local:9469", "node1.local", 9469),
    ],
)
def test_metrics_listen(root: Path, listen: str, host: str, port: int) -> None:
    settings = load_settings(environ={"SUGARKUBE_METRICS_ADDR": listen}, root=root)
    assert settings.metrics == MetricsSettings(host=host, port=port)


@pytest.mark.parametrize("name", ["a", "sugar", "k8s-lab-2", "0", "a" * const.CLUSTER_NAME_MAX])
def test_valid_cluster_names(root: Path, name: str) -> None:
    assert load_settings(environ={"SUGARKUBE_CLUSTER": name}, root=root).cluster == name


def test_the_longest_cluster_name_fits_a_dns_label_in_every_env() -> None:
    # _k3s-<cluster>-<env> is one DNS label (RFC 1035 §2.3.4: at most 63 bytes).
    longest = "_k3s-" + "a" * const.CLUSTER_NAME_MAX + "-staging"
    assert len(longest) <= 63


def test_the_default_cluster_in_staging_is_accepted(root: Path) -> None:
    # 17 characters, past RFC 6335's 15, but what the existing scripts advertise.
    settings = load_settings(environ={"SUGARKUBE_ENV": "staging"}, root=root)
    assert f"k3s-{settings.cluster}-{settings.env}" == "k3s-sugar-staging"


@pytest.mark.parametrize("name", ["eth0", "wlan0", "enp1s0", "br-lab", "veth.100", "x" * 15])
def test_valid_interfaces(root: Path, name: str) -> None:
    settings = load_settings(environ={"SUGARKUBE_MDNS_INTERFACE": name}, root=root)
    assert settings.mdns.interface == name


# Bad values, one line each, naming the setting and the value


@pytest.mark.parametrize(
    ("var", "value", "hint"),
    [
        ("SUGARKUBE_SERVERS", "three", "whole number"),
        ("SUGARKUBE_SERVERS", "0", "at least 1"),
        ("SUGARKUBE_SERVERS", "-1", "at least 1"),
        ("SUGARKUBE_SERVERS", "2.5", "whole number"),
        ("SUGARKUBE_SERVERS", "9" * 5000, "whole number"),
        ("SUGARKUBE_ENV", "production", "dev, staging, prod"),
        ("SUGARKUBE_CLUSTER", "sugar_kube", "hyphens"),
        ("SUGARKUBE_CLUSTER", "-sugar", "hyphens"),
        ("SUGARKUBE_CLUSTER", "sugar-", "hyphens"),
        ("SUGARKUBE_CLUSTER", "su--gar", "hyphens"),
        ("SUGARKUBE_CLUSTER", "a" * (const.CLUSTER_NAME_MAX + 1), "1 to 16"),
        ("SUGARKUBE_CLUSTER", "café", "letters"),
        ("SUGARKUBE_MDNS_INTERFACE", "eth 0", "interface name"),
        ("SUGARKUBE_MDNS_INTERFACE", "eth0:1", "interface name"),
        ("SUGARKUBE_MDNS_INTERFACE", "x" * 16, "interface name"),
        ("SUGARKUBE_MDNS_INTERFACE", "..", "interface name"),
        ("SUGARKUBE_MDNS_DBUS", "maybe", "true, false"),
        ("SUGARKUBE_DEBUG_MDNS", "2", "true, false"),
        ("SUGARKUBE_LOG_REDACT_ADDRESSES", "nope", "true, false"),
        ("SUGARKUBE_MDNS_WIRE_PROOF", "sometimes", "auto, on or off"),
        ("SUGARKUBE_METRICS_ADDR", "9469", "HOST:PORT"),
        ("SUGARKUBE_METRICS_ADDR", "0.0.0.0", "HOST:PORT"),
        ("SUGARKUBE_METRICS_ADDR", "0.0.0.0:0", "1 to 65535"),
        ("SUGARKUBE_METRICS_ADDR", "0.0.0.0:65536", "1 to 65535"),
        ("SUGARKUBE_METRICS_ADDR", "0.0.0.0:http", "1 to 65535"),
        ("SUGARKUBE_METRICS_ADDR", "::1:9469", "brackets"),
        ("SUGARKUBE_METRICS_ADDR", "[1.2.3.4]:9469", "IPv6"),
        ("SUGARKUBE_METRICS_ADDR", "300.1.1.1:9469", "host"),
        ("SUGARKUBE_METRICS_ADDR", "1.2.3:9469", "host"),
        ("SUGARKUBE_METRICS_ADDR", "bad_host:9469", "host"),
        ("SUGARKUBE_REPORT_PATH", "report.txt", "absolute"),
        ("SUGARKUBE_REPORT_PATH", "/boot/", "absolute path to a file"),
    ],
)
def test_a_bad_env_value_names_the_variable_and_the_value(
    root: Path, var: str, value: str, hint: str
) -> None:
    message = error(None, {var: value}, root)
    shown = repr(value) if len(value) <= 60 else repr(value[:57] + "...")
    assert message.startswith(f"{var}={shown} in the environment: ")
    assert hint in message


@pytest.mark.parametrize(
    ("yaml_text", "start", "hint"),
    [
        ("servers: three", "servers='three' in ", "whole number"),
        ("servers: 0", "servers=0 in ", "at least 1"),
        ("servers: true", "servers=True in ", "whole number"),
        ("servers: [3]", "servers (a list) in ", "whole number"),
        ("cluster: 2024", "cluster=2024 in ", "put it in quotes"),
        ("cluster: {a: b}", "cluster (a mapping) in ", "must be text"),
        ("env: 2024-01-01", "env (a date) in ", "must be text"),
        ("env: prd", "env='prd' in ", "dev, staging, prod"),
        ("mdns: 3", "mdns=3 in ", "must be a mapping of interface, dbus"),
        ("mdns: [dbus]", "mdns (a list) in ", "must be a mapping"),
        ("mdns: {dbus: maybe}", "mdns.dbus='maybe' in ", "true, false"),
        ("mdns: {dbus: 2}", "mdns.dbus=2 in ", "true, false"),
        ("mdns: {interface: ''}", "mdns.interface='' in ", "interface name"),
        ("mdns: {wire_proof: always}", "mdns.wire_proof='always' in ", "auto, on or off"),
        ("metrics: {listen: 9469}", "metrics.listen=9469 in ", "put it in quotes"),
        ("metrics: {listen: 'localhost'}", "metrics.listen='localhost' in ", "HOST:PORT"),
        ("report: {path: relative.txt}", "report.path='relative.txt' in ", "absolute"),
        ("log: {redact_addresses: sometimes}", "log.redact_addresses='sometimes' in ", "off"),
    ],
)
def test_a_bad_yaml_value_names_the_key_the_value_and_the_file(
    write, root: Path, yaml_text: str, start: str, hint: str
) -> None:
    path = write(yaml_text + "\n")
    message = error(path, {}, root)
    assert message.startswith(start + f"{path}: ")
    assert hint in message


@pytest.mark.parametrize(
    ("yaml_text", "key", "hint"),
    [
        ("mdns:\n  interfce: eth0\n", "mdns.interfce", "did you mean 'mdns.interface'?"),
        ("sevrers: 3\n", "sevrers", "did you mean 'servers'?"),
        ("colour: blue\n", "colour", "known keys: cluster, env, servers"),
        ("metrics:\n  port: 9100\n", "metrics.port", "known keys: metrics.listen"),
        ("1: one\n", "1", "known keys"),
        ("yes: true\n", "True", "known keys"),
    ],
)
def test_an_unknown_key_is_named_with_the_file(
    write, root: Path, yaml_text: str, key: str, hint: str
) -> None:
    path = write(yaml_text)
    message = error(path, {}, root)
    assert message.startswith(f"unknown key {key!r} in {path}; ")
    assert hint in message


def test_unknown_key_message_matches_the_documented_shape(root: Path) -> None:
    etc = root / "etc" / "sugarkube"
    etc.mkdir(parents=True)
    (etc / "agent.yaml").write_text("mdns:\n  interfce: eth0\n")
    message = error(None, {}, root)
    assert message.startswith(f"unknown key 'mdns.interfce' in {etc / 'agent.yaml'}")


def test_null_values_and_sections_mean_the_default(write, root: Path) -> None:
    path = write("cluster:\nservers: ~\nmdns:\nmetrics:\n  listen:\nreport: {path: null}\n")
    assert load_settings(path, {}, root=root) == defaults(root, source=path)


# The file itself


@pytest.mark.parametrize(
    ("text", "where", "problem"),
    [
        ("servers: 3\nmdns:\n  dbus: [1\n", "line 4", "expected"),
        ("cluster: sugar\n  env: dev\n", "line 2, column 6", "mapping values are not allowed"),
        ("servers: 3\nservers: 1\n", "line 2, column 1", "duplicate key 'servers'"),
        ("mdns:\n  dbus: 1\n  dbus: 0\n", "line 3", "duplicate key 'dbus'"),
        ("a: 1\n---\nb: 2\n", "line 2", "single document"),
        ("cluster: !!python/name:os.system\n", "line 1", "constructor"),
        ("servers: \x07\n", "character 9", "control character #x0007"),
        ("servers: !!int ''\n", "", "cannot be converted (IndexError)"),
        ("servers: !!bool maybe\n", "", "cannot be converted (KeyError)"),
        ("env: !!timestamp soon\n", "", "cannot be converted (AttributeError)"),
        ("env: 2001-02-30\n", "", "cannot be converted (ValueError)"),
        ("servers: " + "9" * 5000 + "\n", "", "cannot be converted (ValueError)"),
        ("servers: " + "[" * 5000 + "\n", "", "nested too deeply"),
    ],
)
def test_a_yaml_error_names_the_file_and_line(
    write, root: Path, text: str, where: str, problem: str
) -> None:
    path = write(text)
    message = error(path, {}, root)
    assert message.startswith(f"YAML error in {path}")
    assert where in message
    assert problem in message


@pytest.mark.parametrize(
    ("text", "kind"),
    [("- cluster: sugar\n", "a list"), ("sugar\n", "text"), ("3\n", "a number")],
)
def test_a_document_that_is_not_a_mapping(write, root: Path, text: str, kind: str) -> None:
    path = write(text)
    assert error(path, {}, root) == (
        f"config file {path} holds {kind}, not a mapping of settings; "
        "write one 'key: value' per line"
    )


@pytest.mark.parametrize("written", ["*{t}", "!{t}", '"{t}\\q"', "'{t}", "{{{t}", "[{t}"])
def test_a_token_that_breaks_yaml_is_not_shown(write, root: Path, written: str) -> None:
    message = error(write("cluster: sugar\ntoken: " + written.format(t=TOKEN[3:]) + "\n"), {}, root)
    assert TOKEN[3:20] not in message


@pytest.mark.parametrize(
    ("written", "shown"),
    [
        ("token:\n  *{t}\n", "found undefined alias (not shown: the file holds a token)"),
        ("{{cluster: sugar, token: *{t}}}\n", "found undefined alias (not shown"),
        ("? token\n: *{t}\n", "found undefined alias (not shown"),
        ("- token: *{t}\n", "found undefined alias (not shown"),
        ("token:\n  !{t} x\n", "for the tag (not shown"),
        ("token:\n{t}: x\n", "unknown key in "),
    ],
)
def test_a_token_off_its_line_is_not_shown(write, root: Path, written: str, shown: str) -> None:
    password = "s3cret-" + "f00d" * 8
    message = error(write(written.format(t=password)), {}, root)
    assert password[:8] not in message
    assert shown in message


def test_without_a_token_the_text_at_fault_is_shown(write, root: Path) -> None:
    message = error(write("# token: comes later\nservers: *three\n"), {}, root)
    assert "found undefined alias 'three'" in message


def test_a_document_that_is_the_token_does_not_show_it(write, root: Path) -> None:
    error(write(f"token:{TOKEN}\n"), {}, root)  # no space after the colon: a plain scalar


def test_an_explicit_path_that_does_not_exist(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    assert error(path, {}, root) == (
        f"config file {path} does not exist; create it or name an existing file"
    )


def test_a_directory(root: Path, tmp_path: Path) -> None:
    message = error(tmp_path, {}, root)
    assert message.startswith(f"cannot read config file {tmp_path}: it is a directory")


def test_the_default_path_as_a_directory_is_an_error(root: Path) -> None:
    (root / "etc" / "sugarkube" / "agent.yaml").mkdir(parents=True)
    assert "is a directory" in error(None, {}, root)


def test_non_utf8_bytes(write, root: Path) -> None:
    path = write(b"cluster: caf\xe9\n")
    assert error(path, {}, root) == (
        f"config file {path} is not UTF-8 text (bad byte at offset 12); save it as UTF-8"
    )


def test_a_fifo_is_refused_without_blocking(root: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "agent.fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in error(fifo, {}, root)


def test_an_endless_file_is_refused() -> None:
    message = error(Path("/dev/zero"), {}, Path("/nonexistent"))
    assert f"larger than {const.CONFIG_MAX_BYTES} bytes" in message


def test_dev_null_is_an_empty_config() -> None:
    assert load_settings(Path("/dev/null"), {}).source == Path("/dev/null")


def deny(monkeypatch: pytest.MonkeyPatch, denied: Path) -> None:
    """Makes opening denied fail as for a non-root user (the tests may run as root)."""
    real_open = os.open

    def fake_open(path, flags, *args, **kwargs):
        if Path(path) == denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)


def test_an_unreadable_file(write, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write("servers: 3\n")
    deny(monkeypatch, path)
    assert error(path, {}, root) == (
        f"cannot read config file {path}: permission denied; "
        "make it readable by the agent's user (root)"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_for_real(write, root: Path) -> None:
    path = write("servers: 3\n")
    path.chmod(0)
    assert "permission denied" in error(path, {}, root)


def test_a_path_with_a_line_break_stays_on_one_line(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "odd\nname.yaml"
    path.write_text("servers: zero\n")
    message = error(path, {}, root)
    assert "'" + str(tmp_path) + "/odd\\nname.yaml'" in message


def test_long_values_are_clipped(root: Path) -> None:
    message = error(None, {"SUGARKUBE_CLUSTER": "x" * 500}, root)
    assert "x" * 57 + "..." in message
    assert "x" * 58 not in message


# The shipped files: etc/agent.yaml and etc/default/sugarkube-agent


def test_the_shipped_yaml_loads_as_the_defaults(root: Path) -> None:
    path = REPO / "etc" / "agent.yaml"
    assert load_settings(path, {}, root=root) == defaults(root, source=path)


def test_the_shipped_yaml_documents_every_key_with_its_default(root: Path, write) -> None:
    text = (REPO / "etc" / "agent.yaml").read_text()
    # "#key: value" and "#  key: value" lines are the settings; "# words" lines are prose.
    uncommented = re.sub(r"(?m)^#(?=(?:  )?[a-z_]+:(?: |$))", "", text)
    document = yaml.safe_load(uncommented)
    keys = [
        f"{key}.{sub}" if isinstance(value, dict) else key
        for key, value in document.items()
        for sub in (value if isinstance(value, dict) else [None])
    ]
    assert sorted(keys) == sorted(YAML_KEYS)
    for var in ENV_VARS:
        if not var.startswith("SUGARKUBE_TOKEN_"):
            assert var in text
    path = write(uncommented)
    assert load_settings(path, {}, root=root) == defaults(root, source=path)


def test_the_shipped_env_file_documents_every_variable_with_its_default(root: Path) -> None:
    text = (REPO / "etc" / "default" / "sugarkube-agent").read_text()
    assignments = dict(re.findall(r"(?m)^#(SUGARKUBE_[A-Z_]+)=(.*)$", text))
    assert sorted(assignments) == sorted(ENV_VARS)
    for line in text.splitlines():
        assert not line or line.startswith("#"), "every line is a comment"
    assert load_settings(environ=assignments, root=root) == defaults(root)


# Anything at all: a Settings or a ConfigError, never another exception, always one line


def assert_loads_or_one_line(path: Path | None, environ: dict[str, str], root: Path) -> None:
    try:
        settings = load_settings(path, environ, root=root)
    except ConfigError as exc:
        message = str(exc)
        assert len(message.splitlines()) == 1
        assert message.isprintable()
        for var, value in environ.items():
            token = value.strip()
            if var.startswith("SUGARKUBE_TOKEN") and len(token) >= 8:
                others = [v for k, v in environ.items() if k != var] + [str(path)]
                if not any(token in other for other in others):
                    assert token not in message
    else:
        assert TOKEN not in repr(settings)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
@example(text="mdns: {interface: [eth0]}\nservers: !!float nan\n")
@example(text="? [a]\n: b\n")
@example(text="a: &a [1, 2]\nb: *a\n")
@example(text="\ufeffservers: 2\n")
@example(text="cluster: !!binary aGVsbG8=\n")
def test_any_yaml_text_loads_or_raises_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    path.chmod(0o600)
    assert_loads_or_one_line(path, {}, tmp_path)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary())
def test_any_bytes_load_or_raise_config_error(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    path.chmod(0o600)
    assert_loads_or_one_line(path, {}, tmp_path)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(environ=st.dictionaries(st.sampled_from(ENV_VARS), st.text(max_size=80)))
@example(environ={"SUGARKUBE_TOKEN": TOKEN, "SUGARKUBE_SERVERS": TOKEN})
def test_any_env_values_load_or_raise_config_error(tmp_path: Path, environ: dict[str, str]) -> None:
    assert_loads_or_one_line(None, environ, tmp_path)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(YAML_KEYS),
    value=st.one_of(
        st.text(max_size=80),
        st.integers(),
        st.floats(),
        st.booleans(),
        st.none(),
        st.lists(st.integers(), max_size=3),
    ),
)
def test_any_yaml_value_loads_or_raises_config_error(
    tmp_path: Path, key: str, value: object
) -> None:
    # JSON is YAML: a value of any of these types, quoted where it must be.
    section, _, leaf = key.rpartition(".")
    document = {section: {leaf: value}} if section else {key: value}
    path = tmp_path / "fuzz.yaml"
    path.write_text(json.dumps(document))
    path.chmod(0o600)
    assert_loads_or_one_line(path, {}, tmp_path)


def test_config_error_is_one_line_whatever_it_is_given() -> None:
    assert str(ConfigError("a\nb\r\u2028c")) == "a\\nb\\r\\u2028c"
    assert ConfigError("x").exit_code == const.EXIT_CONFIG


def test_a_token_k3s_would_refuse_is_a_config_error_without_the_token(tmp_path: Path) -> None:
    bad = "K10" + "ab" * 10 + "::server:s3cret-password"  # the CA hash is too short
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"SUGARKUBE_TOKEN": bad}, root=tmp_path)
    message = str(err.value)
    assert "SUGARKUBE_TOKEN" in message and "not a token k3s accepts" in message
    assert "s3cret" not in message and bad not in message
    assert err.value.exit_code == 78
