"""`wipe`: the daemon closes its gate, the steps run in order, a failure is one line."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

from agent.config import load_settings
from agent.daemon.control import DaemonState
from agent.daemon.formation import FormationRunner
from agent.daemon.metrics import Metrics
from agent.daemon.netlink import Interface
from agent.log import EventLog, Redactor


class FakePublisher:
    on_established = None
    on_lost = None
    name = ""

    def set(self, advert: object) -> None:
        pass

    async def run(self) -> None:
        pass

    async def withdraw(self, timeout: float = 1.0) -> bool:
        return True


def _runner(tmp_path: Path, state: DaemonState) -> FormationRunner:
    settings = load_settings(None, {"SUGARKUBE_TOKEN": "lab-token-0123456789"}, root=tmp_path)
    return FormationRunner(
        settings=settings, log=EventLog(io.StringIO(), Redactor(b"salt"), journal=False),
        publisher=FakePublisher(), browse=None,  # type: ignore[arg-type]
        avahi=None, iface=Interface("eth0", 2, "10.0.0.1"), hostname="node1", state=state,
        metrics=Metrics("0", "sugar", "dev"), root=tmp_path,
    )


def test_wipe_closes_the_gate_the_daemon_had_released(tmp_path: Path) -> None:
    async def scenario() -> dict[str, object]:
        state = DaemonState()
        runner = _runner(tmp_path, state)
        runner.released.set()
        await state.update(released=True, release_mode="join-server", leader="node2.local")
        assert await runner.wipe()
        assert not runner.released.is_set()
        return state.snapshot.as_dict()

    snapshot = asyncio.run(scenario())
    assert snapshot["released"] is False and snapshot["release_mode"] == ""
    assert snapshot["phase"] == "wiped"
    assert "restart sugarkube-agent" in str(snapshot["status"])
