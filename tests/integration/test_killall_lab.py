"""k3s-killall.sh's work inside a lab node: its links and mounts, never the host's.

A node gets what a k3s node's CNI leaves: a `cni0` bridge with a pod's veth enslaved, a
`flannel.1` VXLAN link and a kubelet pod's tmpfs mount; `wipe`'s killall work removes them and
nothing else (eth0, an operator's bridge, mounts elsewhere stay).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.helpers import PYTHON, node_env

pytestmark = pytest.mark.lab

POD_VOLUME = "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/cache"


def links(node: Any) -> set[str]:
    done = node.run("ip", "-o", "link", "show", check=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in done.splitlines()}


def test_killall_deletes_cni_links_and_unmounts_kubelet_mounts_in_the_node(lab_factory) -> None:
    node = lab_factory(1).node(1)
    node.run("sh", "-c", " && ".join([
        "ip link add cni0 type bridge",
        "ip link add veth1a2b type veth peer name eth0pod",
        "ip link set veth1a2b master cni0",
        "ip link add flannel.1 type vxlan id 1 dstport 8472",  # flannel's VXLAN (no dummy here)
        "ip link add operator0 type bridge",
        f"mkdir -p {POD_VOLUME} && mount -t tmpfs tmpfs {POD_VOLUME}",
        "mkdir -p /var/lib/cni/networks/cbr0 && touch /var/lib/cni/networks/cbr0/10.42.0.5",
    ]), check=True)
    assert {"cni0", "veth1a2b", "eth0pod", "flannel.1"} <= links(node)
    script = (
        "from agent import killall; "
        "print(killall.unmount_all(__import__('pathlib').Path('/'))); "
        "print(killall.delete_links())"
    )
    done = node.run(PYTHON, "-c", script, env=node_env(), check=True)
    assert done.stdout.splitlines() == [
        "mounts: unmounted 1", "links: deleted veth1a2b, cni0, flannel.1",
    ], done.stdout + done.stderr
    left = links(node)
    assert not {"cni0", "veth1a2b", "eth0pod", "flannel.1"} & left
    assert {"lo", "eth0", "operator0"} <= left
    mounts = node.run("cat", "/proc/self/mountinfo", check=True).stdout
    assert "/var/lib/kubelet/pods" not in mounts
    assert not node.path("/var/lib/cni/networks").exists()
