"""A fake node for the verifier tests: a root tree (/proc, /sys, /etc, /run) and a bin dir of tools.

`FakeNode.healthy()` builds a Raspberry Pi 5 on NVMe where every built-in check passes; tests
then break one thing at a time. Tool scripts see only the fake bin dir on PATH, so they call
system programs by absolute path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from agent import const
from agent.verify.probe import Probe

HOST = "node1"
ADDRESS = "192.168.50.11"
PI_CMDLINE = (
    "console=serial0,115200 console=tty1 root=PARTUUID=4e639091-02 rootfstype=ext4 "
    "fsck.repair=yes rootwait cgroup_memory=1 cgroup_enable=memory\n"
)
FIB_TRIE = f"""Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.1
           /32 host LOCAL
     +-- 192.168.50.0/24 2 0 2
        |-- 192.168.50.0
           /24 link UNICAST
        |-- {ADDRESS}
           /32 host LOCAL
        |-- 192.168.50.255
           /32 link BROADCAST
"""
MOUNTINFO = """22 1 259:2 / / rw,noatime shared:1 - ext4 /dev/nvme0n1p2 rw
23 22 0:21 / /proc rw,relatime shared:12 - proc proc rw
24 22 259:1 / /boot/firmware rw,relatime shared:2 - vfat /dev/nvme0n1p1 rw,fmask=0022
"""
DROPIN = "kube-proxy-arg:\n  - proxy-mode=nftables\n"
BROWSE_LINE = (
    f"=;eth0;IPv4;k3s-sugar-dev@{HOST}\\.local\\032\\040server\\041;_https._tcp;local;"
    f'{HOST}.local;{ADDRESS};6443;"k3s=1" "cluster=sugar" "env=dev" "role=server"'
)


def nodes_json(*nodes: tuple[str, str | None]) -> str:
    """`kubectl get nodes -o json` for (name, Ready status or None for no Ready condition)."""
    items = []
    for name, ready in nodes:
        conditions = [{"type": "MemoryPressure", "status": "False"}]
        if ready is not None:
            conditions.append({"type": "Ready", "status": ready})
        items.append({"metadata": {"name": name}, "status": {"conditions": conditions}})
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


class FakeNode:
    """A root tree and a bin dir that a Probe reads instead of the machine."""

    def __init__(self, base: Path) -> None:
        self.root = base / "root"
        self.bin = base / "bin"
        self.root.mkdir(parents=True)
        self.bin.mkdir(parents=True)
        self.env: dict[str, str] = {}

    def write(self, path: str, content: str | bytes) -> Path:
        """Create the file `path` under the root with `content`."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
        return target

    def remove(self, path: str) -> None:
        """Delete the file `path` under the root."""
        (self.root / path.lstrip("/")).unlink()

    def unreadable(self, path: str) -> None:
        """Make `path` exist but fail to read (a symlink loop: root ignores permission bits)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(target.name)

    def tool(self, name: str, body: str) -> Path:
        """Install an executable shell script `name` whose body is `body`."""
        script = self.bin / name
        script.write_text("#!/bin/sh\n" + body + "\n")
        script.chmod(0o755)
        return script

    def no_tool(self, name: str) -> None:
        """Remove the tool `name` from the bin dir."""
        (self.bin / name).unlink(missing_ok=True)

    def probe(self, **overrides: object) -> Probe:
        """A Probe over this fake node."""
        kwargs: dict[str, object] = {"root": self.root, "path": str(self.bin), "env": self.env}
        kwargs.update(overrides)
        return Probe(**kwargs)  # type: ignore[arg-type]

    def healthy(self) -> FakeNode:
        """A Raspberry Pi 5 on NVMe, k3s Ready, Avahi running and advertising: all checks pass."""
        self.write("/proc/cmdline", PI_CMDLINE)
        self.write("/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io memory hugetlb pids\n")
        self.write("/proc/sys/kernel/hostname", HOST + "\n")
        self.write("/proc/sys/kernel/ostype", "Linux\n")
        self.write("/proc/sys/kernel/osrelease", "6.6.51+rpt-rpi-2712\n")
        self.write("/proc/device-tree/model", b"Raspberry Pi 5 Model B Rev 1.0\x00")
        self.write("/run/systemd/timesync/synchronized", "")
        self.write("/etc/rancher/k3s/config.yaml.d/10-kube-proxy.yaml", DROPIN)
        self.write("/etc/rancher/k3s/k3s.yaml", "apiVersion: v1\nkind: Config\n")
        self.write(str(const.CONTROL_SOCKET), "")  # the daemon runs (a file stands for its socket)
        self.write("/proc/swaps", "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n")
        self.write("/proc/sys/net/ipv4/ip_forward", "1\n")
        self.write("/proc/self/mountinfo", MOUNTINFO)
        self.write("/proc/net/fib_trie", FIB_TRIE)
        self.write("/proc/net/if_inet6", "fe80000000000000d2c0fffe00000011 02 40 20 80     eth0\n")
        self.tool("cloud-init", 'echo "status: done"')
        self.tool("timedatectl", "echo yes")
        self.tool("nft", '[ "$1 $2" = "list tables" ] && echo "table inet filter"')
        self.tool("k3s", 'echo "- CONFIG_NAMESPACES: enabled"; echo "STATUS: pass"')
        self.tool(
            "kubectl", f"/bin/cat <<'EOF'\n{nodes_json((HOST, 'True'), ('node2', 'True'))}\nEOF"
        )
        self.tool(
            "dbus-send",
            'echo "method return time=1.0 sender=:1.3 -> destination=:1.9"; echo "   int32 2"',
        )
        self.tool(
            "avahi-browse", f"/bin/cat <<'EOF'\n+;eth0;IPv4;x;_https._tcp;local\n{BROWSE_LINE}\nEOF"
        )
        self.tool(
            "avahi-resolve",
            f'if [ "$1" = -n ]; then printf "%s\\t%s\\n" "$2" {ADDRESS}; '
            f'else printf "%s\\t%s\\n" "$2" {HOST}.local; fi',
        )
        return self


def shrink_timeouts(monkeypatch: pytest.MonkeyPatch, seconds: float = 0.5) -> None:
    """Shrink every verifier deadline so hanging tools cost a fraction of a second."""
    for name in (
        "VERIFY_COMMAND_TIMEOUT",
        "VERIFY_KUBECTL_TIMEOUT",
        "VERIFY_CHECK_CONFIG_TIMEOUT",
        "VERIFY_AVAHI_TIMEOUT",
        "VERIFY_KILL_GRACE",
    ):
        monkeypatch.setattr(const, name, seconds)


def test_the_healthy_fake_node_is_a_pi_on_nvme(tmp_path: Path) -> None:
    """The fake itself: files and tools where the checks look for them."""
    node = FakeNode(tmp_path).healthy()
    assert (node.root / "proc/cmdline").read_text() == PI_CMDLINE
    assert os.access(node.bin / "kubectl", os.X_OK)
    assert node.probe().host() == HOST
