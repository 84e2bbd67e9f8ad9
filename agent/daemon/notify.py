"""The service manager's notify protocol (sd_notify(3)): READY, STATUS, STOPPING, WATCHDOG.

Written against NOTIFY_SOCKET directly, not with python3-sdnotify 0.3.1: that library hides every
failure behind a bare `except:` (a refused or full socket; a STATUS line outside Latin-1, its
encoding, where systemd reads UTF-8), sends with a blocking `sendall()` that can stall the event
loop when PID 1's queue is full, reads only `os.environ`, and knows nothing of WATCHDOG_USEC or
WATCHDOG_PID. What it does right, `@` for an abstract socket, is kept here.

Each message goes out on a fresh datagram socket, as libsystemd's sd_notify() does, but a
non-blocking one: no descriptor to own or close, and a message PID 1 cannot queue is dropped
and reported, never waited for.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import Awaitable, Callable, Mapping

from agent import const

ErrorHandler = Callable[[str], None]  # one line: why messages to systemd are being lost
HealthHandler = Callable[[str | None], None]  # why proofs of life fail; None once they succeed

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1: a newline would start a new field


def one_line(text: str) -> str:
    """TEXT as one STATUS value: control characters and runs of blanks become one space, capped."""
    return " ".join(_CONTROL.sub(" ", text).split())[: const.NOTIFY_STATUS_MAX]


def _socket_address(value: str) -> str | None:
    """The address NOTIFY_SOCKET names, or None unless it is a path or an `@` abstract name."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    """WATCHDOG_USEC when it is meant for this process (WATCHDOG_PID absent or ours), else None."""
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and _decimal(pid) != os.getpid():
        return None
    return _decimal(environ.get("WATCHDOG_USEC", "")) or None


def _decimal(value: str) -> int | None:
    """VALUE as a non-negative ASCII decimal integer, else None."""
    value = value.strip()
    return int(value) if re.fullmatch(r"[0-9]{1,20}", value) else None


class Notifier:
    """Messages to the service manager over NOTIFY_SOCKET; a no-op when not started by systemd.

    Sending never raises and never blocks; on_error hears, once per run of failures, that
    messages are being lost.
    """

    def __init__(
        self, environ: Mapping[str, str] | None = None, *, on_error: ErrorHandler | None = None
    ) -> None:
        env = os.environ if environ is None else environ
        self._name = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(self._name)
        self._watchdog_usec = _watchdog_usec(env) if self._address is not None else None
        self._on_error = on_error
        self._failing = False
        self._ready = False
        self._status: str | None = None
        self.enabled = self._address is not None
        if self._name and not self.enabled:
            self._report(
                f"NOTIFY_SOCKET={self._name!r} is neither a path nor an @name: "
                "systemd will not hear READY=1 or WATCHDOG=1"
            )

    def ready(self) -> None:
        """Send READY=1 once; a call after a failed send tries again."""
        if not self._ready:
            self._ready = self._send("READY=1")

    def status(self, line: str) -> None:
        """Send STATUS=<line as one line>, only when it differs from the last one sent."""
        text = one_line(line)
        if text != self._status and self._send(f"STATUS={text}"):
            self._status = text

    def stopping(self) -> None:
        """Send STOPPING=1."""
        self._send("STOPPING=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC); None when not watched."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    async def watchdog(
        self,
        prove_alive: Callable[[], Awaitable[None]],
        on_health: HealthHandler | None = None,
    ) -> None:
        """Forever, every interval: send WATCHDOG=1 only if prove_alive() completed in time.

        A proof that fails or misses its deadline sends nothing, so that systemd restarts us;
        on_health hears the reason once when proofs start failing, and None once they succeed
        again. Returns at once when systemd does not watch this process.
        """
        interval = self.watchdog_interval()
        if interval is None:
            return
        deadline = interval * const.WATCHDOG_PROOF_SHARE
        loop = asyncio.get_running_loop()
        due = loop.time()
        failing: str | None = None
        while True:
            reason = await _prove(prove_alive, deadline)
            if reason is None:
                self._send("WATCHDOG=1")
            if (reason is None) != (failing is None) and on_health is not None:
                on_health(reason)
            failing = reason
            # A round late because the loop was blocked is not made up for with a burst.
            due = max(due + interval, loop.time())
            await asyncio.sleep(due - loop.time())

    def _send(self, message: str) -> bool:
        """Queue one datagram for the manager; True if it was queued."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message.encode("utf-8", "replace"), self._address)
        except OSError as err:
            if not self._failing:
                self._failing = True
                self._report(
                    f"cannot notify systemd at {self._name}: {err.strerror or err}; "
                    "status and watchdog pings are lost until it works again"
                )
            return False
        self._failing = False
        return True

    def _report(self, line: str) -> None:
        if self._on_error is not None:
            self._on_error(line)


async def _prove(prove_alive: Callable[[], Awaitable[None]], deadline: float) -> str | None:
    """None if prove_alive() completed within deadline seconds, else why not (one line)."""
    # Not asyncio.wait_for: on 3.11 it swallows a cancellation that arrives as the awaited
    # proof completes (gh-86296), and the watchdog would outlive the daemon's shutdown.
    try:
        async with asyncio.timeout(deadline):
            await prove_alive()
    except TimeoutError:
        return f"no proof of life within {deadline:g} s (asyncio loop or GLib thread stuck)"
    except Exception as err:  # any failure is "not alive"; systemd's restart is the remedy
        return f"proof of life failed: {type(err).__name__}: {err}"
    return None
