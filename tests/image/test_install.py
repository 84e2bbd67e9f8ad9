"""`dpkg -i` through the pi-gen stage, then `apt-get purge`: nothing of ours is left, and the
operator's k3s configuration and state are untouched (issue 6)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.image import rootfs
from tests.image.conftest import in_root, stage_install

pytestmark = pytest.mark.image

OPERATOR = {  # k3s files an operator (or k3s itself) owns: never ours to remove
    "etc/rancher/k3s/config.yaml": "write-kubeconfig-mode: '0644'\n",
    "etc/rancher/k3s/config.yaml.d/90-operator.yaml": "node-label: [room=attic]\n",
}
RUNTIME = {  # what the agent creates while it runs
    "var/lib/sugarkube/redaction-salt": "salt\n",
    "etc/avahi/services/sugarkube.service": "<service-group/>\n",  # SUGARKUBE_MDNS_DBUS=0
    "etc/rancher/k3s/config.yaml.d/50-sugarkube.yaml": "cluster-init: true\n",
    # a copy of it a crash left behind, with the token (agent/cluster/k3s.py write_dropin)
    "etc/rancher/k3s/config.yaml.d/.50-sugarkube.yaml.0a1b2c3d.tmp": "token: secret-1234\n",
}
ENABLED = "etc/systemd/system/multi-user.target.wants/sugarkube-agent.service"


@pytest.mark.parametrize("k3s_state", [True, False], ids=["k3s-has-state", "no-k3s-state"])
def test_purge_leaves_nothing_of_ours_and_all_of_the_operators(
    image_tmp: Path, deb: Path, k3s_state: bool
) -> None:
    root = rootfs.make_root(rootfs.base_tarball(), image_tmp / "node", [], "node1")
    files = dict(OPERATOR)
    if k3s_state:
        files["var/lib/rancher/k3s/server/db/state.db"] = "etcd or sqlite\n"
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    stage_install(root)
    listed = in_root(root, "dpkg-query", "-L", "sugarkube-agent").stdout.split()
    ours = [p.lstrip("/") for p in listed if (root / p.lstrip("/")).is_file()]
    assert "usr/bin/sugarkube-agent" in ours and (root / ENABLED).is_symlink()
    for path, text in RUNTIME.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    (root / "etc/default/sugarkube-agent").write_text("SUGARKUBE_SERVERS=1\n")  # an edit

    purged = in_root(root, "apt-get", "purge", "-y", "sugarkube-agent")
    assert purged.returncode == 0, purged.stdout + purged.stderr

    left = [p for p in ours if (root / p).exists()]
    assert not left, left
    gone = ["var/lib/sugarkube", "etc/sugarkube", "etc/default/sugarkube-agent",
            "etc/avahi/services/sugarkube.service", ENABLED,
            "etc/rancher/k3s/config.yaml.d/.50-sugarkube.yaml.0a1b2c3d.tmp"]
    assert not [p for p in gone if (root / p).exists() or (root / p).is_symlink()]
    for path, text in files.items():
        assert (root / path).read_text() == text, path
    # The drop-in that says how this node joined stays while k3s has state to restart with.
    assert (root / "etc/rancher/k3s/config.yaml.d/50-sugarkube.yaml").exists() == k3s_state
    status = in_root(root, "dpkg-query", "-W", "-f", "${db:Status-Status}", "sugarkube-agent")
    assert status.stdout in ("not-installed", "")
