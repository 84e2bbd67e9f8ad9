"""The node checks, one function each, in the runbook's order; `run_checks` runs them all.

Each check takes a Probe and returns a Verdict. A check raises Unavailable when its probe cannot
run (a `skip`) and CheckFailed for a `fail` found deep inside; anything else it raises is caught
by `contain` and reported as a `fail`, so the verifier itself never crashes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from agent import const
from agent.verify import parse, plugins
from agent.verify.mdns import avahi_dbus, hostname_unique, mdns_advertised, single_cluster
from agent.verify.probe import CommandResult, Probe
from agent.verify.result import (
    CheckFailed,
    CheckResult,
    Unavailable,
    Verdict,
    contain,
    failed,
    parsed,
    passed,
)

CMDLINE_FLAGS = ("cgroup_memory=1", "cgroup_enable=memory")


def memory_controller(probe: Probe) -> tuple[bool, str]:
    """Whether the memory cgroup controller is enabled, as k3s judges it, and where that was
    read: cgroup v2's cgroup.controllers, else cgroup v1's /proc/cgroups `enabled` column."""
    v2 = probe.read_optional("/sys/fs/cgroup/cgroup.controllers")
    if v2 is not None:
        return "memory" in parse.cgroup2_controllers(v2), "cgroup v2"
    v1 = probe.read_optional("/proc/cgroups")
    if v1 is None:
        raise Unavailable("neither /sys/fs/cgroup/cgroup.controllers nor /proc/cgroups exists")
    return "memory" in parse.cgroup1_enabled(v1), "cgroup v1"
PROXY_DROPIN = "/etc/rancher/k3s/config.yaml.d/10-kube-proxy.yaml"
K3S_KUBECONFIG = "/etc/rancher/k3s/k3s.yaml"
ETCD_DIR = "/var/lib/rancher/k3s/server/db"


def _cmdline_txt(probe: Probe) -> str:
    """The firmware's cmdline.txt: bookworm's /boot/firmware, older images' /boot."""
    for path in ("/boot/firmware/cmdline.txt", "/boot/cmdline.txt"):
        if probe.exists(path):
            return path
    return "/boot/firmware/cmdline.txt"


def cgroup_memory(probe: Probe) -> Verdict:
    """The memory cgroup controller is on and /proc/cmdline carries the Pi's enabling flags."""
    cmdline = parse.cmdline_tokens(probe.read("/proc/cmdline"))
    enabled, where = memory_controller(probe)
    missing = [flag for flag in CMDLINE_FLAGS if flag not in cmdline]
    if enabled and not missing:
        return passed(
            f"memory controller enabled ({where}); /proc/cmdline has {' '.join(CMDLINE_FLAGS)}"
        )
    problems = [] if enabled else [f"memory controller not enabled ({where})"]
    if missing:
        problems.append(f"/proc/cmdline lacks {' '.join(missing)}")
    path = _cmdline_txt(probe)
    written = parse.cmdline_tokens(probe.read_optional(path) or "")
    if missing and all(flag in written for flag in missing):
        fix = f"{path} already has them: reboot"
    else:
        flags = " ".join(missing or CMDLINE_FLAGS)
        fix = f"sudo sed -i '1 s/$/ {flags}/' {path} && sudo reboot"
    return failed(f"{'; '.join(problems)}; fix: {fix}")


def cloud_init(probe: Probe) -> Verdict:
    """`cloud-init status` reports done (skip without cloud-init, or when it is disabled)."""
    result = probe.run("cloud-init", "status")
    try:
        status = parse.cloud_init_status(result.stdout)
    except parse.ParseError:
        return failed(f"cloud-init status gave no status: {result.first_line()}")
    if status == "done":
        degraded = (
            " with recoverable errors (see cloud-init status --long)"
            if result.returncode == 2
            else ""
        )
        return passed(f"cloud-init done{degraded}")
    if status == "disabled":
        raise Unavailable("cloud-init is disabled on this image")
    if status in ("running", "not started", "not run"):
        return failed(f"cloud-init is {status}; wait for `cloud-init status --wait`, then rerun")
    return failed(f"cloud-init status is {status!r}; see cloud-init status --long")


def time_sync(probe: Probe) -> Verdict:
    """The clock is NTP-synchronized: timedatectl's NTPSynchronized, else timesyncd's flag file."""
    reason = "timedatectl not found on PATH"
    if probe.which("timedatectl"):
        try:
            result = probe.run("timedatectl", "show", "-p", "NTPSynchronized", "--value")
        except CheckFailed as exc:  # timed out: timesyncd's flag file may still answer
            result = CommandResult(None, "", str(exc), timed_out=True)
        value = result.stdout.strip().lower()
        if result.ok and value == "yes":
            return passed("NTPSynchronized=yes (timedatectl)")
        if result.ok and value == "no":
            return failed(
                "the clock is not NTP-synchronized (timedatectl NTPSynchronized=no); TLS and etcd "
                "need it: check systemd-timesyncd and the network"
            )
        reason = f"timedatectl gave no answer ({result.first_line()})"
    if probe.exists("/run/systemd/timesync/synchronized"):
        return passed("systemd-timesyncd marked the clock synchronized")
    if probe.exists("/run/systemd/timesync"):
        return failed("systemd-timesyncd has not synchronized the clock yet")
    raise Unavailable(f"{reason}; no /run/systemd/timesync state either")


def nft_usable(probe: Probe, source: str) -> Verdict:
    """nftables mode: pass when `nft list tables` works."""
    try:
        result = probe.run("nft", "list", "tables")
    except Unavailable as exc:
        raise Unavailable(f"nftables mode ({source}) but nft not found on PATH") from exc
    if not result.ok:
        return failed(
            f"nftables mode ({source}) but `nft list tables` failed: {result.first_line()}"
        )
    return passed(f"nftables mode ({source}); nft works")


def _iptables_usable(probe: Probe, source: str | None) -> Verdict:
    """iptables mode: pass when iptables works; legacy iptables without the drop-in fails."""
    label = source or "k3s default, no 10-kube-proxy.yaml"
    try:
        version = probe.run("iptables", "--version")
    except Unavailable as exc:
        raise Unavailable(f"iptables mode ({label}) but iptables not found on PATH") from exc
    if not version.ok:
        return failed(f"`iptables --version` failed: {version.first_line()}")
    backend = parsed("iptables --version", parse.iptables_backend, version.stdout)
    if source is None and backend == "legacy":
        return failed(
            f"legacy iptables and no {PROXY_DROPIN}: install the drop-in "
            "(kube-proxy-arg: [proxy-mode=nftables]) or switch to iptables-nft"
        )
    listing = probe.run("iptables", "-w", "5", "-S")
    if not listing.ok:
        return failed(f"iptables mode ({label}) but `iptables -S` failed: {listing.first_line()}")
    return passed(f"iptables mode ({label}) with iptables ({backend})")


def proxy_mode(probe: Probe) -> tuple[str | None, str | None]:
    """kube-proxy's mode and where it was set: K3S_KUBE_PROXY_MODE, else our drop-in; (None,
    None) when neither sets one (k3s's default, iptables). CheckFailed when one is unusable."""
    text = probe.read_optional(PROXY_DROPIN)
    dropin = None if text is None else parsed(PROXY_DROPIN, parse.dropin_proxy_mode, text)
    override = probe.env.get("K3S_KUBE_PROXY_MODE", "").strip()
    if override:
        mode = parse.proxy_mode(override)
        if mode is None:
            raise CheckFailed(
                f"K3S_KUBE_PROXY_MODE={override[:20]!r} is neither nftables nor iptables"
            )
        return mode, "K3S_KUBE_PROXY_MODE"
    if dropin is not None:
        return dropin, "10-kube-proxy.yaml"
    if text is not None:
        raise CheckFailed(
            f"{PROXY_DROPIN} sets no proxy-mode; expected kube-proxy-arg: [proxy-mode=nftables]"
        )
    return None, None


def kube_proxy_dataplane(probe: Probe) -> Verdict:
    """kube-proxy's mode (K3S_KUBE_PROXY_MODE, else the drop-in) has a dataplane that works."""
    mode, source = proxy_mode(probe)
    if mode == "nftables":
        return nft_usable(probe, source or "")
    return _iptables_usable(probe, source)


def k3s_check_config(probe: Probe) -> Verdict:
    """`k3s check-config` passes (skip without k3s)."""
    timeout = const.VERIFY_CHECK_CONFIG_TIMEOUT
    result = probe.run("k3s", "check-config", timeout=timeout)
    problems = parse.check_config_problems(result.stdout + "\n" + result.stderr)
    if result.ok:
        optional = f" ({len(problems)} optional items missing)" if problems else ""
        return passed(f"k3s check-config passed{optional}")
    first = f"{len(problems)} problems, first: {problems[0]}" if problems else result.first_line()
    return failed(f"k3s check-config exit {result.returncode}: {first}")


def _kubeconfig(probe: Probe) -> str | None:
    """The first readable kubeconfig of $KUBECONFIG, else k3s's own; None when there is none."""
    candidates = [p for p in probe.env.get("KUBECONFIG", "").split(":") if p]
    for candidate in [*candidates, K3S_KUBECONFIG]:
        path = probe.file(candidate)
        if path.is_file() and os.access(path, os.R_OK):
            return str(path)
    return None


def k3s_node_ready(probe: Probe) -> Verdict:
    """This node is Ready in `kubectl get nodes`; skip without a kubeconfig, as the runbook says."""
    kubeconfig = _kubeconfig(probe)
    if kubeconfig is None:
        raise Unavailable(f"no kubeconfig ($KUBECONFIG, {K3S_KUBECONFIG}): k3s is not up here yet")
    host = probe.host()
    args = ["--kubeconfig", kubeconfig, f"--request-timeout={const.VERIFY_KUBECTL_REQUEST}"]
    args += ["get", "nodes", "-o", "json"]
    timeout, cap = const.VERIFY_KUBECTL_TIMEOUT, const.VERIFY_KUBECTL_OUTPUT_CAP
    if probe.which("kubectl"):
        result = probe.run("kubectl", *args, timeout=timeout, cap=cap)
    elif probe.which("k3s"):
        result = probe.run("k3s", "kubectl", *args, timeout=timeout, cap=cap)
    else:
        raise Unavailable("neither kubectl nor k3s found on PATH")
    if not result.ok:
        return failed(f"kubectl get nodes failed: {result.first_line()}")
    ready, names = parsed("kubectl get nodes", partial(parse.node_ready, host=host), result.stdout)
    if ready is None:
        return failed(f"node {host} is not registered (nodes: {', '.join(names) or 'none'})")
    if ready:
        return passed(f"node {host} is Ready")
    return failed(f"node {host} is registered but not Ready (kubectl describe node {host})")


def swap_off(probe: Probe) -> Verdict:
    """No swap is active (/proc/swaps lists none)."""
    devices = parsed("/proc/swaps", parse.active_swaps, probe.read("/proc/swaps"))
    if not devices:
        return passed("no active swap")
    return failed(
        f"swap is on ({', '.join(devices)}); kubelet expects it off: "
        "sudo swapoff -a && sudo systemctl disable --now dphys-swapfile"
    )


def ip_forward(probe: Probe) -> Verdict:
    """net.ipv4.ip_forward is 1."""
    path = "/proc/sys/net/ipv4/ip_forward"
    value = parsed(path, parse.flag_value, probe.read(path))
    if value == 1:
        return passed("net.ipv4.ip_forward=1")
    return failed(
        f"net.ipv4.ip_forward={value}: pods cannot route; k3s sets it when it starts, or: "
        "sudo sysctl -w net.ipv4.ip_forward=1"
    )


def _block_device(probe: Probe, mount: parse.Mount) -> str | None:
    """The block device name (`nvme0n1p2`) behind a mount, via /sys/dev/block for `/dev/root`."""
    base = mount.source.rsplit("/", 1)[-1]
    if mount.source.startswith("/dev/") and base != "root":
        return base
    if mount.major_minor.startswith("0:"):
        return None
    try:
        return os.readlink(probe.file(f"/sys/dev/block/{mount.major_minor}")).rsplit("/", 1)[-1]
    except OSError:
        return None


def boot_media(probe: Probe) -> Verdict:
    """The medium that holds k3s's datastore, named: an SD card is supported (the runbook's
    default), with what it costs etcd said in the detail."""
    mounts = parse.mountinfo(probe.read("/proc/self/mountinfo"))
    mount = parse.mount_of(mounts, ETCD_DIR)
    if mount is None:
        raise Unavailable("/proc/self/mountinfo lists no root mount")
    device = _block_device(probe, mount)
    if device is None:
        raise Unavailable(
            f"{mount.mount_point} is on {mount.source} ({mount.fstype}), no block device"
        )
    where = f"{mount.mount_point} is on /dev/{device}"
    kind = parse.block_kind(device)
    if kind == "sd":
        return passed(
            f"SD card or eMMC: {where} (supported; etcd's fsyncs are slow there and wear it: "
            "NVMe or a USB SSD lasts longer)"
        )
    return passed(
        {"nvme": "NVMe", "usb": "USB or SATA disk"}.get(kind, "not an SD card") + f": {where}"
    )


BUILTIN_CHECKS: tuple[tuple[str, Callable[[Probe], Verdict]], ...] = (
    ("cgroup_memory", cgroup_memory),
    ("cloud_init", cloud_init),
    ("time_sync", time_sync),
    ("kube_proxy_dataplane", kube_proxy_dataplane),
    ("k3s_check_config", k3s_check_config),
    ("k3s_node_ready", k3s_node_ready),
    ("avahi_dbus", avahi_dbus),
    ("mdns_advertised", mdns_advertised),
    ("hostname_unique", hostname_unique),
    ("swap_off", swap_off),
    ("ip_forward", ip_forward),
    ("boot_media", boot_media),
    ("single_cluster", single_cluster),  # ours, after the runbook's: issue 12's split-brain alarm
)


def run_checks(probe: Probe, *, operator_checks: bool = True) -> list[CheckResult]:
    """Every built-in check, then every checks.d plugin, concurrently; results in that order."""
    jobs: list[tuple[str, Callable[[], Verdict]]] = [
        (name, partial(check, probe)) for name, check in BUILTIN_CHECKS
    ]
    if operator_checks:
        jobs += plugins.plugin_jobs(probe, taken={name for name, _ in jobs})
    with ThreadPoolExecutor(max_workers=const.VERIFY_WORKERS, thread_name_prefix="verify") as pool:
        futures = [pool.submit(contain, name, job) for name, job in jobs]
        return [future.result() for future in futures]
