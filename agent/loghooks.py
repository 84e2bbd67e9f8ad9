"""Every other way text reaches stderr goes through the EventLog's redactor (DESIGN.md §A
"Observability": tokens never appear, addresses are pseudonyms).

Besides our own event lines, text reaches the journal from libraries that log through `logging`
(zeroconf, scapy, asyncio's default exception handler), from Python warnings, and from uncaught
exceptions, whose messages and quoted source lines carry whatever the failing code held (a
peer's address, the token). install() takes all of them:
- a LogRecord factory redacts each record's message, traceback and stack as the record is made,
  so a handler a library adds to its own logger prints redacted text too (scapy adds a
  StreamHandler to "scapy" at import, and its records reach stderr twice: that one, and ours);
- a handler on the root logger writes each record as one `event=library_log` line, and
  warnings are routed into logging (`py.warnings`);
- sys.excepthook, threading.excepthook, sys.unraisablehook (exceptions in finalizers) and the
  exception handler of every asyncio loop (set through the loop policy, so each asyncio.run()
  gets it) write one `event=uncaught_exception` line, the traceback escaped onto it.
The hooks are process-wide and set once; a later install() only changes the EventLog they write
through (the daemon's gains the token when the configuration is read). uninstall() is for tests.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import traceback
from types import TracebackType
from typing import Any

from agent.log import EventLog, Level

# logging's levels to ours, highest first: a record takes the first at or below its level.
_LEVELS: tuple[tuple[int, Level], ...] = (
    (logging.CRITICAL, "critical"),
    (logging.ERROR, "error"),
    (logging.WARNING, "warning"),
    (logging.INFO, "info"),
)
_HIDDEN = "<not shown: formatting the message failed>"


class _Hooks:
    """The hooks, the log they write through, and what they replaced."""

    def __init__(self, log: EventLog) -> None:
        self.log = log
        self.handler = _Handler(self)
        self.replaced = (sys.excepthook, threading.excepthook, sys.unraisablehook)
        self._make_record = logging.getLogRecordFactory()

    def install(self) -> None:
        logging.setLogRecordFactory(self.make_record)
        logging.getLogger().addHandler(self.handler)
        logging.captureWarnings(True)
        sys.excepthook, threading.excepthook = self.excepthook, self.thread_excepthook
        sys.unraisablehook = self.unraisable
        asyncio.set_event_loop_policy(_Policy(self))

    def uninstall(self) -> None:
        logging.setLogRecordFactory(self._make_record)
        logging.getLogger().removeHandler(self.handler)
        logging.captureWarnings(False)
        sys.excepthook, threading.excepthook, sys.unraisablehook = self.replaced
        asyncio.set_event_loop_policy(None)

    def make_record(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        """A LogRecord whose text is already redacted and formatted: no handler can undo it."""
        record = self._make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit: logging would print them unredacted
            message = _HIDDEN
        record.msg, record.args = self.log.redact(message), None
        if record.exc_info:
            record.exc_text = self.log.redact(_traceback(*record.exc_info))
            record.exc_info = None  # a formatter would format it again, unredacted
        if record.stack_info:
            record.stack_info = self.log.redact(record.stack_info)
        return record

    def uncaught(
        self,
        level: Level,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
        **where: object,
    ) -> None:
        """One line for an exception nothing caught."""
        self.log.event(
            "uncaught_exception", level, **where, exception=kind.__name__ if kind else None,
            error=value, traceback=_traceback(kind, value, tb),  # a broken __str__ is caught
        )  # fmt: skip

    def excepthook(
        self, kind: type[BaseException], value: BaseException, tb: TracebackType | None
    ) -> None:
        self.uncaught("critical", kind, value, tb)  # the process ends

    def thread_excepthook(self, args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:  # as the default hook: a thread's exit is no error
            return
        thread = args.thread.name if args.thread is not None else None
        self.uncaught("error", args.exc_type, args.exc_value, args.exc_traceback, thread=thread)

    def unraisable(self, args: sys.UnraisableHookArgs) -> None:
        where = {"message": args.err_msg or "Exception ignored in", "object": args.object}
        self.uncaught("error", args.exc_type, args.exc_value, args.exc_traceback, **where)

    def loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        where = {k: v for k, v in context.items() if k != "exception"}
        if exc is None:
            self.log.event("asyncio_error", "error", **where)
            return
        self.uncaught("error", type(exc), exc, exc.__traceback__, **where)


class _Handler(logging.Handler):
    """The root logger's handler: one event line per record (made redacted by the factory)."""

    def __init__(self, hooks: _Hooks) -> None:
        super().__init__()
        self._hooks = hooks

    def emit(self, record: logging.LogRecord) -> None:
        level: Level = next((ours for at, ours in _LEVELS if record.levelno >= at), "debug")
        self._hooks.log.event(
            "library_log", level, logger=record.name, message=record.getMessage().rstrip(),
            traceback=record.exc_text, stack=record.stack_info,
        )  # fmt: skip


class _Policy(asyncio.DefaultEventLoopPolicy):
    """Every new event loop reports its uncaught exceptions through the hooks."""

    def __init__(self, hooks: _Hooks) -> None:
        super().__init__()
        self._hooks = hooks

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.set_exception_handler(self._hooks.loop_exception)
        return loop


_installed: _Hooks | None = None


def install(log: EventLog) -> None:
    """Route logging, warnings and uncaught exceptions of every thread and loop through `log`."""
    global _installed  # noqa: PLW0603 (sys.excepthook and the root logger are process-wide too)
    if _installed is not None:
        _installed.log = log
        return
    _installed = _Hooks(log)
    _installed.install()


def uninstall() -> None:
    """Put back what install() replaced (tests: a hook must not outlive the test that set it)."""
    global _installed  # noqa: PLW0603
    if _installed is not None:
        _installed.uninstall()
        _installed = None


def _traceback(
    kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
) -> str:
    """The traceback as Python prints it, without the last line break."""
    return "".join(traceback.format_exception(kind, value, tb)).rstrip("\n")
