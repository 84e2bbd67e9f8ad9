"""The Debian package as dpkg sees it: fields, files, conffiles, maintainer scripts."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.image.conftest import REPO

pytestmark = pytest.mark.image

# Debian's names for what the agent imports, and nftables: the kube-proxy drop-in we ship
# selects nftables mode, which needs a working `nft` (a node without one does not stand).
# pyroute2 and sdnotify are the tests' alone.
RUNTIME_DEPENDS = {
    "avahi-daemon",
    "dbus",
    "nftables",
    "python3 (>= 3.11)",
    "python3-gi",
    "python3-prometheus-client",
    "python3-pydbus",
    "python3-yaml",
    "python3-zeroconf",
}
CONFFILES = {
    "/etc/default/sugarkube-agent",
    "/etc/rancher/k3s/config.yaml.d/10-kube-proxy.yaml",
    "/etc/sugarkube/agent.yaml",
    "/etc/sugarkube/checks.d/example.yaml.disabled",
}


def _field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def _contents(deb: Path) -> dict[str, str]:
    """path -> mode string, from `dpkg-deb -c`."""
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    entries = {}
    for line in listing.splitlines():
        fields = line.split(maxsplit=5)
        entries[fields[5].split(" -> ")[0].removeprefix(".")] = fields[0]
    return entries


def test_name_version_and_dependencies(deb: Path) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert deb.name == f"sugarkube-agent_{version}_all.deb"
    assert _field(deb, "Version") == version
    assert _field(deb, "Architecture") == "all"
    depends = {dep.strip() for dep in _field(deb, "Depends").split(",")}
    assert depends >= RUNTIME_DEPENDS
    extra = depends - RUNTIME_DEPENDS
    assert all(dep.startswith("python3:any") for dep in extra), extra  # dh-python's own
    assert _field(deb, "Recommends") == "python3-scapy"


def test_files_where_systemd_and_the_operator_expect_them(deb: Path) -> None:
    files = _contents(deb)
    for path in ("/usr/bin/sugarkube-agent", "/usr/bin/pi_node_verifier.sh"):
        assert files[path].startswith("-rwxr-xr-x"), path
    assert files["/etc/default/sugarkube-agent"] == "-rw-------"  # may hold the token
    assert "/lib/systemd/system/sugarkube-agent.service" in files
    for unit in ("k3s", "k3s-agent"):
        assert f"/usr/lib/systemd/system/{unit}.service.d/10-sugarkube-gate.conf" in files
    assert "/usr/share/man/man8/sugarkube-agent.8.gz" in files
    assert "/usr/lib/python3/dist-packages/agent/cli.py" in files
    assert not [p for p in files if "__pycache__" in p or p.endswith(".pyc")]


def test_conffiles_and_the_unit_enabled_not_started(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path)], check=True)
    assert set((tmp_path / "conffiles").read_text().split()) == CONFFILES
    postinst = (tmp_path / "postinst").read_text()
    assert "deb-systemd-helper enable 'sugarkube-agent.service'" in postinst
    assert "try-restart 'sugarkube-agent.service'" in postinst  # upgrades restart a running one
    assert "deb-systemd-invoke start" not in postinst  # a fresh install waits for the boot
    assert "rm -rf /var/lib/sugarkube /run/sugarkube" in (tmp_path / "postrm").read_text()


def test_lintian_reports_no_errors(deb: Path) -> None:
    result = subprocess.run(
        ["lintian", "--fail-on", "error,warning", str(deb)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_pi_gen_stage_passes_shellcheck() -> None:
    stage = REPO / "image" / "pi-gen" / "stage-sugarkube"
    scripts = [
        stage / "prerun.sh",
        stage / "00-sugarkube" / "00-run.sh",
        REPO / "image" / "pi_node_verifier.sh",
    ]  # each by its own #! line
    sourced = stage / "EXPORT_IMAGE"  # pi-gen's bash sources it
    for args in ([*map(str, scripts)], ["-s", "bash", str(sourced)]):
        result = subprocess.run(["shellcheck", *args], capture_output=True, text=True, check=False)
        assert result.returncode == 0, result.stdout
