"""This node's election key and promises, kept on disk across restarts and power cuts.

A node's promise to support one bootstrapper is what makes two clusters impossible
(agent/cluster/election.py, "Why one cluster"); a promise forgotten at a restart could be given
again to another. So the key, the binding and the release are written (atomically, fsynced,
directory too: an SD card loses what is only in the page cache) before anything on the wire
shows them. `wipe` removes the file: the node then starts afresh with a new key.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

from agent import const

_KEY = re.compile(rf"[0-9a-f]{{{const.ELECTION_KEY_HEX}}}")
_MODES = ("", "member", "cluster-init", "single", "join-server", "join-agent")
_MAX_BYTES = 4096
_JOINED = re.compile(r"[^/\s]{1,63}/[^/\s]{1,16}/[0-9]{1,3}")
_FIELDS = {"key", "bound", "bound_host", "released", "joined", "address", "starts"}
_STARTS = re.compile(r"[0-9]{1,9}")


class BallotError(Exception):
    """The ballot file cannot be read or written; the message names it and what to do."""


@dataclass(frozen=True)
class Ballot:
    """The election key, whom the node is bound to ("" free) and how it released ("" not)."""

    key: str
    bound: str = ""
    bound_host: str = ""
    released: str = ""
    joined: str = ""  # "<cluster>/<env>/<servers>" it released under ("" before it did)
    address: str = ""  # its mDNS interface's address when it released (etcd peers know it)
    starts: str = "0"  # agent starts with this key: the first half of `boot=` (agent/mdns/auth.py)

    @classmethod
    def new(cls) -> Ballot:
        return cls(f"{secrets.randbits(4 * const.ELECTION_KEY_HEX):0{const.ELECTION_KEY_HEX}x}")


def path(root: Path) -> Path:
    return root / str(const.BALLOT_FILE).lstrip("/")


def marker(root: Path) -> Path:
    """This boot's release marker under /run (a tmpfs: gone at a reboot), holding the mode."""
    return root / str(const.GATE_RELEASED_MARKER).lstrip("/")


def load(root: Path) -> Ballot | None:
    """The ballot on disk, None when there is none; BallotError when it is unusable."""
    file = path(root)
    try:
        with file.open("rb") as stream:
            data = stream.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise BallotError(f"cannot read {file}: {err.strerror or err}") from err
    try:
        if len(data) > _MAX_BYTES:
            raise ValueError(f"over {_MAX_BYTES} bytes")
        raw = json.loads(data)
        if not isinstance(raw, dict) or set(raw) - _FIELDS:
            raise ValueError("not the ballot's fields")
        ballot = Ballot(**{k: str(v) for k, v in raw.items()})
        if not _KEY.fullmatch(ballot.key) or (ballot.bound and not _KEY.fullmatch(ballot.bound)):
            raise ValueError("a key is not 16 hex digits")
        if ballot.released not in _MODES:
            raise ValueError(f"unknown release mode {ballot.released[:20]!r}")
        if ballot.joined and not _JOINED.fullmatch(ballot.joined):
            raise ValueError("`joined` is not <cluster>/<env>/<servers>")
        if not _STARTS.fullmatch(ballot.starts):
            raise ValueError("`starts` is not a count")
        if ballot.address:
            ipaddress.ip_address(ballot.address.partition("%")[0])
    except (ValueError, TypeError) as err:
        raise BallotError(
            f"{file} is damaged ({err}); this node will not stand, vote or bind until it is "
            "fixed or removed with `sugarkube-agent wipe --yes`"
        ) from err
    return ballot


def save(root: Path, ballot: Ballot) -> None:
    """Write the ballot atomically and durably; BallotError when it cannot be."""
    file = path(root)
    tmp = file.with_name(f".{file.name}.{secrets.token_hex(4)}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, json.dumps(asdict(ballot)).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, file)
        dfd = os.open(file.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise BallotError(f"cannot write {file}: {err.strerror or err}") from err


def remove(root: Path) -> bool:
    """Forget the ballot (wipe); False when there was none."""
    try:
        path(root).unlink()
    except FileNotFoundError:
        return False
    except OSError as err:
        raise BallotError(f"cannot remove {path(root)}: {err.strerror or err}") from err
    return True
