"""agent.daemon.release: what a release leaves on disk."""

import io
from pathlib import Path

import pytest

from agent.cluster import k3s
from agent.cluster.actions import Release
from agent.cluster.view import NodeAdvert
from agent.config import load_settings
from agent.daemon import ballot, release
from agent.daemon.netlink import Interface
from agent.log import EventLog
from agent.mdns.records import Role


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


def _released(
    tmp_path: Path, mode: str, server: tuple[str, str] | None = None
) -> dict[str, object]:
    """What k3s runs with after a release in MODE (joined to SERVER: address, CA)."""
    settings = load_settings(None, {"SUGARKUBE_TOKEN": "lab-token-0123456789"}, root=tmp_path)
    leader = None
    if server is not None:
        leader = NodeAdvert("s", "s.local", Role.SERVER, "1" * 16, server[1], server[0])
    release.write(
        tmp_path, Release(mode, leader), settings=settings,  # type: ignore[arg-type]
        iface=Interface("eth0", 2, "10.0.0.2"), server=server, stored=ballot.Ballot.new(),
        damaged=False, log=EventLog(io.StringIO()),
    )
    return k3s.merged_config(tmp_path)


@pytest.mark.parametrize("mode", ["cluster-init", "join-server"])
def test_etcd_servers_get_the_runbooks_snapshot_schedule(tmp_path: Path, mode: str) -> None:
    server = ("10.0.0.1", "c" * 64) if mode == "join-server" else None
    config = _released(tmp_path, mode, server)
    assert config["etcd-snapshot-schedule-cron"] == "0 */12 * * *"
    assert config["etcd-snapshot-retention"] == 28
    # A joiner's token is pinned to the CA its proof saw; cluster-init's stays as given.
    pinned = f"K10{'c' * 64}::server:lab-token-0123456789"
    assert config["token"] == (pinned if server else "lab-token-0123456789")


@pytest.mark.parametrize("mode", ["single", "join-agent"])
def test_no_etcd_no_snapshot_settings(tmp_path: Path, mode: str) -> None:
    server = ("10.0.0.1", "c" * 64) if mode == "join-agent" else None
    config = _released(tmp_path, mode, server)
    assert "etcd-snapshot-schedule-cron" not in config
    assert "etcd-snapshot-retention" not in config


def test_what_the_operator_set_is_left_to_the_operator(tmp_path: Path) -> None:
    theirs = tmp_path / "etc/rancher/k3s/config.yaml"
    theirs.parent.mkdir(parents=True)
    theirs.write_text("etcd-snapshot-retention: 7\n")
    config = _released(tmp_path, "cluster-init")
    assert config["etcd-snapshot-retention"] == 7  # ours writes only the schedule
    assert config["etcd-snapshot-schedule-cron"] == "0 */12 * * *"
    ours = (tmp_path / k3s.OUR_DROPIN).read_text()
    assert "etcd-snapshot-retention" not in ours
