"""The lab: N nodes on one bridge, each with its own namespaces, bus and avahi-daemon."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from tests.lab import cleanup, netns
from tests.lab.errors import LabError
from tests.lab.node import Node, holder_argv, wait_avahi_running
from tests.lab.procs import LabProcess, ProcId, read_first_lines
from tests.lab.state import LabState, NodeRecord, default_workdir, load_state

HOLDER_TIMEOUT = 10.0  # s for a holder to build its namespaces
DBUS_TIMEOUT = 10.0  # s for dbus-daemon to print its address (it listens by then)
AVAHI_TIMEOUT = 20.0  # s for every avahi-daemon to reach RUNNING

_HOSTNAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)


class Lab:
    """N lab nodes; up() builds them, down() removes everything, also as a context manager."""

    def __init__(
        self,
        n: int,
        *,
        prefix: str = "skl",
        subnet: str = "10.251.0",
        workdir: Path | None = None,
        hostnames: Sequence[str] | None = None,
        archive: Path | None = None,
    ) -> None:
        """Describe a lab; ARCHIVE, if given, receives every node log at down()."""
        if not 1 <= n <= netns.MAX_NODES:
            raise ValueError(f"a lab has 1-{netns.MAX_NODES} nodes, not {n}")
        self.prefix = netns.check_prefix(prefix)
        self.subnet = netns.check_subnet(subnet)
        self.workdir = workdir or default_workdir(prefix)
        self.hostnames = (
            list(hostnames) if hostnames is not None else [f"node{i}" for i in range(1, n + 1)]
        )
        if len(self.hostnames) != n:
            raise ValueError(f"{len(self.hostnames)} hostnames given for {n} nodes")
        for name in self.hostnames:
            if not _HOSTNAME_RE.fullmatch(name):
                raise ValueError(f"hostname {name!r} is not a valid DNS label")
        self.n = n
        self.archive = archive
        self.nodes: list[Node] = []
        self._procs: list[LabProcess] = []
        self._state: LabState | None = None
        self._downing = False

    def __repr__(self) -> str:
        return f"Lab({self.n}, prefix={self.prefix!r}, up={self._state is not None})"

    @property
    def bridge(self) -> str:
        """The lab's bridge on the host."""
        return netns.bridge_name(self.prefix)

    def node(self, index: int) -> Node:
        """Node INDEX, counting from 1 like the hostnames."""
        if not 1 <= index <= len(self.nodes):
            raise LabError(f"no node {index}: the lab has nodes 1-{len(self.nodes)} up")
        return self.nodes[index - 1]

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.down()

    def _track(self, proc: LabProcess) -> None:
        """Record a process we started, in memory and in the state file."""
        self._procs.append(proc)
        if self._state is not None:
            self._state.processes.append(proc.ident)
            self._state.save()

    def up(self) -> Lab:
        """Build every node and wait until each avahi-daemon is RUNNING; LabError if not.

        On any failure everything built so far is removed before the error propagates.
        """
        reason = cleanup.unavailable_reason()
        if reason:
            raise LabError(reason)
        if self._state is not None:
            raise LabError(f"the {self.prefix} lab is already up")
        left = cleanup.find_leftovers(self.prefix, self.workdir)
        if left:
            raise LabError(
                f"an earlier {self.prefix} lab is still there ({', '.join(left)}); remove it with "
                f"`python3 -m tests.lab --prefix {self.prefix} down`"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        if any(self.workdir.iterdir()):
            raise LabError(f"lab workdir {self.workdir} is not empty; give an empty or new one")
        self._state = LabState(self.prefix, self.subnet, self.workdir, os.getpid())
        self._state.save()
        cleanup.register(self)
        try:
            netns.create_bridge(self.prefix)
            for i in range(1, self.n + 1):
                netns.create_node_network(self.prefix, i, f"{self.subnet}.{i}")
            self._start_holders()
            self._start_buses()
            self._start_avahi()
        except BaseException:
            with contextlib.suppress(LabError):
                self.down()
            raise
        return self

    def _start_holders(self) -> None:
        """Start each node's holder and wait until its namespaces are complete."""
        pipes: dict[str, subprocess.Popen[bytes]] = {}
        logs: dict[str, Path] = {}
        holders: list[ProcId] = []
        for i, hostname in enumerate(self.hostnames, start=1):
            ns, root = netns.ns_name(self.prefix, i), self.workdir / f"node{i}"
            root.mkdir()
            logs[ns] = root / "holder.log"
            with logs[ns].open("wb") as log:
                pipes[ns] = subprocess.Popen(
                    holder_argv(ns, hostname, root),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    start_new_session=True,
                )
            # ip, unshare and sh all exec: this PID becomes the holder's `sleep`
            holders.append(ProcId.of(pipes[ns].pid, f"{ns} holder"))
            self._track(LabProcess(holders[-1], pipes[ns], logs[ns]))
        read_first_lines(pipes, HOLDER_TIMEOUT, logs)
        for i, (hostname, holder) in enumerate(zip(self.hostnames, holders, strict=True), 1):
            ns = netns.ns_name(self.prefix, i)
            _check_namespaces(ns, holder.pid)
            node = Node(
                index=i,
                name=hostname,
                ns=ns,
                addr=f"{self.subnet}.{i}",
                root=self.workdir / f"node{i}",
                holder=holder,
                track=self._track,
            )
            self.nodes.append(node)
        assert self._state is not None
        self._state.nodes = [NodeRecord(n.index, n.name, n.holder) for n in self.nodes]
        self._state.save()

    def _start_buses(self) -> None:
        """Start each node's system bus and wait until all of them listen."""
        pipes = {node.ns: node.start_dbus() for node in self.nodes}
        read_first_lines(
            pipes, DBUS_TIMEOUT, {node.ns: node.root / "dbus.log" for node in self.nodes}
        )

    def _start_avahi(self) -> None:
        """Start every avahi-daemon and wait until each is RUNNING.

        Nodes sharing a hostname start one after another: started together, two avahi-daemons
        can lose every tie-break in lock-step (twin-2, twin-3, ... twin-12) for seconds. Started
        in turn, the later one simply becomes NAME-2.
        """
        waves: list[list[Node]] = []
        seen: dict[str, int] = {}
        for node in self.nodes:
            wave = seen.get(node.name, 0)
            seen[node.name] = wave + 1
            if wave == len(waves):
                waves.append([])
            waves[wave].append(node)
        for wave_nodes in waves:
            for node in wave_nodes:
                node.launch_avahi()
            wait_avahi_running(wave_nodes, AVAHI_TIMEOUT)

    def down(self) -> None:
        """Kill every lab process, delete namespaces, veths and bridge, remove the workdir.

        A no-op for a lab that is not up (it never touches a lab someone else has up);
        LabError if anything is left afterwards.
        """
        if self._downing or self._state is None:
            return
        self._downing = True
        try:
            problems = cleanup.teardown(self.prefix, self.workdir, self._procs, self.archive)
            for proc in self._procs:  # pipes of processes a test talked to
                if proc.popen is not None:
                    for pipe in (proc.popen.stdin, proc.popen.stdout):
                        if pipe is not None:
                            pipe.close()
            self._procs.clear()
            self._state = None
            cleanup.unregister(self)
            left = cleanup.find_leftovers(self.prefix, self.workdir)
            if problems or left:
                raise LabError(f"the {self.prefix} lab left: {', '.join(problems + left)}")
        finally:
            self._downing = False

    def detach(self) -> None:
        """Leave the lab running when this process exits (`down` from anywhere removes it)."""
        cleanup.unregister(self)

    @classmethod
    def attach(cls, prefix: str = "skl", workdir: Path | None = None) -> Lab:
        """A handle on the running lab with PREFIX, from its state file; LabError if none."""
        workdir = workdir or default_workdir(netns.check_prefix(prefix))
        state = load_state(workdir)
        if state is None or not state.nodes:
            raise LabError(f"no {prefix} lab is up (no state in {workdir})")
        lab = cls(
            len(state.nodes),
            prefix=state.prefix,
            subnet=state.subnet,
            workdir=state.workdir,
            hostnames=[record.name for record in state.nodes],
        )
        lab._state = state
        lab._procs = [LabProcess(ident) for ident in state.processes]
        for record in state.nodes:
            node = Node(
                index=record.index,
                name=record.name,
                ns=netns.ns_name(prefix, record.index),
                addr=f"{state.subnet}.{record.index}",
                root=state.workdir / f"node{record.index}",
                holder=record.holder,
                track=lab._track,
            )
            daemons = [p for p in lab._procs if p.ident.what == f"{node.ns} avahi-daemon"]
            if daemons:
                node.adopt_avahi(daemons[-1])
            lab.nodes.append(node)
        return lab


def _check_namespaces(ns: str, pid: int) -> None:
    """Refuse a holder that does not have its own mount and UTS namespaces and NS's network."""
    try:
        mine = {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in ("mnt", "uts")}
        theirs = {kind: os.readlink(f"/proc/{pid}/ns/{kind}") for kind in ("mnt", "uts", "net")}
        net = os.stat(f"/run/netns/{ns}").st_ino
    except OSError as exc:
        raise LabError(f"{ns}: cannot inspect holder pid {pid}: {exc}") from exc
    if (
        theirs["mnt"] == mine["mnt"]
        or theirs["uts"] == mine["uts"]
        or f"[{net}]" not in theirs["net"]
    ):
        raise LabError(f"{ns}: holder pid {pid} is not in its own namespaces; refusing to enter it")
