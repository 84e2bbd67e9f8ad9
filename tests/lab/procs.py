"""Processes the lab starts: identity that survives PID reuse, signalling, bounded waits."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.lab.errors import LabError

GRACE = 3.0  # s between SIGTERM and SIGKILL at clean-up
GONE_TIMEOUT = 5.0  # s for a SIGKILLed process to vanish
POLL = 0.02  # s between checks of a process that is not our child


def start_time(pid: int) -> int | None:
    """Return the start time (clock ticks after boot) of a live, non-zombie PID, else None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after its last ')'
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass(frozen=True)
class ProcId:
    """A process as the lab recorded it: PID plus start time, so a reused PID is never ours."""

    pid: int
    start: int
    what: str

    @classmethod
    def of(cls, pid: int, what: str) -> ProcId:
        """Identify PID now; a process already gone gets start 0, which never matches alive()."""
        return cls(pid, start_time(pid) or 0, what)

    def alive(self) -> bool:
        """True while this very process runs (not a zombie, not a later process with its PID)."""
        return start_time(self.pid) == self.start

    def signal(self, sig: int) -> None:
        """Send SIG to the process (and its group when it leads one), if it is still this one."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(self.pid) == self.pid:
                os.killpg(self.pid, sig)
            else:
                os.kill(self.pid, sig)

    def to_json(self) -> dict[str, int | str]:
        """The record as stored in state.json."""
        return {"pid": self.pid, "start": self.start, "what": self.what}

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> ProcId:
        """Read a record written by to_json; ValueError if it is malformed."""
        pid, start, what = raw.get("pid"), raw.get("start"), raw.get("what")
        if not (isinstance(pid, int) and isinstance(start, int) and isinstance(what, str)):
            raise ValueError(f"bad process record {raw!r}")
        return cls(pid, start, what)


@dataclass
class LabProcess:
    """A process the lab owns: its identity, its Popen when we are its parent, and its log."""

    ident: ProcId
    popen: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def running(self) -> bool:
        """True while the process runs (reaping it when it is our child)."""
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return self.ident.alive()

    def wait_gone(self, timeout: float) -> bool:
        """Wait up to TIMEOUT s for the process to end; True if it did."""
        deadline = time.monotonic() + timeout
        if self.popen is not None:
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
        while self.ident.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL)
        return True


def terminate(procs: Iterable[LabProcess], grace: float = GRACE) -> list[LabProcess]:
    """SIGTERM every process, SIGKILL those still running after GRACE s; return any survivors."""
    procs = list(procs)
    for proc in procs:
        proc.ident.signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        proc.wait_gone(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        proc.ident.signal(signal.SIGKILL)
    return [proc for proc in procs if not proc.wait_gone(GONE_TIMEOUT)]


def kill_pids(pids: Iterable[int], what: str, grace: float = GRACE) -> list[int]:
    """Terminate PIDs we found (not started) as terminate() does; return the survivors' PIDs."""
    procs = []
    for pid in pids:
        start = start_time(pid)
        if start is not None:
            procs.append(LabProcess(ProcId(pid, start, what)))
    return [proc.ident.pid for proc in terminate(procs, grace)]


def log_tail(path: Path | None, lines: int = 15) -> str:
    """The last LINES lines of log PATH, indented, for an error message."""
    if path is None:
        return ""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError as exc:
        return f"\n    (no log {path}: {exc.strerror})"
    return f"\n  last lines of {path}:\n" + "\n".join(f"    {line}" for line in text)


def read_first_lines(
    pipes: Mapping[str, subprocess.Popen[bytes]],
    timeout: float,
    logs: Mapping[str, Path],
) -> dict[str, str]:
    """Read the first stdout line of each process within TIMEOUT s, then close those pipes.

    LabError names the first process that closed its stdout (or exited) without a line, or
    every process still silent at the deadline, with the tail of its log from LOGS.
    """
    lines: dict[str, str] = {}
    buffers = dict.fromkeys(pipes, b"")
    deadline = time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as sel:
            for key, popen in pipes.items():
                assert popen.stdout is not None
                sel.register(popen.stdout, selectors.EVENT_READ, key)
            while len(lines) < len(pipes):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    silent = sorted(set(pipes) - set(lines))
                    tails = "".join(log_tail(logs.get(key)) for key in silent)
                    raise LabError(f"not ready within {timeout:g} s: {', '.join(silent)}{tails}")
                for sel_key, _ in sel.select(remaining):
                    key = sel_key.data
                    chunk = os.read(sel_key.fd, 4096)
                    if not chunk:
                        raise LabError(f"{key} exited before it was ready{log_tail(logs.get(key))}")
                    buffers[key] += chunk
                    if b"\n" in buffers[key]:
                        lines[key] = buffers[key].split(b"\n", 1)[0].decode(errors="replace")
                        sel.unregister(sel_key.fileobj)
    finally:
        for popen in pipes.values():
            if popen.stdout is not None:
                popen.stdout.close()
    return lines
