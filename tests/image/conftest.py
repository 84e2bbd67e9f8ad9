"""Fixtures of the image tests: the Debian package, built once per session the way `make deb`
builds it, and handed to the pi-gen stage's files/ (`make pi-gen-stage`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STAGE = REPO / "image" / "pi-gen" / "stage-sugarkube"
STAGE_FILES = STAGE / "00-sugarkube" / "files"


@pytest.fixture(scope="session")
def deb() -> Path:
    """The .deb in the pi-gen stage's files/: the very file the stage installs into the image."""
    made = subprocess.run(["make", "-s", "pi-gen-stage"], cwd=REPO, capture_output=True,
                          text=True, timeout=900, check=False)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-2000:]
    (path,) = STAGE_FILES.glob("sugarkube-agent_*_all.deb")
    return path
