"""The lab's state file: what a lab created, so another process can find and remove it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tests.lab.procs import ProcId

STATE_FILE = "state.json"


def default_workdir(prefix: str) -> Path:
    """Where a lab with PREFIX keeps its per-node directories, logs and state by default."""
    return Path(f"/tmp/sugarkube-lab-{prefix}")


@dataclass(frozen=True)
class NodeRecord:
    """What another process needs to enter a running node."""

    index: int
    name: str
    holder: ProcId


@dataclass
class LabState:
    """Everything a lab created that outlives a crash of the process that made it."""

    prefix: str
    subnet: str
    workdir: Path
    owner_pid: int
    nodes: list[NodeRecord] = field(default_factory=list)
    processes: list[ProcId] = field(default_factory=list)

    def save(self) -> None:
        """Write the state file atomically (a reader never sees half of it)."""
        raw = {
            "prefix": self.prefix,
            "subnet": self.subnet,
            "workdir": str(self.workdir),
            "owner_pid": self.owner_pid,
            "nodes": [
                {"index": n.index, "name": n.name, "holder": n.holder.to_json()} for n in self.nodes
            ],
            "processes": [p.to_json() for p in self.processes],
        }
        path = self.workdir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(raw, indent=1))
        os.replace(tmp, path)


def load_state(workdir: Path) -> LabState | None:
    """Read WORKDIR's state file; None if there is none or it cannot be read."""
    try:
        raw = json.loads((workdir / STATE_FILE).read_text())
        nodes = [
            NodeRecord(int(n["index"]), str(n["name"]), ProcId.from_json(n["holder"]))
            for n in raw["nodes"]
        ]
        return LabState(
            prefix=str(raw["prefix"]),
            subnet=str(raw["subnet"]),
            workdir=Path(raw["workdir"]),
            owner_pid=int(raw["owner_pid"]),
            nodes=nodes,
            processes=[ProcId.from_json(p) for p in raw["processes"]],
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
