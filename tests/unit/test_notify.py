"""The notify protocol against a NOTIFY_SOCKET the test owns (a path and an abstract name)."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import const
from agent.daemon.notify import Notifier, one_line

WATCHDOG_USEC = "200000"  # 200 ms: pings every 100 ms, proofs get 50 ms
INTERVAL = 0.1


class Manager:
    """The service manager's end: a bound datagram socket that collects what it is sent."""

    def __init__(self, address: str, name: str) -> None:
        self.name = name  # as NOTIFY_SOCKET spells it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)

    def received(self) -> list[str]:
        """Every datagram queued so far, in order."""
        messages = []
        while True:
            try:
                messages.append(self.sock.recv(8192).decode())
            except BlockingIOError:
                return messages

    def env(self, **extra: str) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.name, **extra}

    async def collect(self, seconds: float) -> list[tuple[float, str]]:
        """(loop time, message) of every datagram that arrives within SECONDS."""
        loop = asyncio.get_running_loop()
        got: list[tuple[float, str]] = []
        end = loop.time() + seconds
        while (left := end - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 8192), left)
            except TimeoutError:
                break
            got.append((loop.time(), data.decode()))
        return got


@pytest.fixture(params=["path", "abstract"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Manager]:
    if request.param == "path":
        path = str(tmp_path / "notify")
        mgr = Manager(path, path)
    else:
        name = f"sugarkube-test-notify-{os.getpid()}-{time.monotonic_ns()}"
        mgr = Manager("\0" + name, "@" + name)
    yield mgr
    mgr.sock.close()


def run_watchdog(
    notifier: Notifier,
    manager: Manager,
    prove_alive: Callable[[], Awaitable[None]],
    seconds: float,
    health: list[str | None] | None = None,
) -> list[tuple[float, str]]:
    """Run notifier.watchdog for SECONDS; the WATCHDOG=1 datagrams with their arrival times."""

    async def main() -> list[tuple[float, str]]:
        dog = asyncio.create_task(
            notifier.watchdog(prove_alive, None if health is None else health.append)
        )
        got = await manager.collect(seconds)
        dog.cancel()
        await asyncio.wait([dog], timeout=2.0)
        assert dog.done(), "the watchdog did not stop when cancelled"
        if not dog.cancelled():
            dog.result()  # returned (not watched) or raised: raise it here
        return got

    return asyncio.run(main())


async def alive() -> None:
    await asyncio.sleep(0)


async def hang() -> None:
    await asyncio.Event().wait()


# -- READY, STATUS, STOPPING ---------------------------------------------------------------


def test_lifecycle_messages_arrive_in_order(manager: Manager) -> None:
    notifier = Notifier(manager.env())
    assert notifier.enabled
    notifier.ready()
    notifier.status("waiting: absence 1/2 for _k3s-sugar-dev._tcp")
    notifier.ready()
    notifier.status("joined https://node1.local:6443")
    notifier.stopping()
    assert manager.received() == [
        "READY=1",
        "STATUS=waiting: absence 1/2 for _k3s-sugar-dev._tcp",
        "STATUS=joined https://node1.local:6443",
        "STOPPING=1",
    ]


def test_status_is_sent_only_when_it_changes(manager: Manager) -> None:
    notifier = Notifier(manager.env())
    notifier.status("waiting for 2 more nodes")
    notifier.status("waiting for 2 more nodes")
    notifier.status("  waiting for 2\tmore nodes\n")  # the same line once made one line
    notifier.status("waiting for 1 more node")
    notifier.status("waiting for 2 more nodes")
    assert manager.received() == [
        "STATUS=waiting for 2 more nodes",
        "STATUS=waiting for 1 more node",
        "STATUS=waiting for 2 more nodes",
    ]


def test_status_cannot_smuggle_another_field(manager: Manager) -> None:
    notifier = Notifier(manager.env())
    notifier.status("avahi-daemon unavailable,\nREADY=1\r\nWATCHDOG=trigger\x00, retrying")
    assert manager.received() == [
        "STATUS=avahi-daemon unavailable, READY=1 WATCHDOG=trigger , retrying"
    ]


def test_long_status_is_capped_to_fit_one_datagram(manager: Manager) -> None:
    notifier = Notifier(manager.env())
    notifier.status("é" * 10_000)  # two UTF-8 bytes each
    (message,) = manager.received()
    assert message == "STATUS=" + "é" * const.NOTIFY_STATUS_MAX
    assert len(message.encode()) < 4096  # systemd drops a longer datagram (PIPE_BUF)


@given(st.text())
def test_one_line_is_one_printable_line(text: str) -> None:
    line = one_line(text)
    assert len(line) <= const.NOTIFY_STATUS_MAX
    assert line == line.strip()
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in line)
    assert len(line.splitlines()) <= 1
    if text.isprintable() and " ".join(text.split()) == text:
        assert line == text[: const.NOTIFY_STATUS_MAX]


def test_status_with_unencodable_text_still_goes_out(manager: Manager) -> None:
    notifier = Notifier(manager.env())
    notifier.status("host \udcff-name")  # a lone surrogate, as os.fsdecode() makes of bad bytes
    assert manager.received() == ["STATUS=host ?-name"]


# -- without systemd, and when sending fails -------------------------------------------------


def test_without_notify_socket_everything_is_a_quiet_no_op() -> None:
    errors: list[str] = []
    notifier = Notifier({}, on_error=errors.append)
    assert not notifier.enabled
    notifier.ready()
    notifier.status("x")
    notifier.stopping()
    assert notifier.watchdog_interval() is None
    asyncio.run(asyncio.wait_for(notifier.watchdog(hang), 1.0))  # returns at once
    assert errors == []


@pytest.mark.parametrize("value", ["relative/notify", "@", "vsock:2:1234"])
def test_unusable_notify_socket_is_reported_once_and_disables(value: str) -> None:
    errors: list[str] = []
    environ = {"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "1000000"}
    notifier = Notifier(environ, on_error=errors.append)
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    notifier.ready()
    assert len(errors) == 1
    assert repr(value) in errors[0]


def test_send_failures_never_raise_and_are_reported_once_per_run(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    errors: list[str] = []
    notifier = Notifier({"NOTIFY_SOCKET": path}, on_error=errors.append)
    notifier.ready()  # nobody listens yet
    notifier.status("one")
    notifier.stopping()
    assert len(errors) == 1
    assert path in errors[0]
    manager = Manager(path, path)
    try:
        notifier.ready()  # not sent before, so sent now
        notifier.status("one")  # not sent before, so sent now
        assert manager.received() == ["READY=1", "STATUS=one"]
        assert len(errors) == 1
    finally:
        manager.sock.close()
    os.unlink(path)
    notifier.status("two")
    assert len(errors) == 2


def test_a_full_manager_queue_never_blocks_the_sender(manager: Manager) -> None:
    errors: list[str] = []
    notifier = Notifier(manager.env(), on_error=errors.append)
    started = time.monotonic()
    for n in range(5000):  # far beyond net.unix.max_dgram_qlen (512 by default)
        notifier.status(f"phase {n}")
    assert time.monotonic() - started < 5.0
    assert len(errors) == 1
    assert "unavailable" in errors[0]  # EAGAIN: dropped, not waited for
    assert manager.received()[0] == "STATUS=phase 0"


# -- the watchdog ---------------------------------------------------------------------------


def test_watchdog_interval_is_half_of_watchdog_usec(manager: Manager) -> None:
    assert Notifier(manager.env(WATCHDOG_USEC=WATCHDOG_USEC)).watchdog_interval() == INTERVAL
    mine = manager.env(WATCHDOG_USEC="30000000", WATCHDOG_PID=str(os.getpid()))
    assert Notifier(mine).watchdog_interval() == 15.0


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-200000"},
        {"WATCHDOG_USEC": "2e5"},
        {"WATCHDOG_USEC": "²"},
        {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"},
        {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "not-a-pid"},
    ],
)
def test_no_watchdog_unless_watchdog_usec_is_for_this_process(
    manager: Manager, extra: dict[str, str]
) -> None:
    notifier = Notifier(manager.env(**extra))
    assert notifier.watchdog_interval() is None
    assert run_watchdog(notifier, manager, alive, 0.3) == []


def test_watchdog_pings_at_half_of_watchdog_usec(manager: Manager) -> None:
    notifier = Notifier(manager.env(WATCHDOG_USEC=WATCHDOG_USEC, WATCHDOG_PID=str(os.getpid())))
    health: list[str | None] = []
    got = run_watchdog(notifier, manager, alive, 1.05, health)
    assert {message for _, message in got} == {"WATCHDOG=1"}
    assert 9 <= len(got) <= 12  # at 0, 0.1, ... 1.0 s
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(got)]
    assert 0.09 <= statistics.median(gaps) <= 0.12
    assert max(gaps) < 0.75 * 0.2  # well inside systemd's deadline
    assert health == []


def test_watchdog_sends_nothing_while_the_proof_hangs(manager: Manager) -> None:
    notifier = Notifier(manager.env(WATCHDOG_USEC=WATCHDOG_USEC))
    health: list[str | None] = []
    assert run_watchdog(notifier, manager, hang, 0.6, health) == []
    assert len(health) == 1  # said once, not every round
    assert health[0] is not None
    assert "no proof of life within 0.05 s" in health[0]


def test_watchdog_resumes_once_proofs_complete_again(manager: Manager) -> None:
    notifier = Notifier(manager.env(WATCHDOG_USEC=WATCHDOG_USEC))
    health: list[str | None] = []
    stuck_until = time.monotonic() + 0.45

    async def stuck_then_alive() -> None:
        if time.monotonic() < stuck_until:
            await hang()

    got = run_watchdog(notifier, manager, stuck_then_alive, 0.9, health)
    # asyncio's loop.time() is time.monotonic(): no ping arrived during the stall.
    assert got[0][0] >= stuck_until
    assert got[0][0] - stuck_until <= 0.15  # the first round after it
    assert 3 <= len(got) <= 6  # ~0.45 s of pings every 0.1 s
    assert len(health) == 2
    assert health[0] is not None
    assert health[1] is None


def test_a_failing_proof_sends_nothing_and_says_why(manager: Manager) -> None:
    notifier = Notifier(manager.env(WATCHDOG_USEC=WATCHDOG_USEC))
    health: list[str | None] = []

    async def broken() -> None:
        raise RuntimeError("GLib main loop has quit")

    assert run_watchdog(notifier, manager, broken, 0.35, health) == []
    assert health == ["proof of life failed: RuntimeError: GLib main loop has quit"]


def test_watchdog_cancellation_is_not_swallowed(manager: Manager) -> None:
    notifier = Notifier(manager.env(WATCHDOG_USEC=WATCHDOG_USEC))

    async def main() -> bool:
        task = asyncio.create_task(notifier.watchdog(hang))
        await asyncio.sleep(0.02)  # inside a proof
        task.cancel()
        await asyncio.wait([task], timeout=1.0)
        return task.cancelled()

    assert asyncio.run(main())


def test_cancellation_as_a_proof_completes_still_stops_the_watchdog(manager: Manager) -> None:
    # The shutdown race that asyncio.wait_for loses on Python 3.11 (gh-86296): the cancel
    # lands as the proof completes; a swallowed cancel would keep serve() from ever exiting.
    notifier = Notifier(manager.env(WATCHDOG_USEC=WATCHDOG_USEC))

    async def main() -> bool:
        async def cancel_me_then_complete() -> None:
            task.cancel()

        task = asyncio.create_task(notifier.watchdog(cancel_me_then_complete))
        await asyncio.wait([task], timeout=1.0)
        return task.cancelled()

    assert asyncio.run(main())
