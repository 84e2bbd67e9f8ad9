"""Debian bookworm root filesystems for the boot tests: built once with mmdebstrap, cached.

`base_tarball()` builds (or finds in the cache) a bootable bookworm rootfs as a plain tar;
`make_root()` unpacks it into a directory, gives it its own hostname and machine-id, installs the
.deb files under test with dpkg, and trims the boot to what a test needs (multi-user.target, no
getty, a volatile journal, optional static address on `host0` through systemd-networkd).

Why a tarball cache: the cold mmdebstrap run downloads and installs ~200 packages (minutes); a
warm run is one `tar -x` (about a second). The cache key hashes everything that changes the result
(architecture, suite, variant, package list, mirrors), so editing `PACKAGES` builds a new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

CACHE_DIR = Path("/var/cache/sugarkube-image")
SUITE = "bookworm"
# minbase = Essential + Priority: required + apt; systemd-sysv below makes systemd the init.
VARIANT = "minbase"
MIRRORS: tuple[str, ...] = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
# Everything a booted node needs: systemd as PID 1, the bus, avahi, and exactly the Debian
# packages our .deb Depends on (so `dpkg -i` needs no network, and a missing Depends fails the
# boot tests) plus its Recommends (python3-scapy), as pi-gen's stage installs them.
# python3-pyroute2 and python3-sdnotify stay out: only our tests use them, never the agent.
# python3-cryptography is for the lab's k3s stand-in.
PACKAGES: tuple[str, ...] = (
    "avahi-daemon",
    "avahi-utils",
    "ca-certificates",
    "dbus",
    "iproute2",
    "nftables",
    "python3",
    "python3-cryptography",
    "python3-gi",
    "python3-prometheus-client",
    "python3-pydbus",
    "python3-scapy",
    "python3-yaml",
    "python3-zeroconf",
    "systemd",
    "systemd-sysv",
)
# Bumped when the build recipe below changes in a way the key would not otherwise see.
RECIPE_VERSION = 2

BUILD_TIMEOUT = 1800.0  # s for a cold mmdebstrap run (downloads included)
UNPACK_TIMEOUT = 300.0  # s for `tar -x` of one root
DPKG_TIMEOUT = 300.0  # s for installing the .deb files
SYSTEMCTL_TIMEOUT = 60.0  # s for one offline `systemctl --root`
LOCK_TIMEOUT = BUILD_TIMEOUT + 60.0  # s to wait for another process building the same tarball

# Units a test never wants at boot: gettys wait on consoles nobody reads, timers run apt, man-db
# and fsck jobs at random moments in the middle of a test.
MASKED_UNITS: tuple[str, ...] = (
    "getty.target",
    "console-getty.service",
    "getty@tty1.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "man-db.timer",
    "systemd-tmpfiles-clean.timer",
)
HOST_IFNAME = "host0"  # the container's end of a veth, as systemd-nspawn names it
NETWORK_FILE = "etc/systemd/network/10-sugarkube-image-host0.network"


class ImageError(RuntimeError):
    """A rootfs could not be built or prepared; the message says which step and why."""


def cache_key(
    arch: str,
    *,
    suite: str = SUITE,
    packages: Sequence[str] = PACKAGES,
    mirrors: Sequence[str] = MIRRORS,
) -> str:
    """Hex digest naming the tarball for these inputs (package order does not matter)."""
    blob = json.dumps(
        {
            "arch": arch,
            "suite": suite,
            "variant": VARIANT,
            "packages": sorted(set(packages)),
            "mirrors": list(mirrors),
            "recipe": RECIPE_VERSION,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tarball_path(
    arch: str = "amd64",
    *,
    suite: str = SUITE,
    packages: Sequence[str] = PACKAGES,
    mirrors: Sequence[str] = MIRRORS,
) -> Path:
    """Where base_tarball() keeps the tarball for these inputs (it may not exist yet)."""
    key = cache_key(arch, suite=suite, packages=packages, mirrors=mirrors)
    return CACHE_DIR / f"{suite}-{arch}-{key}.tar"


def _run(argv: Sequence[str], *, timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    """Run ARGV; ImageError with its last output lines if it fails or outlives TIMEOUT."""
    try:
        done = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{what}: `{argv[0]}` hung for {timeout:g} s") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise ImageError(f"{what}: `{' '.join(argv)}` exited {done.returncode}:\n{tail}")
    return done


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    """Hold an exclusive flock on PATH, so two test processes never build the same tarball."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # flock has no timeout of its own: poll it non-blocking.
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ImageError(f"{path} stayed locked for {timeout:g} s") from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def check_arch(arch: str) -> None:
    """ImageError unless this machine can run ARCH binaries (natively or through binfmt)."""
    done = subprocess.run(
        ["arch-test", arch], capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise ImageError(
            f"cannot run {arch} binaries here ({done.stdout.strip() or done.stderr.strip()}); "
            "install qemu-user-static and binfmt-support for a foreign architecture"
        )


def base_tarball(
    arch: str = "amd64",
    *,
    packages: Sequence[str] = PACKAGES,
    suite: str = SUITE,
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = BUILD_TIMEOUT,
) -> Path:
    """The cached bookworm rootfs tarball for ARCH with PACKAGES, built with mmdebstrap if absent.

    A second call with the same inputs returns the cached file at once. The tarball is written
    to a temporary name in the cache directory and renamed into place, so a crash or a timeout
    never leaves a truncated tarball under the final name; a lock file serialises concurrent
    builders (the second one finds the first one's result).
    """
    final = tarball_path(arch, suite=suite, packages=packages, mirrors=mirrors)
    if final.is_file():
        return final
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with _locked(final.with_suffix(".lock"), LOCK_TIMEOUT):
        if final.is_file():  # built by whoever held the lock before us
            return final
        check_arch(arch)
        # mmdebstrap picks the output format from the extension, so the temp name ends in .tar.
        tmp = final.with_name(f".{final.stem}.{os.getpid()}.tmp.tar")
        argv = [
            "mmdebstrap",
            f"--variant={VARIANT}",
            f"--architectures={arch}",
            f"--include={','.join(sorted(set(packages)))}",
            '--aptopt=APT::Install-Recommends "false"',
            '--aptopt=Acquire::Languages "none"',
            # An empty machine-id in the tarball: make_root() writes each node's own.
            '--customize-hook=truncate -s 0 "$1/etc/machine-id"',
            suite,
            str(tmp),
            *mirrors,
        ]
        try:
            _run(argv, timeout=timeout, what=f"building the {suite} {arch} rootfs")
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    return final


def _systemctl(root: Path, *args: str) -> None:
    """Offline `systemctl --root=ROOT ARGS` (works without a running systemd on the host)."""
    _run(
        ["systemctl", f"--root={root}", "--quiet", *args],
        timeout=SYSTEMCTL_TIMEOUT,
        what=f"systemctl {' '.join(args)} in {root}",
    )


def _write(path: Path, content: str | bytes, mode: int = 0o644) -> None:
    """Write CONTENT to PATH (parents created) with MODE."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    path.chmod(mode)


def _inside(root: Path, rel: str) -> Path:
    """ROOT/REL, refusing a REL that would climb out of ROOT."""
    path = (root / rel.lstrip("/")).resolve()
    if path != root.resolve() and root.resolve() not in path.parents:
        raise ValueError(f"{rel!r} is outside the root {root}")
    return path


def install_debs(root: Path, debs: Sequence[Path], *, timeout: float = DPKG_TIMEOUT) -> None:
    """`dpkg -i` DEBS inside ROOT, run by systemd-nspawn (not booted) with no network.

    Why nspawn rather than chroot: it mounts /proc, /sys, /dev and /run for the maintainer
    scripts and undoes it all when dpkg exits, so nothing can stay mounted on failure. The
    postinst's deb-systemd-helper enables units; deb-systemd-invoke starts nothing, since no
    systemd runs in the root. Dependencies must already be in the root (see PACKAGES): dpkg
    fails, with its message in the ImageError, rather than fetching anything.
    """
    if not debs:
        return
    staging = root / "var/cache/sugarkube-image-debs"
    staging.mkdir(parents=True, exist_ok=True)
    inside: list[str] = []
    for deb in debs:
        if not deb.is_file():
            raise ImageError(f"no such .deb: {deb}")
        shutil.copy2(deb, staging / deb.name)
        inside.append(f"/var/cache/sugarkube-image-debs/{deb.name}")
    try:
        _run(
            [
                "systemd-nspawn",
                "--quiet",
                f"--directory={root}",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--console=pipe",
                "--link-journal=no",
                "--setenv=DEBIAN_FRONTEND=noninteractive",
                "--setenv=PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "dpkg",
                "--install",
                *inside,
            ],
            timeout=timeout,
            what=f"installing {', '.join(d.name for d in debs)} in {root}",
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def network_config(address: str, gateway: str | None = None) -> str:
    """A systemd-networkd .network giving host0 the static ADDRESS (CIDR, e.g. 10.249.0.11/24).

    No DHCP and no router advertisements: the lab has neither, and waiting for them would only
    slow `network-online.target`. IPv6 link-local stays on, as on a Pi (avahi uses it too).
    """
    if "/" not in address:
        raise ValueError(f"address {address!r} needs a prefix length, such as 10.249.0.11/24")
    lines = [
        "[Match]",
        f"Name={HOST_IFNAME}",
        "",
        "[Network]",
        f"Address={address}",
        "DHCP=no",
        "IPv6AcceptRA=no",
        "MulticastDNS=no",  # avahi owns port 5353; resolved is not installed anyway
        "LLMNR=no",
    ]
    if gateway:
        lines.append(f"Gateway={gateway}")
    lines += ["", "[Link]", "Multicast=yes", ""]
    return "\n".join(lines)


def make_root(
    tarball: Path,
    dest: Path,
    debs: Sequence[Path],
    hostname: str,
    *,
    address: str | None = None,
    gateway: str | None = None,
    units: Mapping[str, str] | None = None,
    files: Mapping[str, str | bytes] | None = None,
    machine_id: str | None = None,
    masked: Sequence[str] = (),
) -> Path:
    """Unpack TARBALL into DEST (new or empty) as a bootable node named HOSTNAME; return DEST.

    - /etc/hostname and /etc/hosts carry HOSTNAME; /etc/machine-id gets MACHINE_ID or a fresh
      random one, so every node is distinct and systemd skips its first-boot work.
    - DEBS are installed with dpkg (see install_debs).
    - Boot is trimmed: default target multi-user.target, MASKED_UNITS and MASKED masked (no
      getty waits on the console), journal kept in memory.
    - ADDRESS (CIDR): systemd-networkd is enabled and gives the veth `host0` that address (and
      GATEWAY if given); without it networkd stays off and host0, if any, is left alone.
    - FILES (path inside the root -> content) are written before UNITS (unit file name ->
      content), which go to /etc/systemd/system and are enabled offline, so a unit's [Install]
      section decides what pulls it in.
    """
    if dest.exists() and any(dest.iterdir()):
        raise ImageError(f"{dest} is not empty")
    dest.mkdir(parents=True, exist_ok=True)
    _run(
        [
            "tar",
            "--extract",
            f"--file={tarball}",
            f"--directory={dest}",
            "--numeric-owner",
            "--preserve-permissions",
            "--xattrs",
            "--xattrs-include=*",
        ],
        timeout=UNPACK_TIMEOUT,
        what=f"unpacking {tarball}",
    )
    _write(dest / "etc/hostname", f"{hostname}\n")
    hosts = dest / "etc/hosts"
    old = hosts.read_text() if hosts.exists() else "127.0.0.1\tlocalhost\n"
    kept = [line for line in old.splitlines() if not line.startswith("127.0.1.1")]
    _write(hosts, "\n".join([*kept, f"127.0.1.1\t{hostname}", ""]))
    _write(dest / "etc/machine-id", f"{machine_id or uuid.uuid4().hex}\n", 0o444)
    _write(
        dest / "etc/systemd/journald.conf.d/50-sugarkube-image.conf",
        "[Journal]\nStorage=volatile\n",
    )
    install_debs(dest, list(debs))
    _systemctl(dest, "set-default", "multi-user.target")
    _systemctl(dest, "mask", *MASKED_UNITS, *masked)
    if address:
        _write(dest / NETWORK_FILE, network_config(address, gateway))
        _systemctl(dest, "enable", "systemd-networkd.service")
    for rel, content in (files or {}).items():
        _write(_inside(dest, rel), content)
    for name, content in (units or {}).items():
        if "/" in name:
            raise ValueError(f"unit name {name!r} must be a plain file name")
        _write(dest / "etc/systemd/system" / name, content)
    if units:
        _systemctl(dest, "enable", *units)
    return dest


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4G") -> Iterator[Path]:
    """Mount a fresh tmpfs at PATH (created if needed) for roots; unmount and remove it on exit.

    Why: unpacking the ~280 MB, ~15k-file tarball takes 0.2-0.3 s into tmpfs but 1-5 s onto
    this machine's ext4 (discard, shared disk), and removing it afterwards is free. Each root
    costs ~300 MB of RAM while mounted. Containers using it must be stopped before exit.
    """
    path.mkdir(parents=True, exist_ok=True)
    _run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "sugarkube-image", str(path)],
        timeout=SYSTEMCTL_TIMEOUT,
        what=f"mounting a tmpfs on {path}",
    )
    try:
        yield path
    finally:
        done = subprocess.run(
            ["umount", str(path)], capture_output=True, timeout=SYSTEMCTL_TIMEOUT, check=False
        )
        if done.returncode != 0:  # still busy (a container left running): detach it anyway
            subprocess.run(
                ["umount", "--lazy", str(path)],
                capture_output=True,
                timeout=SYSTEMCTL_TIMEOUT,
                check=False,
            )
        with contextlib.suppress(OSError):
            path.rmdir()


def remove_root(dest: Path) -> None:
    """Delete a root made by make_root (after its container is gone); quiet if absent."""
    shutil.rmtree(dest, ignore_errors=True)
