"""Boot a root made by tests.image.rootfs under systemd-nspawn and work inside it.

PID 1 of these test machines is not systemd, so `systemd-nspawn -b` is how a test gets a real
systemd booting a real Debian system. Choices, each forced by something measured here:

- `--register=no --keep-unit`: there is no systemd-machined (nor a host systemd) to register
  the machine with or to create a scope unit for it; with these two nspawn does neither.
- `--console=read-only` under `script -qfec`: nspawn gives the container a /dev/console only
  when its own stdin/stdout are a terminal; with pipes it falls back to `--console=pipe`, where
  the container has no /dev/console and systemd's boot messages go nowhere. `script` supplies a
  pseudo-terminal and copies everything written to it to its stdout, our console log file.
- commands run inside through `nsenter` into the container's PID 1: `systemd-run -M`,
  `machinectl shell` and friends all need machined, which `--register=no` rules out.
- each container sits in a network namespace: one we made (`--network-namespace-path`, so
  several containers share one bridge, like the lab's nodes), or else a private one with only
  `lo` (`--private-network`): a booted avahi-daemon never talks on the host's own network.

Cleanup is by PID only: the `script` process we started, the nspawn below it and the
container's PID 1 (SIGKILL to a PID namespace's init kills everything inside it).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tests.image.rootfs import HOST_IFNAME

IP_TIMEOUT = 10.0  # s for one `ip` command
START_TIMEOUT = 30.0  # s from starting nspawn to the container's PID 1 existing
RUN_TIMEOUT = 30.0  # s default for one command inside the container
POWEROFF_TIMEOUT = 30.0  # s for a clean shutdown before SIGKILL
KILL_TIMEOUT = 10.0  # s for SIGKILLed processes to be reaped
POLL = 0.05  # s between polls
# systemd reads SIGRTMIN+4 as "start poweroff.target" (systemd(1), SIGNALS); works without a bus.
POWEROFF_SIGNAL = signal.SIGRTMIN + 4
INSIDE_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "TERM=dumb",
    "SYSTEMD_PAGER=cat",
    "SYSTEMD_COLORS=0",
)
OK_STATES = ("running", "degraded")  # `systemctl is-system-running` once boot is done


class BootError(RuntimeError):
    """The container did not start, boot or stop as asked; the message carries the console tail."""


# -- network plumbing ---------------------------------------------------------------------------


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; BootError (with ip's message) if CHECK and it fails or hangs."""
    try:
        done = subprocess.run(
            ["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise BootError(f"`ip {' '.join(args)}` hung for {IP_TIMEOUT:g} s") from exc
    if check and done.returncode != 0:
        raise BootError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")
    return done


def create_bridge(bridge: str) -> None:
    """Create BRIDGE on the host, up, flooding multicast to every port (no IGMP querier here)."""
    ip("link", "add", bridge, "type", "bridge", "mcast_snooping", "0")
    ip("link", "set", bridge, "up")


def host_veth_name(ns: str) -> str:
    """The host end of namespace NS's veth: "v" + NS (keep NS under 15 characters)."""
    name = f"v{ns}"
    if len(name) > 15:
        raise ValueError(f"namespace name {ns!r} too long for an interface name")
    return name


def create_netns(ns: str, *, bridge: str, address: str | None = None) -> None:
    """Create network namespace NS holding the veth `host0`, its peer `v<NS>` on BRIDGE.

    `host0` is the name systemd-nspawn gives a container's veth, so the root's networkd config
    (rootfs.make_root(address=...)) matches it. ADDRESS (CIDR) instead configures host0 from
    the host now, for a root booted without networkd. `lo` is left to the container's systemd.
    """
    veth = host_veth_name(ns)
    ip("netns", "add", ns)
    try:
        ip("link", "add", veth, "type", "veth", "peer", "name", HOST_IFNAME, "netns", ns)
        ip("link", "set", veth, "master", bridge, "up")
        ip("-n", ns, "link", "set", HOST_IFNAME, "multicast", "on", "up")
        if address:
            ip("-n", ns, "addr", "add", address, "dev", HOST_IFNAME)
    except BootError:
        delete_netns(ns)
        raise


def delete_netns(ns: str) -> None:
    """Delete namespace NS and its veth (both ends); quiet if absent."""
    ip("netns", "del", ns, check=False)
    ip("link", "del", host_veth_name(ns), check=False)


def delete_link(name: str) -> None:
    """Delete host link NAME (such as our bridge); quiet if absent."""
    ip("link", "del", name, check=False)


@contextlib.contextmanager
def network(bridge: str, namespaces: Sequence[str]) -> Iterator[list[str]]:
    """BRIDGE plus one namespace per name in NAMESPACES (see create_netns), removed on exit.

    Yields the namespace names. Containers booted in them must be gone before this exits
    (use them in an inner `with`), or `ip netns del` only unmounts the name.
    """
    made: list[str] = []
    create_bridge(bridge)
    try:
        for ns in namespaces:
            create_netns(ns, bridge=bridge)
            made.append(ns)
        yield list(namespaces)
    finally:
        for ns in made:
            delete_netns(ns)
        delete_link(bridge)


# -- processes ----------------------------------------------------------------------------------


def _ppid_and_nspid(pid: int) -> tuple[int, list[int]] | None:
    """PID's parent and its NSpid list (host PID first, innermost last); None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    ppid, nspid = 0, [pid]
    for line in text.splitlines():
        if line.startswith("PPid:"):
            ppid = int(line.split()[1])
        elif line.startswith("NSpid:"):
            nspid = [int(word) for word in line.split()[1:]]
    return ppid, nspid


def _children(pid: int) -> list[int]:
    """Host PIDs whose parent is PID (a /proc scan: /proc/PID/task/*/children is optional)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _ppid_and_nspid(int(entry))
            if info and info[0] == pid:
                found.append(int(entry))
    return found


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first); None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def start_time(pid: int) -> int | None:
    """PID's start time in clock ticks since boot: with the PID, it names one process for good."""
    fields = _stat(pid)
    return int(fields[19]) if fields else None


@dataclass(frozen=True)
class Proc:
    """A process we found, named by PID and start time, so a recycled PID is never signalled."""

    pid: int
    started: int

    @classmethod
    def of(cls, pid: int) -> Proc | None:
        """The process PID now is; None if there is none."""
        started = start_time(pid)
        return cls(pid, started) if started is not None else None

    def alive(self) -> bool:
        """True while this very process exists and is not a zombie."""
        fields = _stat(self.pid)
        return fields is not None and fields[0] != "Z" and int(fields[19]) == self.started

    def signal(self, sig: int) -> None:
        """Send SIG if this very process is still there."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)


@dataclass
class SystemState:
    """What `systemctl is-system-running` said once boot was over, and how long it took."""

    state: str  # "running" or "degraded"
    failed_units: list[str]  # `systemctl --failed` (empty when "running")
    seconds: float  # from boot() to this answer


@dataclass
class Container:
    """One booted root: `script` -> `systemd-nspawn` -> the container's systemd (PID 1 inside).

    Use as a context manager (or call close()): on exit it powers the container off cleanly if it
    can, then SIGKILLs every PID it started that is still there.
    """

    root: Path
    machine: str
    log_path: Path
    process: subprocess.Popen[bytes]  # the `script` wrapper
    started: float  # time.monotonic() when nspawn was started
    nspawn: Proc | None = None  # systemd-nspawn, child of `script`
    leader: Proc | None = None  # the container's PID 1 (systemd), child of nspawn

    @property
    def nspawn_pid(self) -> int | None:
        """Host PID of systemd-nspawn."""
        return self.nspawn.pid if self.nspawn else None

    @property
    def leader_pid(self) -> int | None:
        """Host PID of the container's PID 1 (its systemd)."""
        return self.leader.pid if self.leader else None

    # -- lifecycle --

    def _find_leader(self, timeout: float) -> int:
        """Wait for nspawn below `script` and its child that is PID 1 of a new PID namespace."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BootError(
                    f"systemd-nspawn for {self.machine} exited {self.process.returncode} "
                    f"before booting:\n{self.console_tail()}"
                )
            if self.nspawn is None:
                # `script -c "exec systemd-nspawn ..."`: the shell became nspawn, script's child.
                kids = _children(self.process.pid)
                self.nspawn = Proc.of(kids[0]) if kids else None
            if self.nspawn is not None:
                # nspawn is a child subreaper: its inner child (PID 1 of the new PID namespace,
                # later exec'ing systemd) is reparented to it when the outer child exits.
                for kid in _children(self.nspawn.pid):
                    info = _ppid_and_nspid(kid)
                    if info and len(info[1]) > 1 and info[1][-1] == 1:
                        self.leader = Proc.of(kid)
                        if self.leader:
                            return kid
            time.sleep(POLL)
        raise BootError(
            f"no container PID 1 for {self.machine} after {timeout:g} s:\n{self.console_tail()}"
        )

    def alive(self) -> bool:
        """True while the nspawn session (the `script` wrapper) has not exited."""
        return self.process.poll() is None

    def poweroff(self, timeout: float = POWEROFF_TIMEOUT) -> bool:
        """Shut the container down cleanly; SIGKILL what is left after TIMEOUT.

        Returns True if it stopped by itself (systemd ran its shutdown and nspawn exited), False
        if it had to be killed. The poweroff request is SIGRTMIN+4 to the container's systemd,
        repeated each second: it needs no bus, and a signal sent before systemd installed its
        handlers (a PID namespace's init ignores those) is simply sent again.
        """
        deadline = time.monotonic() + timeout
        next_signal = 0.0
        while self.alive() and time.monotonic() < deadline:
            if time.monotonic() >= next_signal and self.leader:
                self.leader.signal(POWEROFF_SIGNAL)
                next_signal = time.monotonic() + 1.0
            time.sleep(POLL)
        clean = not self.alive()
        self.kill()
        return clean

    def kill(self) -> None:
        """SIGKILL the container's PID 1 (and so all inside it), then nspawn and `script`.

        In that order: with its container gone nspawn exits by itself and `script` reaps it, so
        no zombie is left for the host's PID 1 (which may not reap); nspawn and `script` are
        SIGKILLed only if they do not follow within KILL_TIMEOUT.
        """
        ours = [proc for proc in (self.leader, self.nspawn) if proc]
        if self.leader:
            self.leader.signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=KILL_TIMEOUT)
        if self.process.poll() is None:
            if self.nspawn:
                self.nspawn.signal(signal.SIGKILL)
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=KILL_TIMEOUT)
        deadline = time.monotonic() + KILL_TIMEOUT
        while time.monotonic() < deadline and any(proc.alive() for proc in ours):
            time.sleep(POLL)
        # nspawn's per-machine mount-propagation directory outlives a SIGKILLed nspawn.
        with contextlib.suppress(OSError):
            Path(f"/run/systemd/nspawn/propagate/{self.machine}").rmdir()

    def close(self, timeout: float = POWEROFF_TIMEOUT) -> bool:
        """poweroff() unless already gone; True if the container had stopped cleanly."""
        if not self.alive():
            self.kill()
            return self.process.returncode == 0
        return self.poweroff(timeout)

    def __enter__(self) -> Container:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- inside --

    def argv(self, *cmd: str) -> list[str]:
        """The host argv that runs CMD inside the container (all its namespaces, its root).

        The environment is reset (INSIDE_ENV), so nothing of the host's (a pyenv PATH, say)
        leaks in. The process stays in the host's cgroup, which systemctl does not mind.
        """
        if self.leader is None or not self.leader.alive():
            raise BootError(f"container {self.machine} is not running")
        return [
            "nsenter",
            f"--target={self.leader.pid}",
            "--all",
            "--root",
            "--wd",
            "--",
            "env",
            "-i",
            *INSIDE_ENV,
            *cmd,
        ]

    def run(
        self,
        *cmd: str,
        timeout: float = RUN_TIMEOUT,
        check: bool = False,
        input: str | None = None,  # subprocess.run's own name for it
    ) -> subprocess.CompletedProcess[str]:
        """Run CMD inside the container; stdout and stderr captured as text.

        On TIMEOUT, the whole process group (nsenter and the child it forked inside) is
        SIGKILLed and subprocess.TimeoutExpired raised. CHECK raises CalledProcessError on a
        non-zero exit, as subprocess.run does.
        """
        proc = subprocess.Popen(
            self.argv(*cmd),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    def spawn(self, *cmd: str, **popen: object) -> subprocess.Popen[str]:
        """Start CMD inside the container in the background (text mode, own session).

        The caller owns the Popen: kill it by `os.killpg(p.pid, SIGKILL)` (nsenter forks).
        """
        return subprocess.Popen(  # type: ignore[call-overload,no-any-return]
            self.argv(*cmd), text=True, start_new_session=True, **popen
        )

    def wait_system_running(self, timeout: float = 60.0) -> SystemState:
        """Wait until systemd finished booting; return its state and failed units.

        Accepts "running" and "degraded" (the caller decides what failed units mean; under
        qemu-user some are expected). BootError with the console tail on any other final state
        ("maintenance", "stopping") or after TIMEOUT.
        """
        deadline = time.monotonic() + timeout
        last = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not self.alive():
                raise BootError(f"{self.machine} exited while booting:\n{self.console_tail()}")
            try:
                # --wait blocks until boot is over; before the manager listens it fails fast.
                done = self.run("systemctl", "is-system-running", "--wait", timeout=left)
            except subprocess.TimeoutExpired:
                break
            except BootError:  # PID 1 not there yet or already gone
                time.sleep(POLL)
                continue
            last = done.stdout.strip() or done.stderr.strip()
            if last in OK_STATES:
                failed = self.failed_units() if last == "degraded" else []
                return SystemState(last, failed, time.monotonic() - self.started)
            if last in ("maintenance", "stopping"):
                raise BootError(f"{self.machine} is {last!r}:\n{self.console_tail()}")
            time.sleep(POLL)
        raise BootError(
            f"{self.machine} not running after {timeout:g} s (last: {last!r}); "
            f"jobs:\n{self._jobs()}\nconsole:\n{self.console_tail()}"
        )

    def failed_units(self) -> list[str]:
        """Names of the units systemd inside lists as failed."""
        done = self.run("systemctl", "--failed", "--plain", "--no-legend", "--full")
        return [line.split()[0] for line in done.stdout.splitlines() if line.split()]

    def _jobs(self) -> str:
        """`systemctl list-jobs` inside, for a timeout message (best effort)."""
        try:
            return self.run("systemctl", "list-jobs", "--no-pager", timeout=5).stdout
        except (subprocess.TimeoutExpired, BootError) as exc:
            return f"(unavailable: {exc})"

    # -- console --

    def console(self) -> str:
        """Everything the container wrote to /dev/console so far, carriage returns removed."""
        try:
            raw = self.log_path.read_bytes()
        except OSError:
            return ""
        return raw.decode("utf-8", "replace").replace("\r", "")

    def console_tail(self, lines: int = 40) -> str:
        """The last LINES lines of console()."""
        return "\n".join(self.console().splitlines()[-lines:])


def nspawn_argv(
    root: Path,
    *,
    machine: str,
    network_namespace: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The systemd-nspawn command line boot() runs (inside `script`)."""
    argv = [
        "systemd-nspawn",
        "--boot",
        f"--directory={root}",
        f"--machine={machine}",
        "--register=no",
        "--keep-unit",
        "--console=read-only",
        "--link-journal=no",  # the host keeps no journal for it; the root's own is volatile
    ]
    if network_namespace:
        # Unlike --private-network, a namespace path does not keep CAP_NET_ADMIN: without it
        # systemd-networkd's ConditionCapability fails and PID 1 cannot even bring `lo` up.
        # It is the container's own namespace, so the capability reaches no host interface.
        argv += [
            f"--network-namespace-path=/run/netns/{network_namespace}",
            "--capability=CAP_NET_ADMIN",
        ]
    else:
        argv.append("--private-network")
    return [*argv, *extra_args]


def boot(
    root: Path,
    *,
    network_namespace: str | None = None,
    machine: str | None = None,
    log_path: Path | None = None,
    extra_args: Sequence[str] = (),
    start_timeout: float = START_TIMEOUT,
) -> Container:
    """Boot ROOT with systemd-nspawn; return once the container's PID 1 exists.

    NETWORK_NAMESPACE: a name under /run/netns (see create_netns), else a private network with
    only `lo`. MACHINE: nspawn's machine name (default: ROOT's directory name; must be unique
    among running containers, and is the hostname until systemd sets /etc/hostname's).
    LOG_PATH: console log (default: ROOT's sibling `<name>.console.log`), truncated here.
    Call wait_system_running() next; use the result as a context manager so it is always
    stopped. BootError (with the console tail) if nspawn exits or no PID 1 appears in time.
    """
    root = root.resolve()
    machine = machine or root.name
    log_path = log_path or root.with_name(f"{root.name}.console.log")
    if network_namespace and not Path(f"/run/netns/{network_namespace}").exists():
        raise BootError(f"no network namespace {network_namespace!r}")
    cmdline = "exec " + shlex.join(
        nspawn_argv(
            root, machine=machine, network_namespace=network_namespace, extra_args=extra_args
        )
    )
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "SHELL": "/bin/sh",  # script runs -c through $SHELL
        "TERM": "dumb",  # nspawn passes TERM to the container: plain console, no colours
        "LANG": "C.UTF-8",
    }
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["script", "--quiet", "--flush", "--return", "--command", cmdline, "/dev/null"],
            stdin=subprocess.DEVNULL,  # read-only console: nothing is ever typed
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # no controlling terminal of ours for script to touch
        )
    container = Container(
        root=root,
        machine=machine,
        log_path=log_path,
        process=process,
        started=started,
    )
    try:
        container._find_leader(start_timeout)
    except BaseException:
        container.kill()
        raise
    return container
