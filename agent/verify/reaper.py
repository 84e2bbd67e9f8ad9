"""Runs one checks.d command so that nothing it starts outlives it: `reaper.py TIMEOUT ARGV...`.

A process group is no fence: a plugin's `setsid sh -c 'sleep 60' &` starts a new session and
group, and a double fork hands the grandchild to init, so killing the plugin's group left them
running as root for ever. This wrapper makes itself a child subreaper (prctl(2)
PR_SET_CHILD_SUBREAPER): every orphan below it, whatever session it started, is re-parented to
it instead of init, so /proc still shows it below the wrapper. Once the command exits, or at
TIMEOUT seconds, the wrapper SIGKILLs every process below it until none is left, reaping them.

Its exit is the command's: the same code, or death by the same signal; at the timeout it dies
by SIGALRM, the signal of a timer that ran out, which the verifier reports as the timeout.
Standard library only, run by path with `python3 -I -S`: it must not import the agent.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time

PR_SET_DUMPABLE = 4  # linux/prctl.h
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
REAP_TIMEOUT = 5.0  # s to kill and reap what is left; only an uninterruptible sleep takes long
REAP_POLL = 0.005  # s between looks while killed processes are still dying
EXEC_FAILED = 127  # as a shell says when it cannot run a command


class _Expired(Exception):
    """The command's time ran out."""


def _expired(_signum: int, _frame: object) -> None:
    raise _Expired


def descendants(root: int) -> list[int]:
    """Every process below `root`, from each /proc/<pid>/stat's parent field."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as stat:
                # pid (comm) state ppid ...: comm may hold spaces and parentheses
                ppid = int(stat.read().rpartition(b")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def _reap() -> None:
    """Wait for every child that has ended (the orphans re-parented here included)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_descendants() -> None:
    """SIGKILL everything below this process and reap it, until /proc shows nothing below."""
    deadline = time.monotonic() + REAP_TIMEOUT
    while time.monotonic() < deadline:
        below = descendants(os.getpid())
        for pid in below:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _reap()
        if not below:
            return
        time.sleep(REAP_POLL)


def _end_like(code: int, libc: ctypes.CDLL) -> None:
    """Exit with `code` as waitstatus_to_exitcode gives it: negative means by that signal."""
    if code >= 0:
        os._exit(code)
    # SIGSEGV, SIGABRT: no core of ours. Not setrlimit: the unit's SystemCallFilter denies it.
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    with contextlib.suppress(OSError):  # SIGKILL's cannot be set, nor need it
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
    os._exit(128 - code)  # a signal whose default does not end a process


def main(argv: list[str]) -> None:
    """Run argv[2:] with the time limit argv[1] (s); end as it ended, or by SIGALRM."""
    timeout, command = float(argv[1]), argv[2:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        print(f"cannot become a child subreaper: {os.strerror(ctypes.get_errno())}",
              file=sys.stderr)
        os._exit(EXEC_FAILED)
    try:
        pid = os.posix_spawn(command[0], command, os.environ)
    except OSError as exc:
        print(f"cannot run {command[0]}: {exc.strerror or exc}", file=sys.stderr)
        os._exit(EXEC_FAILED)
    code = -signal.SIGALRM
    signal.signal(signal.SIGALRM, _expired)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        signal.setitimer(signal.ITIMER_REAL, 0)
    except _Expired:
        pass
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    kill_descendants()
    _end_like(code, libc)


if __name__ == "__main__":
    main(sys.argv)
