"""What keeps a node from standing for election: k3s's blocking prerequisites, on a fake root."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.verify.prereq import blocking
from tests.unit.test_verify_fakes import FakeNode


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    return FakeNode(tmp_path).healthy()


def test_a_healthy_pi_can_run_k3s(node: FakeNode) -> None:
    assert blocking(node.probe()) == ""


def test_the_cmdline_text_is_not_what_counts(node: FakeNode) -> None:
    # The flags on the command line are missing, the controller is on anyway (another kernel).
    node.write("/proc/cmdline", "console=tty1 rootwait\n")
    assert blocking(node.probe()) == ""


def test_raspberry_pi_os_default_memory_controller_off_cgroup_v2(node: FakeNode) -> None:
    node.write("/proc/cmdline", "console=tty1 cgroup_disable=memory cgroup_memory=1\n")
    node.write("/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io hugetlb pids\n")
    reason = blocking(node.probe())
    assert reason.startswith("the memory cgroup controller is off (cgroup v2)")
    assert "cgroup_enable=memory" in reason


def test_memory_controller_off_in_proc_cgroups_on_cgroup_v1(node: FakeNode) -> None:
    node.remove("/sys/fs/cgroup/cgroup.controllers")
    node.write(
        "/proc/cgroups",
        "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t2\t1\t1\nmemory\t0\t1\t0\n",
    )
    assert blocking(node.probe()).startswith("the memory cgroup controller is off (cgroup v1)")


def test_nftables_mode_without_nft_is_blocking(node: FakeNode) -> None:
    node.no_tool("nft")
    assert blocking(node.probe()) == (
        "nftables mode (10-kube-proxy.yaml) but nft not found on PATH: install nftables"
    )


def test_nftables_mode_with_a_broken_nft_is_blocking(node: FakeNode) -> None:
    node.tool("nft", "echo 'netlink: Error: cache initialization failed' >&2; exit 1")
    assert "`nft list tables` failed: netlink: Error" in blocking(node.probe())


def test_iptables_mode_is_not_judged_k3s_ships_its_own(node: FakeNode) -> None:
    node.remove("/etc/rancher/k3s/config.yaml.d/10-kube-proxy.yaml")
    node.no_tool("nft")
    assert blocking(node.probe()) == ""
    node.env["K3S_KUBE_PROXY_MODE"] = "nftables"
    assert "nft not found" in blocking(node.probe())


def test_both_problems_are_said(node: FakeNode) -> None:
    node.write("/sys/fs/cgroup/cgroup.controllers", "cpu\n")
    node.no_tool("nft")
    assert blocking(node.probe()).count(";") == 1
