"""held_role: which k3s unit a member runs, from its disk alone (agent/daemon/local.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from agent import const
from agent.cluster import k3s
from agent.daemon import ballot
from agent.daemon.local import held_role
from agent.mdns.records import Role


def _touch(root: Path, relative: str, text: str = "x") -> None:
    path = root / relative.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _released(root: Path, mode: str) -> None:
    ballot.save(root, dataclasses.replace(ballot.Ballot.new(), released=mode))


def test_a_fresh_disk_holds_no_role(tmp_path: Path) -> None:
    assert held_role(tmp_path) is None


@pytest.mark.parametrize(("state", "role"), [
    (k3s.SERVER_DB + "/state.db", Role.SERVER), (k3s.AGENT_MARKER, Role.AGENT),
])  # fmt: skip
def test_k3s_state_decides(tmp_path: Path, state: str, role: Role) -> None:
    _touch(tmp_path, state)
    assert held_role(tmp_path) == role


@pytest.mark.parametrize(("mode", "role"), [
    ("cluster-init", Role.SERVER), ("single", Role.SERVER), ("join-server", Role.SERVER),
    ("join-agent", Role.AGENT),
])  # fmt: skip
def test_a_release_on_disk_decides_before_k3s_wrote_anything(
    tmp_path: Path, mode: str, role: Role
) -> None:
    _released(tmp_path, mode)
    assert held_role(tmp_path) == role
    # The marker of a later start this boot says "member", which names no role.
    _touch(tmp_path, str(const.GATE_RELEASED_MARKER), "member\n")
    assert held_role(tmp_path) == role


def test_this_boots_marker_counts_and_a_damaged_ballot_leaves_k3s_to_decide(
    tmp_path: Path,
) -> None:
    _touch(tmp_path, str(const.GATE_RELEASED_MARKER), "join-agent\n")
    assert held_role(tmp_path) == Role.AGENT
    _touch(tmp_path, str(const.BALLOT_FILE), "{not json")
    assert held_role(tmp_path) == Role.AGENT
    (tmp_path / str(const.GATE_RELEASED_MARKER).lstrip("/")).unlink()
    assert held_role(tmp_path) is None


def test_a_member_that_joined_under_other_settings_is_refused_with_both_named(
    tmp_path: Path,
) -> None:
    from agent.config import load_settings
    from agent.daemon.local import settings_refusal

    settings = load_settings(None, {"SUGARKUBE_ENV": "prod"}, root=tmp_path)
    assert settings_refusal(tmp_path, settings) == ""  # fresh: nothing joined
    ballot.save(tmp_path, dataclasses.replace(ballot.Ballot.new(), released="join-server"))
    assert settings_refusal(tmp_path, settings) == ""  # released before this was recorded
    ballot.save(tmp_path, dataclasses.replace(
        ballot.Ballot.new(), released="join-server", joined="sugar/dev/3"))
    refusal = settings_refusal(tmp_path, settings)
    assert refusal.startswith(
        "this node joined cluster=sugar env=dev servers=3, the configuration says cluster=sugar "
        "env=prod servers=3"), refusal
    assert "wipe --yes" in refusal
    same = load_settings(None, {"SUGARKUBE_ENV": "dev"}, root=tmp_path)
    assert settings_refusal(tmp_path, same) == ""
