"""Operator checks: one YAML file per check in /etc/sugarkube/checks.d.

Modelled on node-problem-detector's custom plugins: a command with a timeout whose exit code is
the verdict (by default 0 pass, 1 fail, 2 skip; any other code, a signal or the timeout is a
fail). Output is capped; the first line of it is the detail. A file that cannot be read or parsed
becomes a `fail` under the file's own name; it never stops the verifier. See
etc/checks.d/example.yaml.disabled for the format.

Plugins run as root, so whoever can write one runs code as root: a file, its directory, or the
command it names, not owned by root or writable by group or others, is refused (a `fail` saying
so) and nothing of it runs. The command runs under agent/verify/reaper.py, which kills
everything it started when it ends or times out, new sessions and double forks included.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from agent import const
from agent.verify.parse import one_reason
from agent.verify.probe import Probe
from agent.verify.result import Status, Verdict, failed

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_CODES: Mapping[int, Status] = {0: Status.PASS, 1: Status.FAIL, 2: Status.SKIP}
_KEYS = frozenset({"name", "command", "timeout", "exit_codes", "description"})
REAPER = Path(__file__).with_name("reaper.py")


class PluginError(Exception):
    """A checks.d file that cannot become a check; the message says why, in one line."""


@dataclass(frozen=True)
class PluginSpec:
    """A parsed checks.d file."""

    name: str
    argv: tuple[str, ...]
    timeout: float
    codes: Mapping[int, Status]


def _argv(command: Any) -> tuple[str, ...]:
    """The argv of a `command:` value: a list of strings, or one string split as a shell would."""
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise PluginError(f"command: {exc}") from exc
    elif isinstance(command, list) and all(isinstance(a, str | int | float) for a in command):
        argv = [str(a) for a in command]
    else:
        raise PluginError("command must be a string or a list of strings")
    if not argv or not argv[0]:
        raise PluginError("command is empty")
    if "/" in argv[0] and not argv[0].startswith("/"):
        raise PluginError(f"command {argv[0]!r} must be an absolute path or a name on PATH")
    return tuple(argv)


def _timeout(value: Any) -> float:
    """The `timeout:` in seconds: a number in (0, VERIFY_PLUGIN_TIMEOUT_MAX]."""
    if value is None:
        return const.VERIFY_PLUGIN_TIMEOUT
    limit = const.VERIFY_PLUGIN_TIMEOUT_MAX
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= limit:
        raise PluginError(f"timeout must be a number of seconds in (0, {limit:g}], not {value!r}")
    return float(value)


def _codes(value: Any) -> Mapping[int, Status]:
    """The `exit_codes:` mapping (code -> pass, fail or skip); unlisted codes are a fail."""
    if value is None:
        return DEFAULT_CODES
    if not isinstance(value, dict) or not value:
        raise PluginError("exit_codes must map exit codes to pass, fail or skip")
    codes = {}
    for code, meaning in value.items():
        if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 255:
            raise PluginError(f"exit_codes: {code!r} is not an exit code (0-255)")
        try:
            codes[code] = Status(str(meaning).lower())
        except ValueError as exc:
            raise PluginError(f"exit_codes: {meaning!r} is not pass, fail or skip") from exc
    return codes


def parse_spec(text: str) -> PluginSpec:
    """A PluginSpec from a checks.d file's text; PluginError naming the first problem."""
    try:
        data: Any = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as exc:
        raise PluginError(f"not valid YAML: {one_reason(exc)}") from exc
    if not isinstance(data, dict):
        raise PluginError("not a YAML mapping with name and command")
    unknown = sorted(str(k) for k in data if k not in _KEYS)
    if unknown:
        raise PluginError(f"unknown key {unknown[0]!r} (known: {', '.join(sorted(_KEYS))})")
    name = data.get("name")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise PluginError(f"name must match {NAME_RE.pattern}, not {name!r}")
    if "command" not in data:
        raise PluginError("no command")
    return PluginSpec(
        name, _argv(data["command"]), _timeout(data.get("timeout")), _codes(data.get("exit_codes"))
    )


def _unsafe(what: str, status: os.stat_result) -> str:
    """Why `what` may not choose what runs as root (owner, mode), or "" when it may."""
    mode = stat.S_IMODE(status.st_mode)
    if status.st_uid != 0:
        return f"{what} is owned by uid {status.st_uid}, not root"
    writers = " and ".join(w for bit, w in ((0o020, "group"), (0o002, "others")) if mode & bit)
    return f"{what} is writable by {writers} (mode {mode:04o})" if writers else ""


def _refused(reason: str) -> str:
    return f"refused, not run: {reason}; make it root's and not group- or world-writable"


def _read_capped(path: Path) -> str:
    """A regular file's UTF-8 text, refusing FIFOs, devices, files over the cap and files
    (or a directory) root does not alone control."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PluginError(f"cannot read: {exc.strerror or exc}") from exc
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise PluginError("not a regular file")
        reason = _unsafe("the file", status) or _unsafe(
            f"its directory {const.VERIFY_PLUGIN_DIR}", os.stat(path.parent)
        )
        if reason:
            raise PluginError(_refused(reason))
        data = os.read(fd, const.VERIFY_PLUGIN_FILE_CAP + 1)
    except OSError as exc:
        raise PluginError(f"cannot read: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > const.VERIFY_PLUGIN_FILE_CAP:
        raise PluginError(f"larger than {const.VERIFY_PLUGIN_FILE_CAP} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PluginError("not UTF-8 text") from exc


def run_plugin(probe: Probe, spec: PluginSpec) -> Verdict:
    """Run one operator check; its exit code gives the status, its first output line the detail."""
    exe = spec.argv[0] if spec.argv[0].startswith("/") else probe.which(spec.argv[0])
    if exe is None or not os.access(exe, os.X_OK) or not os.path.isfile(exe):
        return failed(f"command {spec.argv[0]!r} not found or not executable")
    try:
        reason = _unsafe(f"command {exe}", os.stat(exe)) or _unsafe(
            f"the directory of command {exe}", os.stat(os.path.dirname(exe))
        )
    except OSError as exc:
        reason = f"command {exe} cannot be checked: {exc.strerror or exc}"
    if reason:
        return failed(_refused(reason))
    wrapped = [sys.executable, "-I", "-S", str(REAPER), f"{spec.timeout!r}", exe, *spec.argv[1:]]
    result = probe.run_argv(wrapped, timeout=spec.timeout + const.VERIFY_PLUGIN_GRACE)
    if result.timed_out or result.returncode == -signal.SIGALRM:  # the reaper's timeout
        return failed(f"timed out after {spec.timeout:g} s and was killed")
    code = result.returncode if result.returncode is not None else -1
    lines = [ln.strip() for ln in (result.stdout + "\n" + result.stderr).splitlines() if ln.strip()]
    detail = lines[0] if lines else ""
    if result.truncated:
        detail += f" (output beyond {const.VERIFY_OUTPUT_CAP} bytes discarded)"
    status = spec.codes.get(code, Status.FAIL)
    if code < 0:
        return failed(f"killed by signal {-code}")
    if status is Status.FAIL:
        return failed(f"exit {code}: {detail}" if detail else f"exit {code}")
    return Verdict(status, detail or f"exit {code}")


def _file_name(path: Path) -> str:
    """A check name for a broken file: its stem with unusable characters replaced."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)[:64].lstrip("_.-")
    return stem or "checks.d"


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or `name-2`, `name-3`... whichever is not yet taken (and take it)."""
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate)
    return candidate


def _broken(reason: str) -> Verdict:
    """The verdict of a checks.d file that cannot run."""
    return failed(reason)


def plugin_jobs(probe: Probe, taken: set[str]) -> list[tuple[str, Callable[[], Verdict]]]:
    """One (name, job) per *.yaml in checks.d, by file name; names already `taken` are avoided."""
    taken = set(taken)
    directory = probe.file(const.VERIFY_PLUGIN_DIR)
    try:
        paths = sorted(
            p for p in directory.iterdir() if p.suffix == ".yaml" and not p.name.startswith(".")
        )
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        reason = f"cannot list {const.VERIFY_PLUGIN_DIR}: {exc.strerror or exc}"
        return [(_unique("checks.d", taken), partial(_broken, reason))]
    jobs: list[tuple[str, Callable[[], Verdict]]] = []
    for path in paths:
        try:
            spec = parse_spec(_read_capped(path))
        except PluginError as exc:
            jobs.append((_unique(_file_name(path), taken), partial(_broken, f"{path.name}: {exc}")))
            continue
        if spec.name in taken:
            reason = f"{path.name}: the name {spec.name!r} is already used by another check"
            jobs.append((_unique(_file_name(path), taken), partial(_broken, reason)))
            continue
        taken.add(spec.name)
        jobs.append((spec.name, partial(run_plugin, probe, spec)))
    return jobs
