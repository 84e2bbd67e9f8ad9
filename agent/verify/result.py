"""What a check returns: a status and a one-line detail, and how a check's failure is contained."""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from agent import const

T = TypeVar("T")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


class Status(enum.StrEnum):
    """The three outcomes the runbook documents; `skip` means the probe could not run."""

    PASS = "pass"  # noqa: S105 - a check status, not a password
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True)
class Verdict:
    """A check's outcome before it is named."""

    status: Status
    detail: str


@dataclass(frozen=True)
class CheckResult:
    """One row of the report: the check's name, its status and a one-line detail."""

    name: str
    status: Status
    detail: str


class Unavailable(Exception):
    """Raised inside a check when its probe cannot run; the check becomes a `skip`."""


class CheckFailed(Exception):
    """Raised inside a check (or by the probe) for a `fail` whose detail is the message."""


def one_line(text: str, limit: int | None = None) -> str:
    """Collapse control characters and runs of whitespace to single spaces, cut to `limit` chars."""
    cap = const.VERIFY_DETAIL_MAX if limit is None else limit
    flat = " ".join(_UNPRINTABLE.sub(" ", text).split())
    return flat if len(flat) <= cap else flat[: cap - 1] + "…"


def parsed(what: str, parser: Callable[[str], T], text: str) -> T:
    """`parser(text)`; its ValueError (parse.ParseError) becomes a fail that names `what`."""
    try:
        return parser(text)
    except ValueError as exc:
        raise CheckFailed(f"unexpected content in {what}: {exc}") from exc


def passed(detail: str) -> Verdict:
    """A `pass` with its detail."""
    return Verdict(Status.PASS, detail)


def failed(detail: str) -> Verdict:
    """A `fail` with its detail (what is wrong and, where known, the fix)."""
    return Verdict(Status.FAIL, detail)


def skipped(detail: str) -> Verdict:
    """A `skip` with the reason the probe could not run."""
    return Verdict(Status.SKIP, detail)


def contain(name: str, check: Callable[[], Verdict]) -> CheckResult:
    """Run `check`; `Unavailable` becomes a skip, any other exception a fail naming it."""
    try:
        verdict = check()
    except Unavailable as exc:
        verdict = skipped(str(exc))
    except CheckFailed as exc:
        verdict = failed(str(exc))
    except Exception as exc:  # one broken check must never stop the verifier
        verdict = failed(f"check crashed: {type(exc).__name__}: {exc}")
    return CheckResult(name, verdict.status, one_line(verdict.detail) or verdict.status.value)


def overall(results: list[CheckResult]) -> Status:
    """`fail` when any check failed, else `pass` (skips do not fail a node)."""
    return Status.FAIL if any(r.status is Status.FAIL for r in results) else Status.PASS
