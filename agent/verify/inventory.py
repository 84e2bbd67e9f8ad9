"""What the report says about the node besides its checks: host, kernel, hardware, migrations."""

from __future__ import annotations

from dataclasses import dataclass

from agent import const
from agent.verify.probe import Probe
from agent.verify.result import Unavailable, one_line

UNKNOWN = "unknown"
# The Pi's device-tree model (what pi_node_verifier.sh printed), then the DMI name of other boards.
_MODEL_FILES = (
    "/proc/device-tree/model",
    "/sys/firmware/devicetree/base/model",
    "/sys/devices/virtual/dmi/id/product_name",
)


@dataclass(frozen=True)
class Inventory:
    """The report's bullets: host name, `uname -sr`, and the device-tree model."""

    hostname: str
    kernel: str
    hardware: str


def _first(probe: Probe, path: str) -> str:
    """The first line of `path`, NULs dropped, or '' when it cannot be read."""
    try:
        text = probe.read_optional(path) or ""
    except Unavailable:
        return ""
    return one_line(text.replace("\x00", "").split("\n", 1)[0])


def collect_inventory(probe: Probe) -> Inventory:
    """The node's inventory from /proc under the probe's root; `unknown` for what is missing."""
    try:
        hostname = probe.host()
    except Unavailable:
        hostname = UNKNOWN
    parts = [_first(probe, "/proc/sys/kernel/ostype"), _first(probe, "/proc/sys/kernel/osrelease")]
    kernel = " ".join(p for p in parts if p) or UNKNOWN
    hardware = next(filter(None, (_first(probe, path) for path in _MODEL_FILES)), UNKNOWN)
    return Inventory(hostname, kernel, hardware)


def migration_steps(probe: Probe) -> list[str]:
    """The lines of the migration log (pi_node_verifier.sh's MIGRATION_LOG), capped, one-lined."""
    try:
        text = probe.read_optional(const.VERIFY_MIGRATION_LOG) or ""
    except Unavailable:
        return []
    lines = [one_line(line) for line in text.splitlines()]
    return [line for line in lines if line][: const.VERIFY_MIGRATION_LINES_MAX]
