"""One lab node: a network, mount and UTS namespace with its own dbus-daemon and avahi-daemon."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from tests.lab import netns
from tests.lab.errors import LabError
from tests.lab.procs import LabProcess, ProcId, log_tail

AVAHI_START_TIMEOUT = 20.0  # s from launch to Server.GetState == RUNNING
AVAHI_STOP_TIMEOUT = 10.0  # s for avahi-daemon to exit after a signal
AVAHI_POLL = 0.05  # s between GetState calls
GETSTATE_TIMEOUT = 2.0  # s for one dbus-send call
AVAHI_RUNNING = 2  # AVAHI_SERVER_RUNNING, avahi-common/defs.h

# In-node path -> directory name under the node's root; each is bind-mounted privately.
# /etc/avahi/services is private too, so a node's static service files stay its own.
PRIVATE_DIRS: Mapping[str, str] = {
    "/etc/sugarkube": "etc-sugarkube",
    "/etc/rancher": "etc-rancher",
    "/var/lib/rancher": "var-lib-rancher",
    "/var/lib/sugarkube": "var-lib-sugarkube",
    "/var/lib/cni": "var-lib-cni",  # wipe removes CNI and kubelet state (k3s-killall.sh's work)
    "/var/lib/kubelet": "var-lib-kubelet",
    "/boot/firmware": "boot-firmware",
    "/etc/avahi/services": "etc-avahi-services",
}

# Runs as the holder after `unshare -m -u`: $1 hostname, then pairs of (source, mountpoint).
# "ready" on stdout tells the lab the namespaces are complete; nothing may enter them before.
HOLDER_SCRIPT = """set -e
hostname "$1"; shift
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/dbus /run/avahi-daemon /run/lock
while [ $# -gt 1 ]; do mkdir -p "$2"; mount --bind "$1" "$2"; shift 2; done
echo ready
exec sleep infinity
"""

GETSTATE = (
    "dbus-send", "--system", "--print-reply", f"--reply-timeout={int(GETSTATE_TIMEOUT * 1000)}",
    "--dest=org.freedesktop.Avahi", "/", "org.freedesktop.Avahi.Server.GetState",
)  # fmt: skip

Track = Callable[[LabProcess], None]


def holder_argv(ns: str, hostname: str, root: Path) -> list[str]:
    """The command that creates node NS's mount and UTS namespaces and keeps them alive.

    Creates the node's private directories under ROOT first.
    """
    for name in PRIVATE_DIRS.values():
        (root / name).mkdir(parents=True, exist_ok=True)
    mounts = [arg for inner, name in PRIVATE_DIRS.items() for arg in (str(root / name), inner)]
    return [
        "ip", "netns", "exec", ns, "unshare", "-m", "-u", "--propagation", "private",
        "sh", "-c", HOLDER_SCRIPT, "holder", hostname, *mounts,
    ]  # fmt: skip


def _merged_env(env: Mapping[str, str] | None) -> dict[str, str] | None:
    """The caller's environment plus ENV (None: inherit unchanged)."""
    return None if env is None else {**os.environ, **env}


def _open_log(path: Path, header: str) -> int:
    """Open log PATH for appending with a header line; return the descriptor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    line = f"--- lab {time.strftime('%H:%M:%S')}: {header}\n"
    os.write(fd, line.encode(errors="surrogateescape"))  # argv may carry raw bytes
    return fd


class Node:
    """A lab node; commands run inside its namespaces through its holder process."""

    def __init__(
        self,
        *,
        index: int,
        name: str,
        ns: str,
        addr: str,
        root: Path,
        holder: ProcId,
        track: Track,
    ) -> None:
        self.index = index
        self.name = name
        self.ns = ns
        self.addr = addr
        self.root = root
        self.holder = holder
        self._track = track
        self._avahi: LabProcess | None = None
        self._spawned = 0

    def __repr__(self) -> str:
        return f"Node({self.index}, {self.name!r}, {self.addr})"

    @property
    def avahi_log(self) -> Path:
        """The log of this node's avahi-daemon (every start appends to it)."""
        return self.root / "avahi.log"

    def enter_argv(self, *argv: str) -> list[str]:
        """ARGV prefixed so it runs inside this node (nsenter execs: the PID is ARGV's own).

        LabError once the node is down: its holder's PID may name a host process by then.
        """
        if not self.holder.alive():
            raise LabError(f"{self.ns} is down (its holder pid {self.holder.pid} is gone)")
        return ["nsenter", "-t", str(self.holder.pid), "-m", "-u", "-n", "--", *argv]

    def path(self, inner: str) -> Path:
        """The host path of INNER, a path as this node sees it (valid while the lab is up)."""
        for mountpoint, name in PRIVATE_DIRS.items():
            if inner == mountpoint or inner.startswith(mountpoint + "/"):
                return self.root / name / inner[len(mountpoint) :].lstrip("/")
        return Path(f"/proc/{self.holder.pid}/root") / inner.lstrip("/")

    def run(
        self,
        *argv: str,
        timeout: float = 30.0,
        check: bool = False,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ARGV inside the node; LabError on timeout, or on failure if CHECK.

        ENV adds to the inherited environment; INPUT is sent to its stdin.
        """
        command = " ".join(argv)
        try:
            done = subprocess.run(
                self.enter_argv(*argv),
                capture_output=True,
                text=True,
                timeout=timeout,
                env=_merged_env(env),
                input=input,
                stdin=subprocess.DEVNULL if input is None else None,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LabError(f"{self.ns}: `{command}` did not finish within {timeout:g} s") from exc
        if check and done.returncode != 0:
            raise LabError(
                f"{self.ns}: `{command}` exited {done.returncode}: {done.stderr.strip()[-2000:]}"
            )
        return done

    def spawn(
        self,
        *argv: str,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
        stdin: int | None = None,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ARGV inside the node in the background, stdout and stderr to LOG.

        LOG defaults to a file in the node's root. The lab kills the process (and its process
        group) at down(); Popen.pid is the command's own PID. STDIN and STDOUT may be
        subprocess.PIPE for a process the caller talks to (stderr still goes to LOG).
        """
        self._spawned += 1
        if log is None:
            log = self.root / f"spawn{self._spawned}-{Path(argv[0]).name}.log"
        _, popen = self._start(
            list(argv), log, f"{self.ns} {Path(argv[0]).name}", env,
            stdout_pipe=stdout == subprocess.PIPE, stdin_pipe=stdin == subprocess.PIPE,
        )
        return popen

    def _start(
        self,
        argv: Sequence[str],
        log: Path,
        what: str,
        env: Mapping[str, str] | None = None,
        *,
        stdout_pipe: bool = False,
        stdin_pipe: bool = False,
    ) -> tuple[LabProcess, subprocess.Popen[bytes]]:
        """Start ARGV inside the node as its own session, tracked by the lab."""
        fd = _open_log(log, " ".join(argv))
        try:
            popen = subprocess.Popen(
                self.enter_argv(*argv),
                stdin=subprocess.PIPE if stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE if stdout_pipe else fd,
                stderr=fd,
                env=_merged_env(env),
                start_new_session=True,
            )
        finally:
            os.close(fd)
        proc = LabProcess(ProcId.of(popen.pid, what), popen, log)
        self._track(proc)
        return proc, popen

    def start_dbus(self) -> subprocess.Popen[bytes]:
        """Launch the node's system bus; its first stdout line (the address) means ready."""
        argv = [
            "dbus-daemon",
            "--system",
            "--nofork",
            "--nopidfile",
            "--nosyslog",
            "--print-address",
        ]
        _, popen = self._start(
            argv, self.root / "dbus.log", f"{self.ns} dbus-daemon", None, stdout_pipe=True
        )
        return popen

    def launch_avahi(self) -> None:
        """Start the node's avahi-daemon in the foreground (as our child) without waiting."""
        if self._avahi is not None and self._avahi.running():
            raise LabError(
                f"{self.ns}: avahi-daemon is already running (pid {self._avahi.ident.pid})"
            )
        # A SIGKILLed daemon leaves its pid file; its PID may belong to someone else by now.
        with contextlib.suppress(FileNotFoundError):
            self.path("/run/avahi-daemon/pid").unlink()
        argv = ["avahi-daemon", "--no-chroot", "--no-rlimits"]
        self._avahi, _ = self._start(argv, self.avahi_log, f"{self.ns} avahi-daemon")

    def adopt_avahi(self, proc: LabProcess) -> None:
        """Take over control of an avahi-daemon a previous process of the lab started."""
        self._avahi = proc

    def avahi_pid(self) -> int | None:
        """PID of the node's avahi-daemon while it runs, else None."""
        if self._avahi is None or not self._avahi.running():
            return None
        return self._avahi.ident.pid

    def avahi_state(self) -> int | None:
        """avahi-daemon's Server.GetState on the node's bus (2 is RUNNING); None if unreachable."""
        done = self.run(*GETSTATE, timeout=GETSTATE_TIMEOUT + 3)
        match = re.search(r"int32 (-?\d+)", done.stdout)
        return int(match.group(1)) if match and done.returncode == 0 else None

    def avahi_running(self, timeout: float = 0.0) -> bool:
        """True once avahi-daemon reports RUNNING on the node's bus, polling up to TIMEOUT s."""
        return not poll_avahi([self], timeout)

    def start_avahi(self, timeout: float = AVAHI_START_TIMEOUT) -> None:
        """Start avahi-daemon and wait until it is RUNNING; LabError with its log if not."""
        self.launch_avahi()
        wait_avahi_running([self], timeout)

    def stop_avahi(self, sig: int = signal.SIGTERM) -> None:
        """Send SIG to avahi-daemon and wait for it to exit (no-op if it is not running)."""
        proc = self._avahi
        if proc is None or not proc.running():
            return
        proc.ident.signal(sig)
        if not proc.wait_gone(AVAHI_STOP_TIMEOUT):
            raise LabError(
                f"{self.ns}: avahi-daemon (pid {proc.ident.pid}) did not exit within "
                f"{AVAHI_STOP_TIMEOUT:g} s of signal {signal.Signals(sig).name}"
                f"{log_tail(self.avahi_log)}"
            )

    def kill_avahi_hard(self) -> None:
        """SIGKILL avahi-daemon: it sends no goodbye packets and leaves its pid file."""
        self.stop_avahi(signal.SIGKILL)

    def restart_avahi(self, timeout: float = AVAHI_START_TIMEOUT) -> None:
        """Stop avahi-daemon gracefully, start it again and wait until it is RUNNING."""
        self.stop_avahi()
        self.start_avahi(timeout)

    def _nft(self, script: str) -> None:
        """Load nft SCRIPT in the node's network namespace."""
        self.run("nft", "-f", "-", input=script, timeout=10, check=True)

    def mdns_loss(self, percent: int) -> None:
        """Drop PERCENT % of mDNS packets (udp/5353) entering and leaving this node."""
        self._nft(netns.loss_ruleset(percent))

    def partition(self) -> None:
        """Drop every mDNS packet entering and leaving this node."""
        self._nft(netns.partition_ruleset())

    def heal(self) -> None:
        """Remove this node's mDNS loss or partition rules."""
        self._nft(netns.heal_ruleset())


def _query_state(node: Node) -> subprocess.Popen[str]:
    """Start one GetState call on NODE's bus."""
    return subprocess.Popen(
        node.enter_argv(*GETSTATE),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def poll_avahi(nodes: Sequence[Node], timeout: float) -> list[Node]:
    """Poll GetState on NODES in parallel for up to TIMEOUT s; return those not RUNNING by then.

    A node whose avahi-daemon has exited stops being polled and is returned at once.
    """
    deadline = time.monotonic() + timeout
    pending = list(nodes)
    while True:
        queries = [(node, _query_state(node)) for node in pending]
        still = []
        for node, query in queries:
            try:
                out, _ = query.communicate(timeout=GETSTATE_TIMEOUT + 3)
            except subprocess.TimeoutExpired:
                query.kill()
                out, _ = query.communicate()
            if re.search(rf"int32 {AVAHI_RUNNING}\b", out) is None:
                still.append(node)
        pending = still
        if not pending or time.monotonic() >= deadline:
            return pending
        if all(node.avahi_pid() is None for node in pending):
            return pending
        time.sleep(AVAHI_POLL)


def wait_avahi_running(nodes: Sequence[Node], timeout: float = AVAHI_START_TIMEOUT) -> None:
    """Wait until every node's avahi-daemon is RUNNING; LabError naming the others, with logs."""
    late = poll_avahi(nodes, timeout)
    if late:
        details = "".join(
            f"\n  {node.ns}: avahi-daemon "
            + ("running" if node.avahi_pid() else "exited")
            + log_tail(node.avahi_log)
            for node in late
        )
        raise LabError(f"avahi-daemon not RUNNING within {timeout:g} s on:{details}")
