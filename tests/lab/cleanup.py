"""Finding and removing what a lab created, and making sure an interrupted run still does."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Protocol

from tests.lab import netns
from tests.lab.errors import LabError
from tests.lab.procs import LabProcess, kill_pids, terminate
from tests.lab.state import STATE_FILE, default_workdir, load_state

LAB_TOOLS = (
    "ip",
    "nft",
    "nsenter",
    "unshare",
    "hostname",
    "dbus-daemon",
    "dbus-send",
    "avahi-daemon",
)


def unavailable_reason(tools: Iterable[str] = LAB_TOOLS) -> str | None:
    """Why the lab cannot run on this machine (not root, missing TOOLS), or None if it can."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, bridges, mounts)"
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return (
            f"the lab needs {', '.join(missing)} "
            "(apt-get install avahi-daemon avahi-utils dbus iproute2 nftables util-linux)"
        )
    return None


def _owned_workdir(prefix: str, workdir: Path) -> bool:
    """True if WORKDIR is the lab's to remove: PREFIX's default one, or one with our state file."""
    return workdir.is_dir() and (
        workdir == default_workdir(prefix) or (workdir / STATE_FILE).is_file()
    )


def find_leftovers(prefix: str = "skl", workdir: Path | None = None) -> list[str]:
    """Everything of the lab with PREFIX that exists now: namespaces, links, live PIDs, workdir."""
    netns.check_prefix(prefix)
    workdir = workdir or default_workdir(prefix)
    found = [f"netns {ns}" for ns in netns.lab_namespaces(prefix)]
    found += [f"link {link}" for link in netns.lab_links(prefix)]
    state = load_state(workdir)
    if state is not None:
        found += [f"pid {p.pid} ({p.what})" for p in state.processes if p.alive()]
    if _owned_workdir(prefix, workdir):
        found.append(f"dir {workdir}")
    return found


def teardown(
    prefix: str,
    workdir: Path,
    recorded: Iterable[LabProcess],
    archive: Path | None = None,
) -> list[str]:
    """Remove the lab with PREFIX: RECORDED processes, then anything left in its namespaces,
    the namespaces, veths, bridge and WORKDIR (its logs first copied to ARCHIVE).

    Never raises for what is already gone; returns what could not be removed.
    """
    problems = [f"pid {p.ident.pid} ({p.ident.what}) survived SIGKILL" for p in terminate(recorded)]
    namespaces = netns.lab_namespaces(prefix)
    for ns in namespaces:
        problems += [
            f"pid {pid} in {ns} survived SIGKILL" for pid in kill_pids(netns.namespace_pids(ns), ns)
        ]
    for ns in namespaces:
        netns.delete_namespace(ns)
    bridge = netns.bridge_name(prefix)
    for link in sorted(netns.lab_links(prefix), key=lambda name: name == bridge):
        netns.delete_link(link)
    if _owned_workdir(prefix, workdir):
        if archive is not None:
            _archive_logs(workdir, archive)
        shutil.rmtree(workdir, ignore_errors=True)
    return problems


def _archive_logs(workdir: Path, archive: Path) -> None:
    """Copy every *.log under WORKDIR to the same relative place under ARCHIVE."""
    for log in workdir.rglob("*.log"):
        target = archive / log.relative_to(workdir)
        target.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            shutil.copyfile(log, target)


def sweep_leftovers(prefix: str = "skl", workdir: Path | None = None) -> list[str]:
    """Remove whatever a lab with PREFIX left (even one whose process was SIGKILLed).

    Returns what was found; LabError if anything is still there afterwards.
    """
    workdir = workdir or default_workdir(prefix)
    found = find_leftovers(prefix, workdir)
    if not found:
        return []
    state = load_state(workdir)
    recorded = [LabProcess(p) for p in state.processes] if state else []
    problems = teardown(prefix, workdir, recorded)
    left = find_leftovers(prefix, workdir)
    if left or problems:
        raise LabError(f"could not remove the {prefix} lab: {', '.join(problems + left)}")
    return found


class _Downable(Protocol):
    def down(self) -> None: ...


_live: list[_Downable] = []
_installed = False


def register(lab: _Downable) -> None:
    """Take LAB down at interpreter exit or on SIGTERM/SIGINT unless it is unregistered first."""
    global _installed
    if lab not in _live:
        _live.append(lab)
    if _installed:
        return
    _installed = True
    atexit.register(_down_all)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(sig)
            if previous != signal.SIG_IGN:  # a signal ignored before (nohup, `&`) stays ignored
                signal.signal(sig, functools.partial(_on_signal, previous))


def unregister(lab: _Downable) -> None:
    """Forget LAB (it is down, or deliberately left running)."""
    with contextlib.suppress(ValueError):
        _live.remove(lab)


def _down_all() -> None:
    """Take every registered lab down, best effort."""
    for lab in list(reversed(_live)):
        with contextlib.suppress(LabError):
            lab.down()


def _on_signal(previous: object, signum: int, frame: FrameType | None) -> None:
    """Take the labs down, then let the signal do what it did before we hooked it."""
    _down_all()
    if callable(previous):
        previous(signum, frame)
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
