"""The browser never leaves a peer unresolved for good: a failed resolver creation (a busy
daemon's timeout, its object limit) is retried with backoff (fake bus at the D-Bus seam)."""

from __future__ import annotations

import asyncio
import io
import warnings
from typing import Any

from agent import const
from agent.avahi import defs
from agent.log import EventLog

with warnings.catch_warnings():  # gi's importer warns under Python 3.11; not ours to fix
    warnings.simplefilter("ignore", ImportWarning)
    from agent.avahi.browser import Browser
    from agent.avahi.bus import AvahiError

ITEM = (2, 0, "k3s-sugar-dev@node1.local (server)", "_k3s-sugar-dev._tcp", "local")


class FakeBus:
    """Creates objects; the first `failures` resolver creations time out."""

    def __init__(self, failures: int) -> None:
        self.state = defs.ServerState.RUNNING
        self.failures = failures
        self.created: list[str] = []
        self.freed: list[str] = []
        self.handlers: dict[str, Any] = {}

    def on_presence(self, _handler: Any) -> Any:
        return lambda: None

    def register(self, path: str, handler: Any) -> None:
        self.handlers[path] = handler

    def unregister(self, path: str) -> None:
        self.handlers.pop(path, None)

    async def call(self, path: str, interface: str, method: str, *_args: Any) -> tuple[Any, ...]:
        if method == "Free":
            self.freed.append(path)
            return ()
        if method == "ServiceResolverPrepare" and self.failures:
            self.failures -= 1
            raise AvahiError("ServiceResolverPrepare: no reply in time", defs.ERR_NO_REPLY)
        if method.endswith("Prepare"):
            path = f"/obj{len(self.created)}"
            self.created.append(method)
            return (path,)
        return ()


def test_a_resolver_that_failed_is_created_again_with_backoff(monkeypatch: Any) -> None:
    monkeypatch.setattr(const, "AVAHI_RECONNECT_DELAY", 0.01)

    log = io.StringIO()

    async def scenario() -> FakeBus:
        bus = FakeBus(failures=2)
        async with Browser(bus, ITEM[3], EventLog(log)):  # type: ignore[arg-type]
            bus.handlers["/obj0"]("ItemNew", (*ITEM, 0))  # the service browser's first item
            for _ in range(100):
                await asyncio.sleep(0.01)
                if "RecordBrowserPrepare" in bus.created:
                    break
        return bus

    bus = asyncio.run(scenario())
    assert bus.created == ["ServiceBrowserPrepare", "ServiceResolverPrepare",
                           "RecordBrowserPrepare"]  # after two failed attempts
    assert log.getvalue().count("event=resolve_failed") == 2
