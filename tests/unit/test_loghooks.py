"""agent.loghooks: library logs, warnings and uncaught exceptions of every kind reach the stream
only through the redactor, one event line each."""

import asyncio
import io
import logging
import sys
import threading

import pytest

from agent import loghooks
from agent.log import EventLog, Redactor

SECRET = "lab-token-0123456789"  # no k3s token shape: only the configured secret removes it
ADDRESS = "10.1.2.3"
SALT = b"s" * 16


@pytest.fixture
def out() -> io.StringIO:
    """What the installed hooks write (through a log that knows the secret)."""
    stream = io.StringIO()
    loghooks.install(EventLog(stream, Redactor(SALT, secrets=[SECRET]), journal=False))
    return stream


def assert_redacted(text: str, *, events: bool = True) -> None:
    assert text, "nothing was written"
    assert ADDRESS not in text and SECRET not in text
    assert Redactor(SALT)(ADDRESS) in text
    assert not events or all(line.startswith("event=") for line in text.splitlines())


def test_a_library_log_is_one_redacted_line(out: io.StringIO) -> None:
    try:
        raise OSError(f"connect to {ADDRESS} refused, token {SECRET}")
    except OSError:
        logging.getLogger("zeroconf").exception("peer %s lost", ADDRESS)
    text = out.getvalue()
    assert_redacted(text)
    assert len(text.splitlines()) == 1
    assert text.startswith("event=library_log logger=zeroconf message=")
    assert "traceback=\"Traceback (most recent call last):\\n" in text


def test_a_library_handler_of_its_own_prints_redacted_text_too(out: io.StringIO) -> None:
    own = io.StringIO()  # as scapy adds a StreamHandler to its "scapy" logger at import
    library = logging.getLogger("tests.loghooks.library")
    handler = logging.StreamHandler(own)
    library.addHandler(handler)
    try:
        try:
            raise ValueError(SECRET)
        except ValueError:
            library.error("no answer from %s", ADDRESS, exc_info=True, stack_info=True)
        library.warning("%s %s", "too few arguments for the format")  # logging would print args
    finally:
        library.removeHandler(handler)
    assert_redacted(own.getvalue(), events=False)  # its own format, redacted all the same
    assert "Traceback" in own.getvalue() and "Stack (most recent call last)" in own.getvalue()
    assert "formatting the message failed" in own.getvalue()
    assert_redacted(out.getvalue())


def test_sys_excepthook(out: io.StringIO) -> None:
    try:
        raise RuntimeError(f"join {ADDRESS} with {SECRET}")
    except RuntimeError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
    assert out.getvalue().startswith("event=uncaught_exception exception=RuntimeError")
    assert_redacted(out.getvalue())


def test_a_thread_that_dies(out: io.StringIO) -> None:
    def run() -> None:
        raise RuntimeError(f"join {ADDRESS} with {SECRET}")

    thread = threading.Thread(target=run, name="glib")
    thread.start()
    thread.join()
    assert "event=uncaught_exception thread=glib" in out.getvalue()
    assert_redacted(out.getvalue())


def test_an_asyncio_task_exception_nobody_retrieved(out: io.StringIO) -> None:
    async def fail() -> None:
        raise RuntimeError(f"join {ADDRESS} with {SECRET}")

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(fail())
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        del task  # never awaited: the loop's exception handler reports it when it is collected

    asyncio.run(main())
    assert "Task exception was never retrieved" in out.getvalue()
    assert_redacted(out.getvalue())


def test_install_again_only_changes_the_log(out: io.StringIO) -> None:
    later = io.StringIO()
    loghooks.install(EventLog(later, Redactor(SALT, secrets=[SECRET]), journal=False))
    logging.getLogger("zeroconf").warning("peer %s", ADDRESS)
    assert out.getvalue() == ""
    assert len(later.getvalue().splitlines()) == 1  # one root handler, not two
    assert_redacted(later.getvalue())


def test_uninstall_puts_back_what_was_there(out: io.StringIO) -> None:
    loghooks.uninstall()
    assert sys.excepthook is not None and "loghooks" not in repr(sys.excepthook)
    assert logging.getLogRecordFactory() is logging.LogRecord
    assert not any("loghooks" in repr(h) for h in logging.getLogger().handlers)
