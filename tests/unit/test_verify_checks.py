"""The node checks against a fake root and fake tools: pass, fail and skip paths, garbage input."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent import const
from agent.verify import checks, mdns
from agent.verify.result import CheckResult, Status, Verdict, contain
from tests.unit.test_verify_fakes import HOST, FakeNode, nodes_json, shrink_timeouts


@pytest.fixture
def node(tmp_path: Path) -> FakeNode:
    """A healthy fake node."""
    return FakeNode(tmp_path).healthy()


def check(node: FakeNode, name: str) -> CheckResult:
    """Run one built-in check by name, contained as the verifier runs it."""
    function = dict(checks.BUILTIN_CHECKS)[name]
    probe = node.probe()
    return contain(name, lambda: function(probe))


def test_every_check_passes_on_a_healthy_node(node: FakeNode) -> None:
    results = checks.run_checks(node.probe())
    assert [(r.name, r.status) for r in results] == [
        (name, Status.PASS) for name, _ in checks.BUILTIN_CHECKS
    ], [r for r in results if r.status is not Status.PASS]
    assert all(r.detail and "\n" not in r.detail for r in results)


def test_checks_keep_the_runbook_order(node: FakeNode) -> None:
    names = [r.name for r in checks.run_checks(node.probe())]
    assert names[:6] == [
        "cgroup_memory",
        "cloud_init",
        "time_sync",
        "kube_proxy_dataplane",
        "k3s_check_config",
        "k3s_node_ready",
    ]
    assert names[6:] == [
        "avahi_dbus",
        "mdns_advertised",
        "hostname_unique",
        "swap_off",
        "ip_forward",
        "boot_media",
        "single_cluster",
    ]


# cgroup_memory


def test_cgroup_memory_fails_with_the_exact_cmdline_fix(node: FakeNode) -> None:
    node.write("/proc/cmdline", "console=serial0,115200 root=PARTUUID=4e639091-02 rootwait\n")
    node.write("/boot/firmware/cmdline.txt", "console=serial0,115200 rootwait\n")
    result = check(node, "cgroup_memory")
    assert result.status is Status.FAIL
    assert "lacks cgroup_memory=1 cgroup_enable=memory" in result.detail
    assert (
        "sudo sed -i '1 s/$/ cgroup_memory=1 cgroup_enable=memory/' /boot/firmware/cmdline.txt"
        in result.detail
    )


def test_cgroup_memory_names_only_the_missing_flag_and_the_old_boot_path(node: FakeNode) -> None:
    node.write("/proc/cmdline", "console=tty1 cgroup_enable=memory\n")
    node.write("/boot/cmdline.txt", "console=tty1 cgroup_enable=memory\n")
    result = check(node, "cgroup_memory")
    assert result.status is Status.FAIL
    assert "sudo sed -i '1 s/$/ cgroup_memory=1/' /boot/cmdline.txt && sudo reboot" in result.detail


def test_cgroup_memory_says_reboot_when_cmdline_txt_already_has_the_flags(node: FakeNode) -> None:
    node.write("/proc/cmdline", "console=tty1 rootwait\n")
    node.write("/boot/firmware/cmdline.txt", "console=tty1 cgroup_memory=1 cgroup_enable=memory\n")
    result = check(node, "cgroup_memory")
    assert result.status is Status.FAIL
    assert result.detail.endswith("/boot/firmware/cmdline.txt already has them: reboot")


@pytest.mark.parametrize(
    "cmdline",
    [
        "console=serial0,115200 cgroup_mem",  # truncated mid-flag
        "",
        "\x00\xff\xfe garbage \x1b[31m",
        "cgroup_memory=1cgroup_enable=memory",  # no space between the flags
    ],
)
def test_cgroup_memory_fails_on_a_truncated_or_garbage_cmdline(
    node: FakeNode, cmdline: str
) -> None:
    node.write("/proc/cmdline", cmdline.encode("utf-8", "surrogateescape"))
    result = check(node, "cgroup_memory")
    assert result.status is Status.FAIL
    assert "fix:" in result.detail


def test_cgroup_memory_fails_when_the_controller_is_off(node: FakeNode) -> None:
    node.write("/sys/fs/cgroup/cgroup.controllers", "cpuset cpu io pids\n")
    result = check(node, "cgroup_memory")
    assert result.status is Status.FAIL
    assert "memory controller not enabled (cgroup v2)" in result.detail


@pytest.mark.parametrize(("enabled", "status"), [("1", Status.PASS), ("0", Status.FAIL)])
def test_cgroup_memory_reads_proc_cgroups_on_cgroup_v1(
    node: FakeNode, enabled: str, status: Status
) -> None:
    node.remove("/sys/fs/cgroup/cgroup.controllers")
    node.write(
        "/proc/cgroups",
        f"#subsys_name\thierarchy\tnum_cgroups\tenabled\nmemory\t4\t40\t{enabled}\n",
    )
    assert check(node, "cgroup_memory").status is status


def test_cgroup_memory_skips_when_cmdline_is_unreadable(node: FakeNode) -> None:
    node.unreadable("/proc/cmdline")
    result = check(node, "cgroup_memory")
    assert result.status is Status.SKIP
    assert "cannot read /proc/cmdline" in result.detail


def test_cgroup_memory_skips_without_any_cgroup_file(node: FakeNode) -> None:
    node.remove("/sys/fs/cgroup/cgroup.controllers")
    assert check(node, "cgroup_memory").status is Status.SKIP


# cloud_init


@pytest.mark.parametrize(
    ("script", "status", "words"),
    [
        ('echo "status: done"', Status.PASS, "cloud-init done"),
        ('echo "status: done"; exit 2', Status.PASS, "recoverable errors"),
        ('echo "status: running"; exit 0', Status.FAIL, "cloud-init is running"),
        ('echo "status: error"; exit 1', Status.FAIL, "'error'"),
        ('echo "status: disabled"', Status.SKIP, "disabled"),
        ("echo '\x01\x02 not yaml {{'; exit 0", Status.FAIL, "gave no status"),
        ('echo "Traceback (most recent call last):" >&2; exit 1', Status.FAIL, "Traceback"),
    ],
)
def test_cloud_init(node: FakeNode, script: str, status: Status, words: str) -> None:
    node.tool("cloud-init", script)
    result = check(node, "cloud_init")
    assert result.status is status
    assert words in result.detail


def test_cloud_init_skips_when_absent(node: FakeNode) -> None:
    node.no_tool("cloud-init")
    result = check(node, "cloud_init")
    assert (result.status, result.detail) == (Status.SKIP, "cloud-init not found on PATH")


def test_a_hanging_cloud_init_fails_within_its_deadline(
    node: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    shrink_timeouts(monkeypatch, 0.3)
    node.tool("cloud-init", "exec /bin/sleep 30")
    started = time.monotonic()
    result = check(node, "cloud_init")
    assert time.monotonic() - started < 3
    assert result.status is Status.FAIL
    assert "did not finish within 0.3 s" in result.detail


# time_sync


def test_time_sync_fails_when_timedatectl_says_no(node: FakeNode) -> None:
    node.tool("timedatectl", "echo no")
    assert check(node, "time_sync").status is Status.FAIL


def test_time_sync_falls_back_to_the_timesyncd_flag_file(node: FakeNode) -> None:
    node.tool("timedatectl", 'echo "Failed to connect to bus: Host is down" >&2; exit 1')
    result = check(node, "time_sync")
    assert result.status is Status.PASS
    assert "systemd-timesyncd" in result.detail


def test_time_sync_without_timedatectl_and_unsynchronized_timesyncd_fails(node: FakeNode) -> None:
    node.no_tool("timedatectl")
    node.remove("/run/systemd/timesync/synchronized")
    assert check(node, "time_sync").status is Status.FAIL


def test_time_sync_skips_when_nothing_can_tell(node: FakeNode) -> None:
    node.tool("timedatectl", "echo 'maybe?'")
    node.remove("/run/systemd/timesync/synchronized")
    (node.root / "run/systemd/timesync").rmdir()
    result = check(node, "time_sync")
    assert result.status is Status.SKIP
    assert "maybe?" in result.detail


def test_a_hanging_timedatectl_still_reads_the_flag_file(
    node: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    shrink_timeouts(monkeypatch, 0.3)
    node.tool("timedatectl", "exec /bin/sleep 30")
    assert check(node, "time_sync").status is Status.PASS


# kube_proxy_dataplane

DROPIN = "/etc/rancher/k3s/config.yaml.d/10-kube-proxy.yaml"
IPTABLES_NFT = (
    'case "$1" in --version) echo "iptables v1.8.9 (nf_tables)";; *) echo "-P INPUT ACCEPT";; esac'
)
IPTABLES_LEGACY = (
    'case "$1" in --version) echo "iptables v1.8.9 (legacy)";; *) echo "-P INPUT ACCEPT";; esac'
)


def test_dataplane_passes_with_the_dropin_and_a_working_nft(node: FakeNode) -> None:
    result = check(node, "kube_proxy_dataplane")
    assert (result.status, result.detail) == (
        Status.PASS,
        "nftables mode (10-kube-proxy.yaml); nft works",
    )


def test_dataplane_fails_when_nft_does_not_work(node: FakeNode) -> None:
    node.tool("nft", 'echo "Error: Could not process rule: Operation not permitted" >&2; exit 1')
    result = check(node, "kube_proxy_dataplane")
    assert result.status is Status.FAIL
    assert "Operation not permitted" in result.detail


def test_dataplane_skips_when_the_dropin_wants_nft_but_it_is_absent(node: FakeNode) -> None:
    node.no_tool("nft")
    result = check(node, "kube_proxy_dataplane")
    assert result.status is Status.SKIP
    assert "nft not found" in result.detail


def test_legacy_iptables_without_the_dropin_fails(node: FakeNode) -> None:
    node.remove(DROPIN)
    node.tool("iptables", IPTABLES_LEGACY)
    result = check(node, "kube_proxy_dataplane")
    assert result.status is Status.FAIL
    assert "legacy iptables and no" in result.detail


def test_nf_tables_iptables_without_the_dropin_passes(node: FakeNode) -> None:
    node.remove(DROPIN)
    node.tool("iptables", IPTABLES_NFT)
    result = check(node, "kube_proxy_dataplane")
    assert result.status is Status.PASS
    assert "k3s default" in result.detail


@pytest.mark.parametrize("script", [IPTABLES_NFT, IPTABLES_LEGACY])
def test_k3s_kube_proxy_mode_iptables_is_honoured(node: FakeNode, script: str) -> None:
    node.no_tool("nft")  # the drop-in says nftables; the operator's override wins
    node.tool("iptables", script)
    node.env["K3S_KUBE_PROXY_MODE"] = "IPTables"
    result = check(node, "kube_proxy_dataplane")
    assert result.status is Status.PASS
    assert "iptables mode (K3S_KUBE_PROXY_MODE)" in result.detail


def test_iptables_that_does_not_work_fails(node: FakeNode) -> None:
    node.env["K3S_KUBE_PROXY_MODE"] = "iptables"
    node.tool(
        "iptables",
        'case "$1" in --version) echo "iptables v1.8.9 (nf_tables)";; '
        '*) echo "iptables: Table does not exist" >&2; exit 3;; esac',
    )
    result = check(node, "kube_proxy_dataplane")
    assert result.status is Status.FAIL
    assert "Table does not exist" in result.detail


@pytest.mark.parametrize(
    ("dropin", "words"),
    [
        ("kube-proxy-arg: [proxy-mode=nftables\n", "not YAML"),
        ("- just\n- a list\n", "not a YAML mapping"),
        ("kube-proxy-arg:\n  - proxy-mode=ipvs\n", "unsupported proxy-mode"),
        ("node-label: [a=b]\n", "sets no proxy-mode"),
        (b"\xff\xfe\x00garbage", "10-kube-proxy.yaml"),
    ],
)
def test_a_broken_dropin_fails(node: FakeNode, dropin: str | bytes, words: str) -> None:
    node.write(DROPIN, dropin)
    result = check(node, "kube_proxy_dataplane")
    assert result.status is Status.FAIL
    assert words in result.detail


def test_an_unknown_k3s_kube_proxy_mode_fails(node: FakeNode) -> None:
    node.env["K3S_KUBE_PROXY_MODE"] = "ipvs"
    assert check(node, "kube_proxy_dataplane").status is Status.FAIL


def test_iptables_printing_junk_fails(node: FakeNode) -> None:
    node.remove(DROPIN)
    node.tool("iptables", "echo '<html>proxy error</html>'")
    result = check(node, "kube_proxy_dataplane")
    assert result.status is Status.FAIL
    assert "unexpected content in iptables --version" in result.detail


def test_no_dropin_and_no_iptables_skips(node: FakeNode) -> None:
    node.remove(DROPIN)
    assert check(node, "kube_proxy_dataplane").status is Status.SKIP


# k3s_check_config


def test_check_config_failure_names_the_first_missing_item(node: FakeNode) -> None:
    node.tool(
        "k3s",
        r'printf -- "- CONFIG_NAMESPACES: \033[32menabled\033[0m\n";'
        r'printf -- "- CONFIG_CGROUP_PIDS: \033[31mmissing\033[0m\n";'
        r'printf "STATUS: 1 (fail)\n"; exit 1',
    )
    result = check(node, "k3s_check_config")
    assert result.status is Status.FAIL
    assert (
        result.detail == "k3s check-config exit 1: 1 problems, first: CONFIG_CGROUP_PIDS: missing"
    )


def test_check_config_skips_without_k3s(node: FakeNode) -> None:
    node.no_tool("k3s")
    assert check(node, "k3s_check_config").status is Status.SKIP


def test_a_hanging_check_config_fails_within_its_deadline(
    node: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    shrink_timeouts(monkeypatch, 0.3)
    node.tool("k3s", "/bin/sleep 30 & /bin/sleep 30")  # a grandchild holds the pipe too
    started = time.monotonic()
    assert check(node, "k3s_check_config").status is Status.FAIL
    assert time.monotonic() - started < 3


# k3s_node_ready


@pytest.mark.parametrize(
    ("output", "status", "words"),
    [
        (nodes_json((HOST, "False")), Status.FAIL, "registered but not Ready"),
        (nodes_json((HOST, None)), Status.FAIL, "registered but not Ready"),
        (nodes_json(("node2", "True")), Status.FAIL, "not registered (nodes: node2)"),
        (nodes_json(), Status.FAIL, "(nodes: none)"),
        (nodes_json((HOST.upper(), "True")), Status.PASS, "is Ready"),
        ("NAME STATUS\nnode1 Ready", Status.FAIL, "not JSON"),
        ('{"items": "nope"}', Status.FAIL, "no node list"),
        ('[1, 2, {"metadata": null}]', Status.FAIL, "no node list"),
        ('{"items": [null, 3, {"metadata": {"name": 5}}]}', Status.FAIL, "not registered"),
    ],
)
def test_node_ready_from_kubectl_output(
    node: FakeNode, output: str, status: Status, words: str
) -> None:
    node.tool("kubectl", f"/bin/cat <<'EOF'\n{output}\nEOF")
    result = check(node, "k3s_node_ready")
    assert result.status is status
    assert words in result.detail


def test_node_ready_fails_when_kubectl_cannot_reach_the_api(node: FakeNode) -> None:
    node.tool(
        "kubectl",
        'echo "The connection to the server 127.0.0.1:6443 was refused" >&2; exit 1',
    )
    result = check(node, "k3s_node_ready")
    assert result.status is Status.FAIL
    assert "was refused" in result.detail


def test_node_ready_skips_without_a_kubeconfig(node: FakeNode) -> None:
    node.remove("/etc/rancher/k3s/k3s.yaml")
    result = check(node, "k3s_node_ready")
    assert result.status is Status.SKIP
    assert "no kubeconfig" in result.detail


def test_node_ready_uses_the_first_readable_kubeconfig_of_the_env(node: FakeNode) -> None:
    node.remove("/etc/rancher/k3s/k3s.yaml")
    mine = node.write("/home/pi/.kube/config", "apiVersion: v1\n")
    node.env["KUBECONFIG"] = "/nonexistent:/home/pi/.kube/config"
    node.tool(
        "kubectl",
        f'[ "$2" = "{mine}" ] || exit 9\n/bin/cat <<\'EOF\'\n{nodes_json((HOST, "True"))}\nEOF',
    )
    assert check(node, "k3s_node_ready").status is Status.PASS


def test_node_ready_falls_back_to_k3s_kubectl(node: FakeNode) -> None:
    node.no_tool("kubectl")
    node.tool(
        "k3s",
        f"[ \"$1\" = kubectl ] || exit 9\n/bin/cat <<'EOF'\n{nodes_json((HOST, 'True'))}\nEOF",
    )
    assert check(node, "k3s_node_ready").status is Status.PASS


def test_node_ready_skips_without_kubectl_or_k3s(node: FakeNode) -> None:
    node.no_tool("kubectl")
    node.no_tool("k3s")
    assert check(node, "k3s_node_ready").status is Status.SKIP


# swap_off, ip_forward


def test_swap_on_fails_naming_the_device(node: FakeNode) -> None:
    node.write(
        "/proc/swaps",
        "Filename\tType\tSize\tUsed\tPriority\n/dev/zram0   partition\t2097136\t0\t100\n",
    )
    result = check(node, "swap_off")
    assert result.status is Status.FAIL
    assert "(/dev/zram0)" in result.detail


@pytest.mark.parametrize("text", ["", "garbage\n", "Filename Type\n/dev/sda2 partition x y z\n"])
def test_swap_garbage_fails(node: FakeNode, text: str) -> None:
    node.write("/proc/swaps", text)
    result = check(node, "swap_off")
    assert result.status is Status.FAIL
    assert "unexpected content in /proc/swaps" in result.detail


def test_swap_unreadable_skips(node: FakeNode) -> None:
    node.unreadable("/proc/swaps")
    assert check(node, "swap_off").status is Status.SKIP


@pytest.mark.parametrize(
    ("text", "status"),
    [("0\n", Status.FAIL), ("1", Status.PASS), ("yes", Status.FAIL), ("", Status.FAIL)],
)
def test_ip_forward(node: FakeNode, text: str, status: Status) -> None:
    node.write("/proc/sys/net/ipv4/ip_forward", text)
    assert check(node, "ip_forward").status is status


def test_ip_forward_missing_skips(node: FakeNode) -> None:
    node.remove("/proc/sys/net/ipv4/ip_forward")
    assert check(node, "ip_forward").status is Status.SKIP


# boot_media


def test_an_sd_card_is_a_supported_medium_named_with_what_it_costs(node: FakeNode) -> None:
    node.write("/proc/self/mountinfo", "22 1 179:2 / / rw - ext4 /dev/mmcblk0p2 rw\n")
    result = check(node, "boot_media")
    assert result.status is Status.PASS
    assert result.detail.startswith("SD card or eMMC: / is on /dev/mmcblk0p2 (supported; etcd")


def test_dev_root_is_resolved_through_sys_dev_block(node: FakeNode) -> None:
    node.write("/proc/self/mountinfo", "22 1 179:2 / / rw - ext4 /dev/root rw\n")
    link = node.root / "sys/dev/block/179:2"
    link.parent.mkdir(parents=True)
    link.symlink_to(
        "../../devices/platform/axi/1000fff000.mmc/mmc_host/mmc0/block/mmcblk0/mmcblk0p2"
    )
    assert check(node, "boot_media").detail.startswith("SD card or eMMC: / is on /dev/mmcblk0p2")


def test_k3s_data_on_its_own_nvme_mount_passes_even_with_root_on_sd(node: FakeNode) -> None:
    node.write(
        "/proc/self/mountinfo",
        "22 1 179:2 / / rw - ext4 /dev/mmcblk0p2 rw\n"
        "30 22 259:1 / /var/lib/rancher rw - ext4 /dev/nvme0n1p1 rw\n"
        "31 22 259:3 / /var/lib/rancher2 rw - ext4 /dev/mmcblk0p3 rw\n",
    )
    result = check(node, "boot_media")
    assert (result.status, result.detail) == (
        Status.PASS,
        "NVMe: /var/lib/rancher is on /dev/nvme0n1p1",
    )


def test_a_usb_disk_passes(node: FakeNode) -> None:
    node.write("/proc/self/mountinfo", "22 1 8:2 / / rw - ext4 /dev/sda2 rw\n")
    assert check(node, "boot_media").detail == "USB or SATA disk: / is on /dev/sda2"


@pytest.mark.parametrize(
    "mountinfo",
    [
        "22 1 0:31 / / rw - overlay overlay rw\n",  # a container: no block device
        "garbage without the separator\n\x00\x01",
        "",
    ],
)
def test_boot_media_skips_when_no_block_device_holds_root(node: FakeNode, mountinfo: str) -> None:
    node.write("/proc/self/mountinfo", mountinfo)
    assert check(node, "boot_media").status is Status.SKIP


# containment and a minimal PATH


def test_a_check_that_raises_is_a_fail_and_the_rest_still_run(
    node: FakeNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(_probe: object) -> Verdict:
        raise ZeroDivisionError("division by zero")

    builtins = dict(checks.BUILTIN_CHECKS)
    builtins["swap_off"] = broken
    monkeypatch.setattr(checks, "BUILTIN_CHECKS", tuple(builtins.items()))
    results = {r.name: r for r in checks.run_checks(node.probe())}
    assert results["swap_off"].status is Status.FAIL
    assert results["swap_off"].detail == "check crashed: ZeroDivisionError: division by zero"
    assert results["boot_media"].status is Status.PASS


def test_a_minimal_path_skips_the_tool_checks_and_crashes_none(tmp_path: Path) -> None:
    node = FakeNode(tmp_path).healthy()
    for tool in list(node.bin.iterdir()):
        tool.unlink()
    results = {r.name: r for r in checks.run_checks(node.probe())}
    for name in (
        "cloud_init",
        "kube_proxy_dataplane",
        "k3s_check_config",
        "k3s_node_ready",
        "avahi_dbus",
        "mdns_advertised",
        "hostname_unique",
    ):
        assert results[name].status is Status.SKIP, results[name]
        assert "not found on PATH" in results[name].detail or "nor k3s" in results[name].detail
    assert results["time_sync"].status is Status.PASS  # timesyncd's flag file
    assert not any("crashed" in r.detail for r in results.values())


def test_an_empty_root_never_crashes(tmp_path: Path) -> None:
    node = FakeNode(tmp_path)
    results = checks.run_checks(node.probe())
    assert len(results) == len(checks.BUILTIN_CHECKS)
    assert not any("crashed" in r.detail for r in results), results
    assert {r.status for r in results} <= {Status.SKIP, Status.FAIL}


def test_single_cluster_fails_while_the_daemon_hears_two_cluster_cas(node: FakeNode) -> None:
    assert mdns.single_cluster(node.probe()).status is Status.PASS
    alarm = "CA 0123456789ab on node1.local; CA ba9876543210 on x.local\n"
    node.write(str(const.SPLIT_BRAIN_MARKER), alarm)
    verdict = mdns.single_cluster(node.probe())
    assert verdict.status is Status.FAIL
    assert "split brain: CA 0123456789ab on node1.local" in verdict.detail
