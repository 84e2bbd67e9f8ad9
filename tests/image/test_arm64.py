"""Arm64, the Pi's architecture: the package booted on arm64 userspace, then on an arm64 kernel.

- quick: the bookworm rootfs for arm64, every binary run by qemu-aarch64 through binfmt_misc,
  booted with systemd-nspawn in a network namespace of its own (a veth on the bridge br-skarm,
  10.248.0.0/24, nothing on the host's network). qemu-user cannot run everything a booted
  systemd does (tests/image/arm64.py lists what and how the test root works around it):
  systemd-sysusers and systemd-tmpfiles-setup fail, expected and not ours, so the test asserts
  on our unit, never on "no failed units".
- full (slow): Debian's arm64 kernel under qemu-system-aarch64 (-M virt, Cortex-A72, software
  emulation), the root an ext4 image, the unit exactly as shipped; a probe unit reports to the
  serial console and powers off. Once with a NIC on qemu's restricted user network (a node
  whose LAN has nobody else on it: the agent runs), once with no NIC at all (it exits 69 and
  systemd retries it).

Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/image/test_arm64.py (root; -s shows
the measured times). Quick tier only: add `-m "image and not slow"`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image.arm64 import (
    QEMU_USER_DROPIN,
    QEMU_USER_DROPIN_PATH,
    Arm64Unavailable,
    GuestImage,
    boot_guest,
    ensure_binfmt_aarch64,
    kernel_tarball,
    make_guest_image,
    poweroff_inside,
    qemu_system_available,
    quick_network,
    write_agent_defaults,
)
from tests.image.nspawn import Container, boot
from tests.image.rootfs import base_tarball, make_root, remove_root

pytestmark = pytest.mark.image

BRIDGE = "br-skarm"
NETNS = "skarm0"  # its host-side veth is vskarm0
ADDRESS = "10.248.0.2/24"
# Nobody answers there: the route only gives the agent what a Pi's DHCP lease gives it, a
# default-route interface (without one it exits 69, see test_full_tier_without_a_nic).
GATEWAY = "10.248.0.1"
QUICK_HOSTNAME = "skarm-quick"
FULL_HOSTNAME = "skarm-full"
BOOT_TIMEOUT = 180.0  # s for systemd under qemu-user to finish booting (measured ~10 s)
AGENT_TIMEOUT = 120.0  # s more for the agent to become active
UNIT = "sugarkube-agent.service"


def _say(what: str) -> None:
    """A measured figure, on stdout (shown with -s or -rA)."""
    print(f"[arm64] {what}")


@pytest.fixture(scope="module")
def binfmt() -> str:
    """qemu-aarch64 registered with binfmt_misc (fix-binary), or the module skipped with why."""
    if os.geteuid() != 0:
        pytest.skip("needs root (binfmt_misc, mmdebstrap, systemd-nspawn)")
    try:
        return ensure_binfmt_aarch64()
    except Arm64Unavailable as exc:
        pytest.skip(f"no arm64 through qemu-user here: {exc}")


def _wait_active(node: Container, unit: str, timeout: float) -> str:
    """Poll `systemctl is-active UNIT` inside NODE until "active" or "failed", or TIMEOUT."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = node.run("systemctl", "is-active", unit, timeout=30).stdout.strip()
        if state in ("active", "failed"):
            break
        time.sleep(0.5)
    return state


def test_quick_tier_agent_active_on_arm64_userspace(deb: Path, binfmt: str, tmp_path: Path) -> None:
    started = time.monotonic()
    tarball = base_tarball("arm64")
    _say(f"arm64 base rootfs ready in {time.monotonic() - started:.1f} s ({tarball.name})")
    root = tmp_path / QUICK_HOSTNAME
    try:
        make_root(
            tarball, root, [deb], QUICK_HOSTNAME, files={QEMU_USER_DROPIN_PATH: QEMU_USER_DROPIN}
        )
        write_agent_defaults(root)
        with (
            quick_network(BRIDGE, NETNS, ADDRESS, GATEWAY),
            boot(root, network_namespace=NETNS) as node,
        ):
            try:
                system = node.wait_system_running(timeout=BOOT_TIMEOUT)
                state = _wait_active(node, UNIT, AGENT_TIMEOUT)
                active_after = time.monotonic() - node.started
                status = node.run(
                    "systemctl", "status", "--no-pager", "--full", "--lines=5", UNIT
                ).stdout
                assert state == "active", f"{state}\n{status}\n{node.console_tail()}"
                _say(
                    f"quick tier: boot finished ({system.state}) {system.seconds:.1f} s, agent "
                    f"active {active_after:.1f} s after nspawn started; failed units "
                    f"(qemu-user): {' '.join(system.failed_units)}"
                )
                assert node.run("uname", "-m").stdout.strip() == "aarch64"
                assert node.run("dpkg", "--print-architecture").stdout.strip() == "arm64"
                assert "Active: active (running)" in status, status
                assert 'Status: "' in status, status  # the daemon's STATUS= line
                # Only qemu-user's casualties may have failed, never one of ours.
                ours = [u for u in system.failed_units if "sugarkube" in u]
                assert not ours, system.failed_units
            finally:
                # Also on failure: nspawn's own poweroff() signal misfires under qemu-user.
                clean = poweroff_inside(node)
        assert clean, f"no clean power-off:\n{node.console_tail()}"
    finally:
        remove_root(root)


# -- full tier --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guest_image(
    deb: Path, binfmt: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GuestImage]:
    """The kernel-bearing arm64 rootfs with our .deb, as an ext4 image plus kernel and initrd."""
    why = qemu_system_available()
    if why:
        pytest.skip(why)
    workdir = tmp_path_factory.mktemp("arm64-full")
    try:
        started = time.monotonic()
        tarball = kernel_tarball()
        _say(f"arm64 kernel rootfs ready in {time.monotonic() - started:.1f} s ({tarball.name})")
        started = time.monotonic()
        image = make_guest_image(tarball, workdir, [deb], FULL_HOSTNAME)
        _say(f"ext4 image with the .deb in {time.monotonic() - started:.1f} s")
        yield image
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _copy(image: GuestImage, workdir: Path) -> GuestImage:
    """A private copy of IMAGE's disk (a boot writes to it), sharing its kernel and initrd."""
    disk = workdir / "root.ext4"
    subprocess.run(
        ["cp", "--sparse=always", "--reflink=auto", str(image.disk), str(disk)],
        check=True,
        timeout=300,
    )
    return GuestImage(disk=disk, kernel=image.kernel, initrd=image.initrd)


@pytest.mark.slow
def test_full_tier_agent_active_on_the_arm64_kernel(
    guest_image: GuestImage, tmp_path: Path
) -> None:
    run = boot_guest(_copy(guest_image, tmp_path), tmp_path / "console.log", nic=True)
    (tmp_path / "root.ext4").unlink(missing_ok=True)
    _say(
        f"full tier: qemu start to power-off {run.seconds:.1f} s; probe at uptime "
        f"{run.probe.get('begin')} s; {run.probe.get('show')}"
    )
    assert run.powered_off, (
        f"exit {run.returncode} after {run.seconds:.0f} s:\n{run.console_tail()}"
    )
    assert run.probe["uname-m"] == "aarch64"
    assert run.probe["kernel"].endswith("-arm64"), run.probe
    assert run.probe["is-active"] == "active", f"{run.probe}\n{run.status}"
    assert "Active: active (running)" in run.status, run.status
    assert 'Status: "' in run.status, run.status
    assert "sugarkube" not in run.probe["failed"], run.probe


@pytest.mark.slow
def test_full_tier_without_a_nic(guest_image: GuestImage, tmp_path: Path) -> None:
    """No network device at all (only `lo`): no default-route interface to publish on. The
    agent exits 69 (EX_UNAVAILABLE) saying so, and systemd keeps retrying it every 5 s
    (Restart=on-failure, no start limit), so the node heals once a network appears.

    systemd-networkd-wait-online is masked for this boot only: with no link to wait for it
    spends its whole 2-minute timeout before network-online.target (which the agent wants).
    """
    run = boot_guest(
        _copy(guest_image, tmp_path),
        tmp_path / "console.log",
        nic=False,
        extra_cmdline=("systemd.mask=systemd-networkd-wait-online.service",),
    )
    (tmp_path / "root.ext4").unlink(missing_ok=True)
    _say(f"full tier, no NIC: qemu start to power-off {run.seconds:.1f} s; {run.probe.get('show')}")
    assert run.powered_off, (
        f"exit {run.returncode} after {run.seconds:.0f} s:\n{run.console_tail()}"
    )
    assert run.probe["links"].split() == ["lo"], run.probe
    show = dict(kv.split("=", 1) for kv in run.probe["show"].strip(",").split(",") if "=" in kv)
    assert int(show.get("NRestarts", "0")) >= 1, run.probe  # retried, not given up on
    assert run.probe["is-active"] in ("activating", "failed"), run.probe
    assert "no default route on a usable interface" in run.journal, run.journal
    assert "status=69/UNAVAILABLE" in run.journal, run.journal
