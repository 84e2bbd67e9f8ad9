"""The verifier's only seam to the machine: files under a root, tools on a PATH, a bounded runner.

Tests build a fake root (`/proc`, `/sys`, `/etc` trees) and a bin directory of tiny scripts; the
checks cannot tell the difference.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Protocol

from agent import const
from agent.verify.result import CheckFailed, Unavailable

# Where Debian keeps nft, iptables and k3s; a login shell of a non-root user lacks the sbin dirs.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Variables a tool may need from the caller's environment; everything else is left out.
_PASSED_ENV = ("HOME", "DBUS_SYSTEM_BUS_ADDRESS", "TZ")


@dataclass(frozen=True)
class CommandResult:
    """How a tool run ended: exit code (None if killed at the deadline) and capped output."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool = False
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """True when the tool exited 0 within its deadline."""
        return self.returncode == 0 and not self.timed_out

    def first_line(self) -> str:
        """The first non-blank line of stderr, else of stdout, else how the run ended."""
        for text in (self.stderr, self.stdout):
            for line in text.splitlines():
                if line.strip():
                    return line.strip()
        return "timed out" if self.timed_out else f"exit {self.returncode}"


class Runner(Protocol):
    """Runs argv with a deadline and env, with an output cap; never blocks past the deadline."""

    def __call__(
        self, argv: Sequence[str], *, timeout: float, env: Mapping[str, str], cap: int
    ) -> CommandResult: ...


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the tool's whole process group (it leads a session of its own)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _drain(streams: dict[IO[bytes], bytearray], deadline: float, cap: int) -> tuple[bool, bool]:
    """Read both pipes to EOF or the deadline, keeping `cap` bytes each: (timed_out, truncated)."""
    truncated = False
    with selectors.DefaultSelector() as selector:
        for stream in streams:
            os.set_blocking(stream.fileno(), False)
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True, truncated
            for key, _ in selector.select(remaining):
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                kept = streams[key.fileobj]  # type: ignore[index]
                room = cap - len(kept)
                if len(chunk) > room:
                    truncated = True
                kept += chunk[: max(room, 0)]
    return False, truncated


def run_command(
    argv: Sequence[str], *, timeout: float, env: Mapping[str, str], cap: int
) -> CommandResult:
    """Run argv without a shell; kill its process group at `timeout` s; keep `cap` bytes/stream."""
    deadline = time.monotonic() + timeout
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(env),
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    timed_out = True
    try:
        timed_out, truncated = _drain(streams, deadline, cap)
        if not timed_out:
            try:
                proc.wait(max(deadline - time.monotonic(), 0))
            except subprocess.TimeoutExpired:
                timed_out = True
    finally:
        if proc.returncode is None:
            _kill_group(proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(const.VERIFY_KILL_GRACE)
        for stream in streams:
            stream.close()
    out, err = (bytes(b).decode("utf-8", "replace") for b in streams.values())
    return CommandResult(
        None if timed_out else proc.returncode, out, err, timed_out=timed_out, truncated=truncated
    )


def _read_capped(path: Path, cap: int) -> bytes:
    """Up to `cap` bytes of a regular file, in small reads: /proc/sys refuses huge ones (ENOMEM).

    O_NONBLOCK keeps a FIFO planted where a file belongs from blocking the open.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = bytearray()
        while len(data) < cap:
            chunk = os.read(fd, min(65536, cap - len(data)))
            if not chunk:
                break
            data += chunk
        return bytes(data)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Probe:
    """Where checks look: `root` prefixes absolute paths, `path` finds tools, `env` is honoured.

    `env` carries the variables the runbook lets operators set (KUBECONFIG, K3S_KUBE_PROXY_MODE);
    `hostname` overrides /proc/sys/kernel/hostname (the daemon knows the name it advertises).
    """

    root: Path = Path("/")
    path: str = SYSTEM_PATH
    env: Mapping[str, str] = field(default_factory=dict)
    runner: Runner = run_command
    hostname: str | None = None
    service_type: str = const.HTTPS_SERVICE_TYPE

    @classmethod
    def system(cls, environ: Mapping[str, str] | None = None) -> Probe:
        """The real machine: root `/`, the caller's PATH with the system dirs appended."""
        env = dict(os.environ if environ is None else environ)
        dirs = [d for d in env.get("PATH", "").split(":") if d]
        dirs += [d for d in SYSTEM_PATH.split(":") if d not in dirs]
        return cls(path=":".join(dirs), env=env)

    def file(self, path: str) -> Path:
        """The absolute `path` as seen under this probe's root."""
        return self.root / path.lstrip("/")

    def read_optional(self, path: str) -> str | None:
        """The text of `path` (at most VERIFY_FILE_CAP bytes), None if it does not exist.

        Raises Unavailable when it exists but cannot be read.
        """
        try:
            data = _read_capped(self.file(path), const.VERIFY_FILE_CAP)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise Unavailable(f"cannot read {path}: {exc.strerror or exc}") from exc
        return data.decode("utf-8", "replace")

    def read(self, path: str) -> str:
        """The text of `path`; Unavailable when it is missing or unreadable."""
        text = self.read_optional(path)
        if text is None:
            raise Unavailable(f"{path} does not exist")
        return text

    def exists(self, path: str) -> bool:
        """True when `path` exists under the root (a dangling symlink does not)."""
        return self.file(path).exists()

    def which(self, tool: str) -> str | None:
        """The executable `tool` on this probe's PATH, or None."""
        return shutil.which(tool, path=self.path)

    def run(
        self, tool: str, *args: str, timeout: float | None = None, cap: int | None = None
    ) -> CommandResult:
        """Run `tool args` with LC_ALL=C; Unavailable when the tool is not on PATH, CheckFailed
        when it was killed at its deadline."""
        exe = self.which(tool)
        if exe is None:
            raise Unavailable(f"{tool} not found on PATH")
        result = self.run_argv([exe, *args], timeout=timeout, cap=cap)
        if result.timed_out:
            limit = const.VERIFY_COMMAND_TIMEOUT if timeout is None else timeout
            raise CheckFailed(f"`{tool} {' '.join(args[:2])}` did not finish within {limit:g} s")
        return result

    def run_argv(
        self, argv: Sequence[str], timeout: float | None = None, cap: int | None = None
    ) -> CommandResult:
        """Run a resolved argv with LC_ALL=C, this PATH and the passed-through variables."""
        env = {k: self.env[k] for k in _PASSED_ENV if k in self.env}
        env |= {"PATH": self.path, "LC_ALL": "C", "LANG": "C"}
        limit = const.VERIFY_COMMAND_TIMEOUT if timeout is None else timeout
        try:
            kept = const.VERIFY_OUTPUT_CAP if cap is None else cap
            return self.runner(argv, timeout=limit, env=env, cap=kept)
        except OSError as exc:
            raise CheckFailed(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc

    def host(self) -> str:
        """This node's host name, lower-cased; Unavailable when it cannot be read."""
        if self.hostname is not None:
            name = self.hostname
        else:
            name = self.read("/proc/sys/kernel/hostname")
        name = name.strip().lower().removesuffix(".").removesuffix(".local")
        if not name or any(c.isspace() or not c.isprintable() for c in name):
            raise Unavailable("the host name is empty or not printable")
        return name
