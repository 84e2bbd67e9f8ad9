"""agent.daemon.release: what a release leaves on disk."""

import io
from pathlib import Path

from agent.cluster import k3s
from agent.cluster.actions import Release
from agent.config import load_settings
from agent.daemon import ballot, release
from agent.daemon.netlink import Interface
from agent.log import EventLog


def test_a_member_release_removes_a_temporary_copy_of_the_dropin(tmp_path: Path) -> None:
    # A power cut between writing the copy and renaming it, at the boot that joined; a member
    # writes no drop-in at its later boots, so nothing else would remove the token's copy.
    stale = tmp_path / k3s.DROPIN_DIR / ".50-sugarkube.yaml.0a1b2c3d.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_text("token: lab-token-0123456789\n")
    settings = load_settings(None, {"SUGARKUBE_TOKEN": "lab-token-0123456789"}, root=tmp_path)
    release.write(
        tmp_path, Release("member"), settings=settings, iface=Interface("eth0", 2, "10.0.0.2"),
        server=None, stored=ballot.Ballot.new(), damaged=False,
        log=EventLog(io.StringIO()),
    )
    assert not stale.exists()
