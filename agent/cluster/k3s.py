"""k3s's own files, read and written the way k3s reads them.

Config files are merged by the rules of k3s `pkg/configfilearg/parser.go` (readConfigFile,
dotDFiles, toSlice); join tokens, which config.py checks too, are parsed in `agent/tokens.py`.
Every path is relative to an injectable `root` ("/" on a node, a temporary directory in tests).

Membership: a node is a SERVER when `server/db` exists (k3s creates it for sqlite and etcd alike)
and an AGENT when `agent/client-kubelet.crt` exists: a k3s agent writes that file only after the
server accepted its token and signed its kubelet client certificate, whereas `agent/` itself (and
`agent/etc`) also appears on servers and on agents whose join failed.

Our drop-in is one file among the operator's: we never write anything else under /etc/rancher.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import stat
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Literal

import yaml

from agent import const
from agent.tokens import CABundleError, ca_hash, parse_token

K3S_STATE = "var/lib/rancher/k3s"
SERVER_DB = K3S_STATE + "/server/db"
ETCD_WAL = SERVER_DB + "/etcd/member/wal"  # k3s's test of an initialized etcd (isInitialized)
AGENT_DIR = K3S_STATE + "/agent"
AGENT_MARKER = AGENT_DIR + "/client-kubelet.crt"
SERVER_CA = K3S_STATE + "/server/tls/server-ca.crt"  # what /cacerts serves
CONFIG = "etc/rancher/k3s/config.yaml"
DROPIN_DIR = "etc/rancher/k3s/config.yaml.d"
OUR_DROPIN = DROPIN_DIR + "/50-sugarkube.yaml"
MOUNTINFO = "proc/self/mountinfo"
# Where systemd finds unit files, in its order (systemd.unit(5), the system manager's paths).
UNIT_DIRS = ("etc/systemd/system", "run/systemd/system", "usr/local/lib/systemd/system",
             "usr/lib/systemd/system", "lib/systemd/system")  # fmt: skip
SERVER_UNIT, AGENT_UNIT = "k3s.service", "k3s-agent.service"

# Ends in .tmp, not .yaml: k3s reads every *.yaml and *.yml in the drop-in directory, hidden or not.
_TMP_SUFFIX = ".tmp"
_HEADER = (
    "# Written by sugarkube-agent when it released the k3s gate; it replaces or removes it.\n"
    "# Put your own settings in config.yaml or another file here: later names win per key.\n"
)

Mode = Literal["cluster-init", "join-server", "join-agent", "single"]
_MODES: tuple[Mode, ...] = ("cluster-init", "join-server", "join-agent", "single")


class K3sError(Exception):
    """A k3s file could not be read, written or removed; the message names the path."""


class K3sConfigError(K3sError):
    """An operator's k3s config file k3s itself would refuse; one line naming the file."""


class Membership(StrEnum):
    """What k3s state this node already holds."""

    NONE = "none"
    SERVER = "server"
    AGENT = "agent"


def membership(root: Path) -> Membership:
    """SERVER if server/db exists, else AGENT if the signed kubelet client cert does, else NONE."""
    if (root / SERVER_DB).is_dir():
        return Membership.SERVER
    if (root / AGENT_MARKER).is_file():
        return Membership.AGENT
    return Membership.NONE


def unit_installed(root: Path, unit: str) -> bool:
    """Whether systemd has a unit file for UNIT, unmasked (the first found decides, as for
    systemd: a link to /dev/null in /etc masks the unit whatever /usr/lib holds)."""
    for directory in UNIT_DIRS:
        path = root / directory / unit
        if path.is_symlink() or path.exists():
            with contextlib.suppress(OSError):
                if os.path.realpath(path) == "/dev/null" or path.stat().st_size == 0:
                    return False
            return path.is_file()
    return False


def agent_only(root: Path) -> bool:
    """Only k3s-agent.service is installed (the k3s installer with K3S_URL): this node can run
    `k3s agent` and not `k3s server`, so it must neither bootstrap nor take a server slot."""
    return unit_installed(root, AGENT_UNIT) and not unit_installed(root, SERVER_UNIT)


def etcd_initialized(root: Path) -> bool:
    """Whether this server's etcd ever started: else a restarted k3s asks to be added again."""
    return (root / ETCD_WAL).is_dir()


def local_members(root: Path, timeout: float = 2.0) -> tuple[int, int] | None:
    """(members, learners) as this server's etcd lists them, asked through k3s's /db/info on
    127.0.0.1:6443 (open to local requests), its certificate checked against the CA on disk;
    None when it cannot say (no etcd: sqlite; k3s down; anything unexpected)."""
    import http.client  # lazy: servers only, and the gate need not load TLS
    import ssl

    try:
        context = ssl.create_default_context(cafile=str(root / SERVER_CA))
        connection = http.client.HTTPSConnection(
            "127.0.0.1", const.K3S_API_PORT, timeout=timeout, context=context
        )
        try:
            connection.request("GET", "/db/info")
            response = connection.getresponse()
            body = response.read(const.DB_INFO_MAX + 1)
        finally:
            connection.close()
        if response.status != 200 or len(body) > const.DB_INFO_MAX:
            return None
        members = json.loads(body)["members"]
        learners = sum(bool(m.get("isLearner")) for m in members)
        return len(members), learners
    except (OSError, ssl.SSLError, http.client.HTTPException, ValueError, KeyError, TypeError,
            AttributeError):
        return None


def ca_on_disk(root: Path) -> str:
    """sha256 of the cluster CA a server holds on disk, as /cacerts will serve it; "" if none."""
    try:
        return ca_hash((root / SERVER_CA).read_bytes())
    except (OSError, CABundleError):
        return ""


def config_files(root: Path, *, include_ours: bool = True) -> list[Path]:
    """The files k3s merges, in its order: config.yaml, then config.yaml.d/*.y{a,}ml by name."""
    files = [root / CONFIG] if (root / CONFIG).exists() else []
    directory = root / DROPIN_DIR
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return files
    except OSError as exc:
        raise K3sConfigError(f"{directory}: cannot list it ({exc.strerror})") from exc
    ours = root / OUR_DROPIN
    # Go's os.ReadDir sorts by the name's bytes; dotDFiles matches the suffix case-insensitively.
    for entry in sorted(entries, key=lambda e: os.fsencode(e.name)):
        if entry.is_dir(follow_symlinks=False):
            continue
        if not entry.name.lower().endswith((".yaml", ".yml")):
            continue
        path = directory / entry.name
        if include_ours or path != ours:
            files.append(path)
    return files


def merged_config(root: Path, *, include_ours: bool = True) -> dict[str, object]:
    """k3s's merged view of its config files: later files win per key, `key+` appends.

    With include_ours (the default) this is what k3s will run with; without, the operator's
    view alone, to see what the operator set before our drop-in existed.
    """
    values: dict[str, object] = {}
    for path in config_files(root, include_ours=include_ours):
        for raw_key, value in _read_pairs(path):
            key = raw_key.removesuffix("+")
            if raw_key.endswith("+") and key in values:
                values[key] = _to_slice(values[key]) + _to_slice(value)
            else:
                values[key] = value
    return values


def _read_pairs(path: Path) -> list[tuple[str, object]]:
    """The top-level key/value pairs of one YAML file in order, duplicates kept (yaml.MapSlice)."""
    try:
        with path.open("rb") as handle:
            data = handle.read(const.K3S_CONFIG_FILE_MAX + 1)
    except OSError as exc:
        raise K3sConfigError(f"{path}: cannot read it ({exc.strerror})") from exc
    if len(data) > const.K3S_CONFIG_FILE_MAX:
        raise K3sConfigError(f"{path}: larger than {const.K3S_CONFIG_FILE_MAX} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise K3sConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return []
        if not isinstance(node, yaml.MappingNode):
            raise K3sConfigError(f"{path}: not a mapping of k3s flags (key: value lines)")
        loader.flatten_mapping(node)
        construct = loader.construct_object
        return [
            (_go_string(construct(k, deep=True)), construct(v, deep=True)) for k, v in node.value
        ]
    except yaml.YAMLError as exc:
        # Only the place: PyYAML quotes the offending text, which may be the token.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise K3sConfigError(f"{path}: not valid YAML{where}") from exc
    finally:
        loader.dispose()


def _go_string(value: object) -> str:
    """A YAML scalar as wrangler's convert.ToString prints it (None is empty, bools lowercase)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _to_slice(value: object) -> list[object]:
    """configfilearg.toSlice: a string or list as items; anything else its trimmed text or none."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return list(value)
    text = _go_string(value).strip()
    return [text] if text else []


def api_url(address: str, port: int = const.K3S_API_PORT) -> str:
    """`https://<address>:<port>`, an IPv6 address bracketed and its zone escaped (RFC 6874)."""
    host, _, zone = address.partition("%")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return f"https://{address}:{port}"
    if ip.version == 6:
        return f"https://[{ip.compressed}{'%25' + zone if zone else ''}]:{port}"
    return f"https://{ip}:{port}"


@dataclass(frozen=True)
class Release:
    """What the gate tells k3s: bootstrap (etcd or sqlite) or join, as server or agent."""

    mode: Mode
    server_url: str | None = None
    token: str | None = field(default=None, repr=False)  # raw token text, as k3s reads it
    node_labels: tuple[str, ...] = ()
    etcd_settings: tuple[tuple[str, object], ...] = ()  # e.g. the runbook's snapshot schedule

    def __post_init__(self) -> None:
        if self.mode not in _MODES:
            raise ValueError(f"unknown release mode {self.mode!r}")
        joins = self.mode.startswith("join-")
        if joins and not (self.server_url or "").startswith("https://"):
            raise ValueError(f"a {self.mode} release needs an https:// server URL")
        if not joins and self.server_url is not None:
            raise ValueError(f"a {self.mode} release has no server URL")
        if joins and self.token is None:
            raise ValueError(f"a {self.mode} release needs the join token")
        if self.token is not None:
            parse_token(self.token)
        if any(not label or "\n" in label for label in self.node_labels):
            raise ValueError("node labels must be non-empty single lines")
        if self.etcd_settings and self.mode not in ("cluster-init", "join-server"):
            raise ValueError(f"a {self.mode} release runs no etcd to set")


def render_dropin(release: Release) -> str:
    """Our drop-in's YAML: cluster-init or server, token, node labels added to the operator's."""
    values: dict[str, object] = {}
    if release.mode == "cluster-init":
        values["cluster-init"] = True
    if release.server_url is not None:
        values["server"] = release.server_url
    if release.token is not None:
        values["token"] = release.token
    values.update(release.etcd_settings)
    if release.node_labels:
        # `node-label+` appends to labels the operator set in earlier files, never replaces them.
        values["node-label+"] = list(release.node_labels)
    body = yaml.safe_dump(values, default_flow_style=False, sort_keys=False, width=1 << 16)
    return _HEADER + (body if values else "")


def write_dropin(root: Path, release: Release) -> Path:
    """Atomically replace our drop-in (mode 0600 from creation on); no other file is touched."""
    text = render_dropin(release)
    directory = root / DROPIN_DIR
    target = root / OUR_DROPIN
    tmp = directory / f".{target.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
    try:
        _make_dirs(root, DROPIN_DIR)
        remove_stale_tmp(root)
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            const.K3S_DROPIN_MODE,
        )  # fmt: skip
        try:
            os.fchmod(fd, const.K3S_DROPIN_MODE)  # the umask may have cleared bits, never added
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(directory)
    except OSError as exc:
        raise K3sError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:  # whatever failed (not only OSError), the copy with the token does not stay
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return target


def remove_stale_tmp(root: Path) -> None:
    """Remove temporary copies of our drop-in a crash left behind (they hold the token)."""
    name = Path(OUR_DROPIN).name
    for stale in (root / DROPIN_DIR).glob(f".{name}.*{_TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def remove_dropin(root: Path) -> bool:
    """Remove our drop-in (and temporary copies a crash left); False when it was not there."""
    target = root / OUR_DROPIN
    with contextlib.suppress(OSError):
        remove_stale_tmp(root)
    try:
        target.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise K3sError(f"cannot remove {target}: {exc.strerror}") from exc
    with contextlib.suppress(OSError):
        _fsync_dir(target.parent)
    return True


def wipe_state(root: Path) -> list[str]:
    """Remove our drop-in and all k3s state (db, tokens, certs, agent); return what was removed.

    The drop-in goes first and the membership markers next, so an interrupted wipe leaves a
    non-member node without stale instructions (never `cluster-init` beside half a database).
    Refuses (K3sError) while something is mounted inside the state, as k3s-killall.sh unmounts
    it first. The operator's config.yaml, other drop-ins and /etc/rancher/node are kept.
    """
    state = root / K3S_STATE
    top = state.resolve() if state.is_symlink() else state
    # Not a directory: absent, or a link to a disk that is not mounted; nothing of k3s's to remove.
    has_state = top.is_dir()
    if has_state:
        _refuse_mounts(root, top)
    removed = [OUR_DROPIN] if remove_dropin(root) else []
    if not has_state:
        return removed
    for marker in (SERVER_DB, AGENT_MARKER):
        _remove(root / marker, top)
    if top == state and not _is_mount(root, state):
        _remove(state, top)
        return [*removed, K3S_STATE]
    # A symlink to another disk, or a mount point: empty it and keep it.
    for child in sorted(top.iterdir()):
        _remove(child, top)
        removed.append(f"{K3S_STATE}/{child.name}")
    return removed


def _remove(path: Path, top: Path) -> None:
    """Remove a file, link or tree under top (never following links); absent is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise K3sError(f"cannot remove {path} while wiping {top}: {exc.strerror}") from exc


def mount_points(root: Path) -> list[Path]:
    """Mount points from root's /proc/self/mountinfo (field 5, octal escapes undone), if any."""
    try:
        text = (root / MOUNTINFO).read_text(errors="surrogateescape")
    except OSError:
        return []
    points = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) > 4:
            inner = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            points.append(root / inner.lstrip("/"))
    return points


def _is_mount(root: Path, path: Path) -> bool:
    """Whether path is itself a mount point."""
    return path in mount_points(root) or (path.is_dir() and os.path.ismount(path))


def _refuse_mounts(root: Path, top: Path) -> None:
    """K3sError if anything below top is mounted (binds seen in mountinfo, the rest by st_dev)."""
    for point in mount_points(root):
        if point != top and point.is_relative_to(top):
            raise _mounted(point)
    device = top.lstat().st_dev
    for dirpath, dirnames, _ in os.walk(top):
        for name in dirnames:
            info = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISDIR(info.st_mode) and info.st_dev != device:
                raise _mounted(Path(dirpath, name))


def _mounted(point: Path) -> K3sError:
    return K3sError(
        f"cannot wipe: {point} is a mount point; stop k3s and its containers (k3s-killall.sh) first"
    )


def _make_dirs(root: Path, relative: str) -> None:
    """Create each missing directory of root/relative with mode 0755."""
    path = root
    for part in Path(relative).parts:
        path = path / part
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=const.K3S_DIR_MODE)
            os.chmod(path, const.K3S_DIR_MODE)


def _fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in directory durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
