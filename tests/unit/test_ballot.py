"""The ballot on disk: a promise survives restarts; a damaged file never turns into a fresh one."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from agent import const
from agent.daemon import ballot
from agent.daemon.ballot import Ballot, BallotError


def test_a_node_without_a_ballot_has_none(tmp_path: Path) -> None:
    assert ballot.load(tmp_path) is None
    assert ballot.remove(tmp_path) is False


def test_saved_then_loaded_whole(tmp_path: Path) -> None:
    stored = Ballot("00112233445566aa", bound="ffeeddccbbaa9988", bound_host="node2.local",
                    released="join-server")
    ballot.save(tmp_path, stored)
    assert ballot.load(tmp_path) == stored
    file = tmp_path / str(const.BALLOT_FILE).lstrip("/")
    assert stat.S_IMODE(file.stat().st_mode) == 0o644
    assert [p.name for p in file.parent.iterdir()] == [file.name]  # no temporary copy left
    assert ballot.remove(tmp_path) is True
    assert ballot.load(tmp_path) is None


def test_new_ballots_have_fresh_16_hex_digit_keys() -> None:
    keys = {Ballot.new().key for _ in range(20)}
    assert len(keys) == 20 and all(len(k) == 16 and int(k, 16) >= 0 for k in keys)


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"{",
        b"[]",
        b'{"key": "xyz"}',
        b'{"key": "00112233445566aa", "bound": "nothex"}',
        b'{"key": "00112233445566aa", "released": "cluster-init; rm -rf /"}',
        b'{"key": "00112233445566aa", "extra": 1}',
        b"\xff\xfe" * 10,
        b'{"key": "00112233445566aa"}' + b" " * 5000,
    ],
)
def test_a_damaged_ballot_is_an_error_naming_the_file_and_the_way_out(
    tmp_path: Path, content: bytes
) -> None:
    file = tmp_path / str(const.BALLOT_FILE).lstrip("/")
    file.parent.mkdir(parents=True)
    file.write_bytes(content)
    with pytest.raises(BallotError) as caught:
        ballot.load(tmp_path)
    message = str(caught.value)
    assert str(file) in message and "wipe --yes" in message and "\n" not in message
    assert file.read_bytes() == content  # nothing lost


def test_an_unwritable_state_dir_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "var").write_text("a file where the directory should be")
    with pytest.raises(BallotError, match="cannot write"):
        ballot.save(tmp_path, Ballot.new())


def test_the_file_is_json_an_operator_can_read(tmp_path: Path) -> None:
    ballot.save(tmp_path, Ballot("00112233445566aa"))
    raw = json.loads((tmp_path / str(const.BALLOT_FILE).lstrip("/")).read_text())
    assert raw == {"key": "00112233445566aa", "bound": "", "bound_host": "", "released": "",
                   "joined": "", "address": "", "starts": "0"}  # fmt: skip


def test_what_a_member_joined_under_round_trips_and_a_damaged_record_is_refused(
    tmp_path: Path,
) -> None:
    record = Ballot("00112233445566aa", released="join-server", joined="sugar/dev/3",
                    address="fe80::1%eth0")  # fmt: skip
    ballot.save(tmp_path, record)
    assert ballot.load(tmp_path) == record
    file = tmp_path / str(const.BALLOT_FILE).lstrip("/")
    for field, bad in (("joined", "sugar/dev"), ("address", "not-an-ip")):
        raw = json.loads(file.read_text())
        raw[field] = bad
        file.write_text(json.dumps(raw))
        with pytest.raises(BallotError, match="damaged"):
            ballot.load(tmp_path)
