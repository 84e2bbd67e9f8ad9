"""Arm64 (the Pi's architecture) for the boot tests: qemu-user through binfmt_misc, and a real
arm64 kernel under qemu-system-aarch64.

Two tiers:

- quick: the bookworm rootfs of tests.image.rootfs built for arm64 and booted with
  systemd-nspawn (tests.image.nspawn); every arm64 binary inside runs through qemu-aarch64,
  which the kernel starts for it (binfmt_misc). `ensure_binfmt_aarch64()` mounts binfmt_misc and
  registers qemu-aarch64 with the F (fix-binary) flag: the kernel opens the interpreter once, at
  registration, so it also runs inside a container whose root has no qemu.
- full: Debian's arm64 kernel (linux-image-arm64) booting that rootfs under
  `qemu-system-aarch64 -M virt -cpu cortex-a72` in software emulation, the root an ext4 image
  made with `mkfs.ext4 -d` (no loop device, no mount), the kernel and initrd handed to qemu
  directly (no firmware), the serial console captured to a file. A probe unit prints what a
  test asserts on to the console, then powers the machine off.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.image import nspawn
from tests.image.rootfs import (
    CACHE_DIR,
    MIRRORS,
    PACKAGES,
    SUITE,
    VARIANT,
    ImageError,
    _locked,
    _run,
    cache_key,
    make_root,
)

ARCH = "arm64"

# -- binfmt_misc --------------------------------------------------------------------------------

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_NAME = "qemu-aarch64"
# What qemu-user-static registers through systemd-binfmt (/usr/lib/binfmt.d/qemu-aarch64.conf):
# an ELF64 little-endian header with e_machine 183 (EM_AARCH64).
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
BINFMT_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
BINFMT_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"
# The -P wrapper is qemu-aarch64-static told that the kernel preserves argv[0] (flag P).
BINFMT_INTERPRETER = "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
# O: the kernel hands qemu an open fd of the binary; P: argv[0] preserved; F: the interpreter is
# opened now, so containers and chroots without qemu inside them work.
BINFMT_FLAGS = "OPF"


class Arm64Unavailable(RuntimeError):
    """This machine cannot run arm64 code (no qemu, or the kernel refuses binfmt_misc)."""


def _binfmt_entry() -> dict[str, str] | None:
    """The kernel's qemu-aarch64 entry as {"state", "interpreter", "flags"}; None if absent."""
    path = BINFMT_DIR / BINFMT_NAME
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    entry = {"state": lines[0].strip() if lines else ""}
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        if key == "interpreter":
            entry["interpreter"] = value.strip()
        elif key == "flags:":
            entry["flags"] = value.strip()
    return entry


def _register_line() -> str:
    """The `:name:type:offset:magic:mask:interpreter:flags` line, with the F flag."""
    if BINFMT_CONF.is_file():
        line = BINFMT_CONF.read_text().strip()
        fields = line.split(":")
        # ":name:M::magic:mask:interpreter:flags" -> 8 fields, the first empty
        if len(fields) == 8 and fields[1] == BINFMT_NAME and Path(fields[6]).exists():
            fields[7] = "".join(sorted(set(fields[7] + "F")))
            return ":".join(fields)
    return f":{BINFMT_NAME}:M::{BINFMT_MAGIC}:{BINFMT_MASK}:{BINFMT_INTERPRETER}:{BINFMT_FLAGS}"


def ensure_binfmt_aarch64() -> str:
    """Make the kernel run aarch64 ELF binaries through qemu-aarch64-static, fix-binary mode.

    Idempotent: mounts binfmt_misc on /proc/sys/fs/binfmt_misc if it is not mounted, registers
    qemu-aarch64 if absent, and replaces an entry that is disabled or lacks the F flag (without
    F, nspawn's container would look for the interpreter inside its own root). Returns a line
    describing the entry. Arm64Unavailable (with the kernel's answer) if qemu-user-static is not
    installed or the kernel refuses a step.
    """
    if not Path(BINFMT_INTERPRETER).exists() and not shutil.which("qemu-aarch64-static"):
        raise Arm64Unavailable(
            "qemu-user-static is not installed (apt-get install qemu-user-static)"
        )
    if not (BINFMT_DIR / "register").exists():
        done = subprocess.run(
            ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0 or not (BINFMT_DIR / "register").exists():
            raise Arm64Unavailable(
                f"cannot mount binfmt_misc on {BINFMT_DIR}: "
                f"{done.stderr.strip() or 'no register file after mounting'}"
            )
    try:
        if (BINFMT_DIR / "status").read_text().strip() != "enabled":
            (BINFMT_DIR / "status").write_text("1\n")
        entry = _binfmt_entry()
        if entry and (
            entry["state"] != "enabled"
            or "F" not in entry.get("flags", "")
            or not Path(entry.get("interpreter", "/nonexistent")).exists()
        ):
            (BINFMT_DIR / BINFMT_NAME).write_text("-1\n")  # remove it, then register ours
            entry = None
        if entry is None:
            (BINFMT_DIR / "register").write_text(_register_line() + "\n")
            entry = _binfmt_entry()
    except OSError as exc:
        raise Arm64Unavailable(f"the kernel refused the binfmt_misc registration: {exc}") from exc
    if not entry or entry["state"] != "enabled" or "F" not in entry.get("flags", ""):
        raise Arm64Unavailable(f"binfmt_misc entry {BINFMT_NAME} not usable: {entry}")
    check = subprocess.run(
        ["arch-test", ARCH], capture_output=True, text=True, timeout=60, check=False
    )
    if check.returncode != 0:
        raise Arm64Unavailable(
            f"arch-test {ARCH} failed with binfmt registered: "
            f"{check.stdout.strip() or check.stderr.strip()}"
        )
    return f"{BINFMT_NAME}: {entry['interpreter']} flags {entry['flags']}"


# -- the node's configuration (both tiers) ------------------------------------------------------

# A k3s join token of the shape k3s prints (K10<sha256 of the CA>::server:<password>); the agent
# only checks it is one word, and a one-server cluster never hands it to anybody.
TOKEN = "K10" + "5a" * 32 + "::server:sugarkube-arm64-secret"
# /etc/default/sugarkube-agent (EnvironmentFile= of the unit): one control-plane node, so the
# node forms its cluster alone and releases the gate without waiting for peers.
AGENT_DEFAULTS = (
    "# written by tests/image/arm64.py: a one-server cluster\n"
    "SUGARKUBE_SERVERS=1\n"
    f"SUGARKUBE_TOKEN={TOKEN}\n"
)
AGENT_DEFAULTS_PATH = "etc/default/sugarkube-agent"


def write_agent_defaults(root: Path, content: str = AGENT_DEFAULTS) -> None:
    """Give ROOT's agent its environment file, mode 0600 as the package ships it (it holds the
    token). Written after make_root(), whose FILES= would leave it 0644."""
    path = root / AGENT_DEFAULTS_PATH
    path.write_text(content)
    path.chmod(0o600)


# -- the quick tier: qemu-user under systemd-nspawn --------------------------------------------

# What qemu-user (Debian's 7.2) cannot do for a booted systemd, worked around in the quick tier
# only (the full tier runs the unit and networkd exactly as shipped):
# - PrivateIPC=yes: systemd hands the unit's IPC namespace around as a file descriptor over a
#   socketpair, and under qemu-user that step fails ("Failed to set up IPC namespacing:
#   Input/output error", exit 226/NAMESPACE). A drop-in turns it off in the test root.
# - systemd-networkd: qemu-user emulates only some netlink families (generic netlink is not
#   among them): "Could not setup manager: Protocol not supported". host0's address and
#   default route are set from the host instead (quick_network).
# - setsockopt(IP_MULTICAST_IF) is not emulated (ENOPROTOOPT), so zeroconf cannot open the
#   agent's own mDNS sockets: its live absence rounds fail and formation stays at "waiting:
#   absence 0/2". The quick tier proves the package installs and the unit runs on arm64
#   userspace; formation is the full tier's and the amd64 boot tests' business.
QEMU_USER_DROPIN_PATH = "etc/systemd/system/sugarkube-agent.service.d/50-qemu-user.conf"
QEMU_USER_DROPIN = (
    "# tests/image/arm64.py: qemu-user cannot pass the IPC namespace's fd (see there).\n"
    "[Service]\n"
    "PrivateIPC=no\n"
)
POWEROFF_TIMEOUT = 60.0  # s for `systemctl poweroff` inside to end the container


@contextlib.contextmanager
def quick_network(bridge: str, ns: str, address: str, gateway: str) -> Iterator[str]:
    """BRIDGE on the host and namespace NS whose host0 has ADDRESS and a default route via
    GATEWAY, set from the host (networkd cannot run under qemu-user); all removed on exit.

    The bridge has no address: the container reaches nothing on the host's network. The route
    gives the agent what a Pi's DHCP lease gives it, a default-route interface to publish on.
    """
    nspawn.create_bridge(bridge)
    try:
        nspawn.create_netns(ns, bridge=bridge, address=address)
        try:
            nspawn.ip("-n", ns, "route", "add", "default", "via", gateway)
            yield ns
        finally:
            nspawn.delete_netns(ns)
    finally:
        nspawn.delete_link(bridge)


def poweroff_inside(node: nspawn.Container, timeout: float = POWEROFF_TIMEOUT) -> bool:
    """`systemctl poweroff` inside NODE; True if the container ended by itself within TIMEOUT.

    Not Container.poweroff(): its SIGRTMIN+4 reaches a systemd run by qemu-user as another
    signal (qemu-user remaps the host's real-time signals), so no power-off starts. Whatever
    is left after TIMEOUT is SIGKILLed (Container.kill) either way.
    """
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired, nspawn.BootError):
        node.run("systemctl", "poweroff", "--no-block", timeout=min(30.0, timeout))
    while node.alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    clean = not node.alive()
    node.kill()
    return clean


# -- the kernel-bearing rootfs (full tier) ------------------------------------------------------

# On top of rootfs.PACKAGES: Debian's arm64 kernel and what boots it from an initramfs.
KERNEL_PACKAGES: tuple[str, ...] = ("initramfs-tools", "kmod", "linux-image-arm64", "udev")
# What the initramfs needs to find and mount / on qemu's virt board: the PCI virtio transport,
# the disk, ext4 (its crc32c and jbd2 come along as dependencies). MODULES=list takes only
# these; Debian's default MODULES=most, built under qemu-user, cost a trial build 33 minutes.
INITRAMFS_MODULES: tuple[str, ...] = ("virtio_pci", "virtio_mmio", "virtio_blk", "ext4")
INITRAMFS_CONF = "etc/initramfs-tools/conf.d/90-sugarkube-image.conf"
INITRAMFS_MODULES_FILE = "etc/initramfs-tools/modules"
# Bumped when the kernel rootfs recipe changes in a way the key would not otherwise see.
KERNEL_RECIPE_VERSION = 1
KERNEL_BUILD_TIMEOUT = 3600.0  # s for a cold build: ~250 packages configured under qemu-user
KERNEL_LOCK_TIMEOUT = KERNEL_BUILD_TIMEOUT + 60.0


def kernel_packages(packages: Sequence[str] = PACKAGES) -> list[str]:
    """PACKAGES plus KERNEL_PACKAGES, sorted, each once."""
    return sorted({*packages, *KERNEL_PACKAGES})


def kernel_tarball_path(packages: Sequence[str] = PACKAGES) -> Path:
    """Where kernel_tarball() keeps the arm64 rootfs with a kernel (it may not exist yet)."""
    blob = json.dumps(
        {
            "base": cache_key(ARCH, packages=kernel_packages(packages)),
            "initramfs_modules": list(INITRAMFS_MODULES),
            "recipe": KERNEL_RECIPE_VERSION,
        },
        sort_keys=True,
    )
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return CACHE_DIR / f"{SUITE}-{ARCH}-kernel-{key}.tar"


def kernel_tarball(
    packages: Sequence[str] = PACKAGES, *, timeout: float = KERNEL_BUILD_TIMEOUT
) -> Path:
    """The cached bookworm arm64 rootfs of PACKAGES plus Debian's arm64 kernel and initramfs.

    Built like rootfs.base_tarball() (same variant, mirrors, options), with one difference that
    base_tarball() cannot express: an essential hook configures initramfs-tools before the
    kernel package is unpacked, so the one initramfs built (in the kernel's postinst, under
    qemu-user) is the minimal MODULES=list one. dpkg keeps the pre-written
    /etc/initramfs-tools/modules over the package's (force-confold) instead of asking.
    Written under a temporary name and renamed; a lock serialises concurrent builders.
    """
    final = kernel_tarball_path(packages)
    if final.is_file():
        return final
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with _locked(final.with_suffix(".lock"), KERNEL_LOCK_TIMEOUT):
        if final.is_file():
            return final
        ensure_binfmt_aarch64()
        tmp = final.with_name(f".{final.stem}.{os.getpid()}.tmp.tar")
        modules = "\\n".join(INITRAMFS_MODULES)
        argv = [
            "mmdebstrap",
            f"--variant={VARIANT}",
            f"--architectures={ARCH}",
            f"--include={','.join(kernel_packages(packages))}",
            '--aptopt=APT::Install-Recommends "false"',
            '--aptopt=Acquire::Languages "none"',
            "--dpkgopt=force-confold",
            '--essential-hook=mkdir -p "$1/etc/initramfs-tools/conf.d"',
            "--essential-hook=printf '# tests/image/arm64.py: only the modules listed in "
            "../modules\\nMODULES=list\\n' > \"$1/" + INITRAMFS_CONF + '"',
            f"--essential-hook=printf '{modules}\\n' > \"$1/{INITRAMFS_MODULES_FILE}\"",
            '--customize-hook=truncate -s 0 "$1/etc/machine-id"',
            SUITE,
            str(tmp),
            *MIRRORS,
        ]
        try:
            _run(argv, timeout=timeout, what=f"building the {SUITE} {ARCH} rootfs with a kernel")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    return final


# -- the full tier: an ext4 image booted by qemu-system-aarch64 --------------------------------

QEMU_SYSTEM = "qemu-system-aarch64"
GUEST_IFNAME = "eth0"  # net.ifnames=0 on the kernel command line: the name a Pi's NIC has
# qemu's user-mode network (slirp) is 10.0.2.0/24 with its gateway at .2; restrict=on keeps
# every packet inside qemu (nothing reaches the host's network or beyond).
GUEST_ADDRESS = "10.0.2.15/24"
GUEST_GATEWAY = "10.0.2.2"
GUEST_NETWORK_FILE = "etc/systemd/network/10-sugarkube-image-eth0.network"
FSTAB = "/dev/vda / ext4 rw,errors=remount-ro 0 0\n"
KERNEL_CMDLINE = (
    "root=/dev/vda",
    "rootfstype=ext4",
    "rw",
    "console=ttyAMA0",
    "net.ifnames=0",
    "panic=-1",  # with -no-reboot: a panic ends qemu at once instead of at the timeout
)
QEMU_MEMORY = "1024"  # MiB
QEMU_CPUS = "2"
MKFS_TIMEOUT = 300.0  # s
BOOT_TIMEOUT = 420.0  # s from qemu's start to power-off (measured ~45 s; TCG on a busy host)
KILL_TIMEOUT = 10.0  # s for a SIGKILLed qemu to be reaped

PROBE_UNIT_NAME = "sugarkube-image-probe.service"
PROBE_PATH = "usr/local/sbin/sugarkube-image-probe"
PROBE_MARK = "SKPROBE"
STATUS_MARK = "SKSTATUS"
JOURNAL_MARK = "SKJOURNAL"
PROBE_AGENT_WAIT = 180  # s the probe waits for the agent to settle (active, or restarted twice)
# The probe: wait for the boot jobs, then for the agent to settle, print what the test asserts
# on (one "SKPROBE key=value" line each, `systemctl status` prefixed "SKSTATUS ", the unit's
# last journal lines, all invocations, "SKJOURNAL "), power off.
PROBE_SCRIPT = f"""#!/bin/sh
# tests/image/arm64.py: report the agent on the console, then power the machine off.
timeout 300 systemctl is-system-running --wait >/dev/null 2>&1
i=0
while [ "$i" -lt {PROBE_AGENT_WAIT} ]; do
    state=$(systemctl show -P ActiveState sugarkube-agent.service)
    restarts=$(systemctl show -P NRestarts sugarkube-agent.service)
    [ "$state" = active ] && break
    [ "${{restarts:-0}}" -ge 2 ] && break
    sleep 1
    i=$((i + 1))
done
p() {{ echo "{PROBE_MARK} $1=$2"; }}
p begin "$(cut -d' ' -f1 /proc/uptime)"
p uname-m "$(uname -m)"
p kernel "$(uname -r)"
p system "$(systemctl is-system-running)"
p is-active "$(systemctl is-active sugarkube-agent.service)"
p show "$(systemctl show -p ActiveState,SubState,Result,NRestarts,ExecMainStatus \\
    sugarkube-agent.service | tr '\\n' ',')"
p failed "$(systemctl --failed --plain --no-legend | cut -d' ' -f1 | tr '\\n' ' ')"
p default-route "$(ip -4 route show default | tr '\\n' ' ')"
p links "$(ip -brief link | cut -d' ' -f1 | tr '\\n' ' ')"
SYSTEMD_COLORS=0 systemctl status --no-pager --full --lines=15 sugarkube-agent.service 2>&1 \\
    | sed 's/^/{STATUS_MARK} /'
journalctl --no-pager --quiet --output=short-monotonic --lines=25 --unit=sugarkube-agent.service \\
    | sed 's/^/{JOURNAL_MARK} /'
p end "$(cut -d' ' -f1 /proc/uptime)"
systemctl poweroff --no-block
"""
PROBE_UNIT = f"""[Unit]
Description=sugarkube image test: report the agent on the console, then power off
After=multi-user.target

[Service]
# exec, not oneshot: the probe's own job is done once it runs, so `is-system-running --wait`
# inside it sees the boot finish instead of waiting for itself.
Type=exec
ExecStart=/{PROBE_PATH}
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console
TTYReset=no
TTYVHangup=no

[Install]
WantedBy=multi-user.target
"""


def qemu_system_available() -> str | None:
    """None if qemu-system-aarch64 is installed, else why the full tier cannot run."""
    if shutil.which(QEMU_SYSTEM) is None:
        return f"{QEMU_SYSTEM} is not installed (apt-get install qemu-system-arm)"
    return None


def guest_network_config(address: str = GUEST_ADDRESS, gateway: str = GUEST_GATEWAY) -> str:
    """systemd-networkd's static configuration of the guest's eth0 (no DHCP to wait for)."""
    return "\n".join(
        [
            "[Match]",
            f"Name={GUEST_IFNAME}",
            "",
            "[Network]",
            f"Address={address}",
            f"Gateway={gateway}",
            "DHCP=no",
            "IPv6AcceptRA=no",
            "LLMNR=no",
            "MulticastDNS=no",
            "",
            "[Link]",
            "Multicast=yes",
            "",
        ]
    )


@dataclass
class GuestImage:
    """What qemu boots: the root as an ext4 image, and the kernel and initrd taken out of it."""

    disk: Path
    kernel: Path
    initrd: Path


def _newest(boot: Path, prefix: str) -> Path:
    """BOOT/PREFIX-<version> of the newest kernel version; ImageError if there is none."""
    found = sorted(p for p in boot.glob(f"{prefix}-*") if p.is_file())
    if not found:
        raise ImageError(f"no {prefix}-* in {boot}")
    return found[-1]


def make_guest_image(
    tarball: Path,
    workdir: Path,
    debs: Sequence[Path],
    hostname: str,
    *,
    files: Mapping[str, str | bytes] | None = None,
) -> GuestImage:
    """Turn TARBALL (a kernel_tarball()) into an ext4 disk image booting HOSTNAME with DEBS.

    The root is prepared in WORKDIR/root with rootfs.make_root (DEBS installed through
    qemu-user, the boot trimmed), gets the agent's environment file, an fstab, networkd for
    eth0 and the probe unit, then becomes WORKDIR/root.ext4 through `mkfs.ext4 -d` (no loop
    device, no mount). The directory is removed afterwards; the kernel and initrd are copied
    next to the image.
    """
    root = workdir / "root"
    make_root(
        tarball,
        root,
        debs,
        hostname,
        files={
            "etc/fstab": FSTAB,
            GUEST_NETWORK_FILE: guest_network_config(),
            **(files or {}),
        },
        units={PROBE_UNIT_NAME: PROBE_UNIT},
    )
    try:
        probe = root / PROBE_PATH
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(PROBE_SCRIPT)
        probe.chmod(0o755)
        write_agent_defaults(root)
        _run(
            ["systemctl", f"--root={root}", "--quiet", "enable", "systemd-networkd.service"],
            timeout=60,
            what="enabling systemd-networkd",
        )
        kernel = workdir / "vmlinuz"
        initrd = workdir / "initrd.img"
        shutil.copyfile(_newest(root / "boot", "vmlinuz"), kernel)
        shutil.copyfile(_newest(root / "boot", "initrd.img"), initrd)
        used = int(
            _run(
                ["du", "-s", "--block-size=1M", str(root)], timeout=120, what="sizing the root"
            ).stdout.split()[0]
        )
        disk = workdir / "root.ext4"
        disk.unlink(missing_ok=True)
        with disk.open("wb") as f:
            f.truncate((used + used // 2 + 512) * 1024 * 1024)  # sparse: +50 % and 512 MiB free
        _run(
            ["mkfs.ext4", "-q", "-F", "-L", "sugarkube-root", "-d", str(root), str(disk)],
            timeout=MKFS_TIMEOUT,
            what=f"making {disk}",
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return GuestImage(disk=disk, kernel=kernel, initrd=initrd)


def qemu_argv(
    image: GuestImage, console: Path, *, nic: bool = True, extra_cmdline: Sequence[str] = ()
) -> list[str]:
    """The qemu-system-aarch64 command line booting IMAGE, serial console to CONSOLE.

    Software emulation (TCG; no KVM on these machines) of a Cortex-A72 on qemu's virt board;
    the kernel booted directly (-kernel/-initrd: no firmware). NIC: one virtio-net on qemu's
    restricted user-mode network, else no network device at all (only `lo` in the guest).
    EXTRA_CMDLINE: more kernel command-line words (such as systemd.mask=UNIT).
    -no-reboot makes a reboot or a panic (panic=-1) end qemu like a power-off does.
    """
    argv = [
        QEMU_SYSTEM,
        "-M", "virt",
        "-cpu", "cortex-a72",
        "-smp", QEMU_CPUS,
        "-m", QEMU_MEMORY,
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-monitor", "none",
        "-serial", f"file:{console}",
        "-no-reboot",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initrd),
        "-append", " ".join([*KERNEL_CMDLINE, *extra_cmdline]),
        "-drive", f"file={image.disk},format=raw,if=virtio,cache=unsafe",
        "-device", "virtio-rng-pci",
    ]  # fmt: skip
    if nic:
        # romfile= (none): the NIC's iPXE option ROM is for firmware, and there is none here.
        argv += [
            "-netdev", "user,id=net0,restrict=on",
            "-device", "virtio-net-pci,netdev=net0,romfile=",
        ]  # fmt: skip
    else:
        argv += ["-nic", "none"]
    return argv


@dataclass
class GuestRun:
    """One qemu boot: how it ended, how long it took, what the console said."""

    returncode: int | None  # None: killed at the timeout
    seconds: float  # qemu's start to its exit (or to the kill)
    console: str
    probe: dict[str, str]  # the probe's "SKPROBE key=value" lines
    status: str  # the probe's `systemctl status sugarkube-agent`
    journal: str  # the probe's last journal lines of sugarkube-agent (every invocation)

    @property
    def powered_off(self) -> bool:
        """True when the guest ended qemu by itself (power-off) and the probe reported."""
        return self.returncode == 0 and "end" in self.probe

    def console_tail(self, lines: int = 60) -> str:
        """The last LINES lines of the console."""
        return "\n".join(self.console.splitlines()[-lines:])


_PROBE_LINE = re.compile(rf"{PROBE_MARK} ([a-z-]+)=(.*)$")
_BLOCK_LINE = re.compile(rf"({STATUS_MARK}|{JOURNAL_MARK})(?: (.*))?$")


def parse_console(console: str) -> tuple[dict[str, str], str, str]:
    """The probe's key=value lines, status block and journal block, out of the console's text.

    Markers are searched anywhere in a line: systemd's status spinner (escape sequences, no
    newline) may sit in front of a probe line on the serial console.
    """
    probe: dict[str, str] = {}
    blocks: dict[str, list[str]] = {STATUS_MARK: [], JOURNAL_MARK: []}
    for line in console.replace("\r", "\n").splitlines():
        match = _PROBE_LINE.search(line)
        if match:
            probe[match.group(1)] = match.group(2).strip()
            continue
        match = _BLOCK_LINE.search(line)
        if match:
            blocks[match.group(1)].append(match.group(2) or "")
    return probe, "\n".join(blocks[STATUS_MARK]), "\n".join(blocks[JOURNAL_MARK])


def boot_guest(
    image: GuestImage,
    console: Path,
    *,
    nic: bool = True,
    extra_cmdline: Sequence[str] = (),
    timeout: float = BOOT_TIMEOUT,
) -> GuestRun:
    """Boot IMAGE under qemu-system-aarch64 until it powers off; SIGKILL it after TIMEOUT.

    qemu runs in its own session; only its PID is ever signalled, and it is reaped here
    whatever happens (an exception in the caller's thread included).
    """
    console.unlink(missing_ok=True)
    qemu_log = console.with_name(console.name + ".qemu")
    started = time.monotonic()
    with qemu_log.open("wb") as log:
        proc = subprocess.Popen(
            qemu_argv(image, console, nic=nic, extra_cmdline=extra_cmdline),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        returncode: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        returncode = None
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=KILL_TIMEOUT)
    seconds = time.monotonic() - started
    text = console.read_bytes().decode("utf-8", "replace") if console.exists() else ""
    qemu_text = qemu_log.read_text(errors="replace").strip()
    if qemu_text:
        text += f"\n[qemu] {qemu_text}\n"
    probe, status, journal = parse_console(text)
    return GuestRun(
        returncode=returncode,
        seconds=seconds,
        console=text,
        probe=probe,
        status=status,
        journal=journal,
    )
