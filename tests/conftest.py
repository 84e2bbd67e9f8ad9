"""Shared fixtures: the lab of real nodes (tests/lab/), swept before first use and checked at exit.

SUGARKUBE_LAB_PREFIX and SUGARKUBE_LAB_SUBNET choose the lab's names and addresses, so a run
never collides with a lab someone else has up under another prefix.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import loghooks
from tests.lab import Lab, LabError, find_leftovers, sweep_leftovers, unavailable_reason
from tests.lab.cleanup import LAB_TOOLS

LAB_PREFIX = os.environ.get("SUGARKUBE_LAB_PREFIX", "skl")
LAB_SUBNET = os.environ.get("SUGARKUBE_LAB_SUBNET", "10.251.0")
LAB_TEST_TOOLS = (*LAB_TOOLS, "avahi-browse", "avahi-publish")

_lab_used = pytest.StashKey[bool]()
_lab_notes = pytest.StashKey[list[str]]()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `lab`, with the reason, where the lab cannot run."""
    reason = unavailable_reason(LAB_TEST_TOOLS)
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("lab") is not None:
            item.add_marker(skip)


def _prepare_lab(config: pytest.Config) -> None:
    """Skip if the lab cannot run; on the session's first lab use, remove an earlier run's lab."""
    reason = unavailable_reason(LAB_TEST_TOOLS)
    if reason is not None:
        pytest.skip(reason)
    if config.stash.get(_lab_used, False):
        return
    config.stash[_lab_used] = True
    swept = sweep_leftovers(LAB_PREFIX)
    if swept:
        config.stash.setdefault(_lab_notes, []).append(
            f"lab: removed leftovers of an earlier {LAB_PREFIX} lab: {', '.join(swept)}"
        )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Prepare the lab before any test marked `lab` (even one that builds its own)."""
    if item.get_closest_marker("lab") is not None:
        _prepare_lab(item.config)


@pytest.fixture(autouse=True)
def _no_log_hooks_left() -> Iterator[None]:
    """cli.main() routes logging and tracebacks of the whole process through its log
    (agent/loghooks.py): undo that after each test, or every later test would inherit it."""
    yield
    loghooks.uninstall()


@pytest.fixture
def lab_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., Lab]]:
    """make(n, **Lab kwargs) -> a Lab already up; every lab made is taken down after the test.

    Node logs are archived under the test's tmp_path (printed, so a failure shows where).
    """
    _prepare_lab(request.config)
    labs: list[Lab] = []

    def make(n: int, **kwargs: Any) -> Lab:
        kwargs.setdefault("prefix", LAB_PREFIX)
        kwargs.setdefault("subnet", LAB_SUBNET)
        kwargs.setdefault("archive", tmp_path / f"lab{len(labs) + 1}-logs")
        lab = Lab(n, **kwargs)
        labs.append(lab)
        print(f"lab logs are archived at down in {kwargs['archive']}")
        return lab.up()

    yield make
    problems = []
    for lab in reversed(labs):
        try:
            lab.down()
        except LabError as exc:
            problems.append(str(exc))
    if problems:
        pytest.fail("lab teardown: " + "; ".join(problems))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a lab was used and anything of it is still there; remove it anyway."""
    config = session.config
    if not config.stash.get(_lab_used, False):
        return
    left = find_leftovers(LAB_PREFIX)
    if not left:
        return
    note = f"lab: the session left {', '.join(left)}"
    try:
        sweep_leftovers(LAB_PREFIX)
    except LabError as exc:
        note += f"; sweeping failed too: {exc}"
    else:
        note += " (now removed)"
    config.stash.setdefault(_lab_notes, []).append(note)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Show what the lab swept before or after the run."""
    for note in config.stash.get(_lab_notes, []):
        terminalreporter.write_line(note, red=True)
