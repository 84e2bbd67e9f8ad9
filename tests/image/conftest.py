"""Fixtures of the image tests: the Debian package, built once per session the way `make deb`
builds it, and handed to the pi-gen stage's files/ (`make pi-gen-stage`)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.image import rootfs

REPO = Path(__file__).resolve().parents[2]
STAGE = REPO / "image" / "pi-gen" / "stage-sugarkube"
STAGE_FILES = STAGE / "00-sugarkube" / "files"


TOOLS = ("dpkg-buildpackage", "lintian", "shellcheck", "mmdebstrap", "systemd-nspawn", "nsenter")


@pytest.fixture(autouse=True)
def _image_tools() -> None:
    """Skip, saying why, where the image tests cannot run (`make test` installs the tools)."""
    if os.geteuid() != 0:
        pytest.skip("the image tests need root (network namespaces, systemd-nspawn)")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"missing {', '.join(missing)}: run `make deb-deps` (as root)")


@pytest.fixture(scope="session")
def deb() -> Path:
    """The .deb in the pi-gen stage's files/: the very file the stage installs into the image."""
    made = subprocess.run(
        ["make", "-s", "pi-gen-stage"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    (path,) = STAGE_FILES.glob("sugarkube-agent_*_all.deb")
    return path


@pytest.fixture
def image_tmp() -> Iterator[Path]:
    with rootfs.tmpfs(Path("/run/skimg-roots")) as path:
        yield path


def in_root(root: Path, *cmd: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run cmd inside root, not booted (a systemd-nspawn without network)."""
    return subprocess.run(["systemd-nspawn", "-q", "-D", str(root), "--register=no",
                           "--keep-unit", "--private-network", "--console=pipe", *cmd],
                          capture_output=True, text=True, timeout=timeout, check=False)


def stage_install(root: Path) -> None:
    """Run the pi-gen stage's 00-run.sh against root, as pi-gen would (its on_chroot: a shell in
    the root; here a non-booted systemd-nspawn without network, which needs none, reading the
    script on stdin: --console=pipe, as the default read-only console would not pass it)."""
    script = ('on_chroot() { systemd-nspawn -q -D "$ROOTFS_DIR" --register=no --keep-unit '
              '--private-network --console=pipe /bin/bash -e; }; export -f on_chroot; '
              'exec ./00-run.sh')
    done = subprocess.run(["bash", "-c", script], cwd=STAGE / "00-sugarkube", text=True,
                          capture_output=True, timeout=300, check=False,
                          env={**os.environ, "ROOTFS_DIR": str(root)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "enabled" in done.stdout  # the stage's own check: systemctl is-enabled
