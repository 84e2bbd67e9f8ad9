"""The idle daemon: process start -> READY=1, then CPU and RSS of a serving node over time."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from bench.stats import Figure
from tests.integration.formation import PiNode, wait_formed
from tests.lab import Lab

SAMPLE = 10.0  # s per CPU/RSS sample


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def measure(seconds: float, starts: int = 5) -> list[Figure]:
    """start -> READY over `starts` starts; then CPU % and RSS every 10 s for `seconds`."""
    ready: list[float] = []
    cpu: list[float] = []
    rss: list[float] = []
    with tempfile.TemporaryDirectory() as tmp, Lab(1, prefix="ski", subnet="10.242.0") as lab:
        node = lab.node(1)
        sock_path = node.path("/var/lib/sugarkube/notify.sock")
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(sock_path))
        notify.settimeout(10)
        env = {"NOTIFY_SOCKET": "/var/lib/sugarkube/notify.sock", "SUGARKUBE_SERVERS": "1"}
        pi = None
        for i in range(starts):
            logs = Path(tmp) / f"start{i}"
            logs.mkdir()
            pi = PiNode(node, logs, **env)
            started = time.monotonic()
            pi.start()
            while b"READY=1" not in notify.recv(4096):
                pass
            ready.append((time.monotonic() - started) * 1000)
            if i < starts - 1:
                assert pi.agent is not None
                pi.agent.stop()
                pi.k3s.terminate()
                pi.k3s.wait(10)
        assert pi is not None and pi.agent is not None
        wait_formed([pi], 60)
        pi.agent.wait_event("k3s_serving", 30)
        pid = pi.agent.proc.pid
        time.sleep(SAMPLE)  # past the start-up
        last_cpu, last_t = _cpu_s(pid), time.monotonic()
        end = last_t + seconds
        while time.monotonic() < end:
            time.sleep(SAMPLE)
            now_cpu, now_t = _cpu_s(pid), time.monotonic()
            cpu.append((now_cpu - last_cpu) / (now_t - last_t) * 100)
            rss.append(_rss_mib(pid))
            last_cpu, last_t = now_cpu, now_t
        notify.close()
    imports = []
    root = Path(__file__).resolve().parents[1]
    for _ in range(5):
        done = subprocess.run(
            ["/usr/bin/python3", "-X", "importtime", "-c", "import agent.daemon.service"],
            capture_output=True, text=True, cwd=root, check=True,
        )
        last = done.stderr.strip().splitlines()[-1]
        imports.append(int(last.split("|")[1]) / 1000)
    return [
        Figure("agent process start -> READY=1 (systemd notify)", "ms", tuple(ready)),
        Figure(f"idle serving daemon: CPU per {SAMPLE:g} s sample ({seconds:g} s)", "%",
               tuple(cpu)),
        Figure(f"idle serving daemon: RSS per {SAMPLE:g} s sample ({seconds:g} s)", "MiB",
               tuple(rss)),
        Figure("imports of agent.daemon.service (-X importtime, cumulative)", "ms",
               tuple(imports)),
    ]
