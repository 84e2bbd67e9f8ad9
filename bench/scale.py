"""Scale: N lab nodes, each running the agent and its gated k3s stand-in, in steady state.

Per size N: a lab of N agent nodes plus one observer node (avahi-daemon only: its cache can be
emptied by a restart without disturbing any agent), every agent advertising, SUGARKUBE_SERVERS=3
(3 servers, the rest agents, as on a real LAN). Measured:

- formation: first agent start -> every gate released and every k3s stand-in joined (an agent
  or k3s unit that exits is started again 5 s later, as systemd's Restart= would), each
  agent's CPU time through it, and every mDNS packet on the lab's links meanwhile;
- discovery from the observer: a fresh browse (tests/integration/browse_probe, our Browser)
  until it has resolved the first and ALL N adverts, cold (observer's avahi-daemon just
  restarted) and warm (right after);
- steady state over WINDOW s: each agent's CPU % (utime + stime) and RSS, the avahi-daemon's
  RSS and CPU, and the mDNS packets and bytes per second on the lab's links. The window (120 s
  by default) spans one refresh cycle of Avahi's 120 s records (re-queried at 80-82 % of TTL);
- node1's avahi-daemon cache size per interface (its SIGUSR1 dump), and how many of the N
  hosts each agent's peer table lacks at the end (from its peer_added/peer_removed events).

Avahi's queriers back off from 1 s to 1 h, so steady-state query rates depend on the age of the
browsers: each row records `window_age_s` (first agent start -> window start). The lab runs all
N nodes on this machine's cores: per-node work that grows like N costs the host N^2.

Packets are captured with tcpdump on the host (`-i any -Q in`, Linux cooked v2 headers) and
kept only when they entered through one of this lab's veths: each packet is counted once, at
the node that sent it, multicast and unicast (a capture on the bridge device sees only what is
flooded to it). Bytes are IP bytes (IP header + UDP + DNS). QU queries (RFC 6762 §5.4) are our
live rounds: Avahi 0.8 never sets the unicast-response bit.

Usage (root, from the checkout): python3 -m bench.scale [--sizes 3,10,25,50] [--runs 5]
    [--runs-at-50 3] [--window 120] [--json PATH] [--workdir NEW_DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.stats import Figure, markdown
from tests.integration.formation import K3S_UNIT, PiNode
from tests.integration.helpers import Agent, Probe, node_env, parse_event
from tests.lab import Lab, Node

PREFIX = "skz"  # lab prefix: bridge br-skz, namespaces skz1..., veths vskz1...
SUBNET = "10.245.0"
K3S = "_k3s-sugar-dev._tcp"
SIZES = (3, 10, 25, 50)
MIB_PER_NODE = 80  # agent + k3s stand-in + gate + dbus-daemon + avahi-daemon, with margin
SERVERS = "3"
SETTLE = 5.0  # s after the last server serves: its rename to "(server)" is announced by then
BROWSE_TIMEOUT = 30.0  # s for one browse to resolve every advert
MDNS_PORT = 5353
DNS_TYPES = {1: "A", 12: "PTR", 16: "TXT", 28: "AAAA", 33: "SRV", 255: "ANY"}
_HOST = re.compile(r"node(\d+)\.local\.?$")

Log = Callable[[str], None]


# -- /proc ----------------------------------------------------------------------------------------


def mem_available_mib() -> float:
    """MemAvailable from /proc/meminfo, in MiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def cpu_seconds(pid: int) -> float:
    """utime + stime of PID, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    """VmRSS of PID, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


# -- packet capture -------------------------------------------------------------------------------


class Capture:
    """tcpdump of mDNS on every host interface, incoming only, into a pcap file (SLL2 headers)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._err = path.with_suffix(".err")
        self.started = time.monotonic()
        with self._err.open("wb") as err:
            self.proc = subprocess.Popen(
                ["tcpdump", "-i", "any", "-y", "LINUX_SLL2", "-Q", "in", "-n", "-U", "-s", "0",
                 "-Z", "root", "-w", str(path), f"udp port {MDNS_PORT}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
            )
        deadline = time.monotonic() + 10
        while "listening on" not in self._err.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tcpdump did not start: {self._err.read_text()}")
            time.sleep(0.05)
        self.started = time.monotonic()

    def stop(self) -> dict[str, Any]:
        """Stop tcpdump; its own counters (dropped packets must be 0 for a valid count)."""
        self.stopped = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        text = self._err.read_text(errors="replace")
        found = {k: int(v) for v, k in re.findall(r"(\d+) packets? (captured|dropped by kernel)",
                                                 text)}
        return {"captured": found.get("captured"), "dropped": found.get("dropped by kernel")}


def _read_pcap(path: Path) -> Iterator[tuple[float, bytes]]:
    """(timestamp, frame) of every record of a pcap file."""
    data = path.read_bytes()
    if len(data) < 24:
        return
    magic = data[:4]
    order = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">",
             b"\x4d\x3c\xb2\xa1": "<", b"\xa1\xb2\x3c\x4d": ">"}[magic]
    frac = 1e-9 if magic in (b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d") else 1e-6
    (linktype,) = struct.unpack(order + "I", data[20:24])
    if linktype != 276:  # LINKTYPE_LINUX_SLL2
        raise RuntimeError(f"{path}: link type {linktype}, expected LINUX_SLL2 (276)")
    offset = 24
    while offset + 16 <= len(data):
        sec, sub, incl, _orig = struct.unpack(order + "IIII", data[offset:offset + 16])
        offset += 16
        yield sec + sub * frac, data[offset:offset + incl]
        offset += incl


def _dns_name(msg: bytes, at: int) -> tuple[str, int]:
    """A possibly compressed name at AT; (name, offset after it in place)."""
    labels: list[str] = []
    end = -1
    for _ in range(128):
        length = msg[at]
        if length & 0xC0 == 0xC0:
            if end < 0:
                end = at + 2
            at = ((length & 0x3F) << 8) | msg[at + 1]
            continue
        at += 1
        if length == 0:
            break
        labels.append(msg[at:at + length].decode("utf-8", "replace"))
        at += length
    return ".".join(labels), end if end >= 0 else at


def _ip(proto: int, ip: bytes) -> tuple[str, Any, Any, bytes, int] | None:
    """(family, source, destination, UDP datagram, IP bytes) of an IPv4 or IPv6 UDP packet."""
    if proto == 0x0800 and len(ip) >= 20:
        ihl = (ip[0] & 0x0F) * 4
        src, dst = ipaddress.ip_address(ip[12:16]), ipaddress.ip_address(ip[16:20])
        return "ipv4", src, dst, ip[ihl:], struct.unpack(">H", ip[2:4])[0]
    if proto == 0x86DD and len(ip) >= 40 and ip[6] == 17:  # no extension headers in mDNS
        src, dst = ipaddress.ip_address(ip[8:24]), ipaddress.ip_address(ip[24:40])
        return "ipv6", src, dst, ip[40:], 40 + struct.unpack(">H", ip[4:6])[0]
    return None


def _query(msg: bytes, size: int, c: Counter[str], qtypes: Counter[str]) -> None:
    """Count one query: its questions' types, probes, QU (live round) questions."""
    _flags, qd, _an, ns, _ar = struct.unpack(">HHHHH", msg[2:12])
    c["queries"] += 1
    c["query_bytes"] += size
    if ns:
        c["probes"] += 1  # a probe carries its proposed records in the authority section
    at, qu, ours = 12, False, False
    try:
        for _ in range(qd):
            name, at = _dns_name(msg, at)
            qtype, qclass = struct.unpack(">HH", msg[at:at + 4])
            at += 4
            qu |= bool(qclass & 0x8000)
            ours |= name.lower() == f"{K3S}.local"
            qtypes[DNS_TYPES.get(qtype, str(qtype))] += 1
    except (IndexError, struct.error):
        c["malformed"] += 1
    if qu:
        c["qu_queries"] += 1  # our live rounds (zeroconf); Avahi 0.8 asks QM only
        c["qu_query_bytes"] += size
        if ours:
            c["round_queries"] += 1


def classify(path: Path, ifindexes: set[int]) -> dict[str, Any]:
    """Counts of the mDNS packets that entered the host through one of IFINDEXES."""
    c: Counter[str] = Counter()
    qtypes: Counter[str] = Counter()
    sources: set[str] = set()
    stamps: list[float] = []
    for ts, frame in _read_pcap(path):
        if len(frame) < 20:
            continue
        proto, _res, ifindex, _hatype, pkttype = struct.unpack(">HHIHB", frame[:11])
        parsed = _ip(proto, frame[20:])
        if ifindex not in ifindexes or pkttype == 4 or parsed is None:  # 4: PACKET_OUTGOING
            continue
        family, src, dst, udp, size = parsed
        stamps.append(ts)
        msg = udp[8:]
        c["packets"] += 1
        c["bytes"] += size
        c[family] += 1
        c["multicast" if dst.is_multicast else "unicast"] += 1
        sources.add(str(src))
        if len(msg) < 12:
            c["malformed"] += 1
        elif not msg[2] & 0x80:
            _query(msg, size, c, qtypes)
        else:
            c["responses"] += 1
            c["response_bytes"] += size
            if not dst.is_multicast:
                c["unicast_responses"] += 1  # answers to QU (live rounds) or legacy queries
                c["unicast_response_bytes"] += size
    span = stamps[-1] - stamps[0] if stamps else 0.0
    return {**c, "question_types": dict(qtypes), "senders": len(sources), "span_s": span}


def lab_ifindexes(prefix: str) -> set[int]:
    """Host-side ifindexes of PREFIX's veths."""
    found = set()
    for dev in Path("/sys/class/net").iterdir():
        if re.fullmatch(rf"v{prefix}\d+", dev.name):
            found.add(int((dev / "ifindex").read_text()))
    return found


def bridge_counters(bridge: str) -> dict[str, int]:
    """The bridge device's rx counters (what is flooded or sent to it: multicast, not unicast)."""
    stats = Path(f"/sys/class/net/{bridge}/statistics")
    return {k: int((stats / k).read_text()) for k in ("rx_packets", "rx_bytes")}


# -- avahi-daemon's cache ------------------------------------------------------------------------


def avahi_cache_entries(node: Node) -> dict[str, int]:
    """Records in node's avahi-daemon cache per interface, from its SIGUSR1 dump in its log."""
    pid = node.avahi_pid()
    if pid is None:
        return {}
    log = node.avahi_log
    before = log.stat().st_size
    os.kill(pid, signal.SIGUSR1)
    text = ""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # until the dump is there and the log stops growing
        time.sleep(0.5)
        with log.open("rb") as f:
            f.seek(before)
            now = f.read().decode(errors="replace")
        if "CACHE DUMP FOLLOWS" in now and now == text:
            break
        text = now
    counts: Counter[str] = Counter()
    current = None
    in_cache = False
    for line in text.splitlines():
        if m := re.search(r";;; INTERFACE (\S+) ;;;", line):
            current, in_cache = m[1], False
        elif "CACHE DUMP FOLLOWS" in line:
            in_cache = True
        elif ";;;" in line:
            in_cache = False
        elif in_cache and current and line.strip():
            counts[current] += 1
    return dict(counts)


# -- discovery ------------------------------------------------------------------------------------


def browse_all(node: Node, n: int, timeout: float = BROWSE_TIMEOUT) -> dict[str, Any]:
    """One fresh browse on NODE until adverts of node1..nodeN are all resolved.

    Times are the probe's own (from the Browser's start, its process start-up not counted).
    """
    probe = Probe(node, "browse_probe", K3S, str(timeout + 5))
    seen: dict[int, float] = {}
    try:
        deadline = time.monotonic() + timeout
        while len(seen) < n and (remaining := deadline - time.monotonic()) > 0:
            try:
                line = probe.expect(lambda ln: ln.get("kind") == "added", remaining)
            except AssertionError:
                break
            m = _HOST.match(str(line.get("host", "")))
            if m and 1 <= int(m[1]) <= n:
                seen.setdefault(int(m[1]), float(line["ms"]))
    finally:
        probe.close()
    return {
        "found": len(seen),
        "first_ms": min(seen.values()) if seen else None,
        "all_ms": max(seen.values()) if len(seen) == n else None,
    }


# -- one size -------------------------------------------------------------------------------------


def wait_formed_restarting(nodes: Sequence[PiNode], timeout: float) -> dict[str, int]:
    """Wait until every gate released and every k3s stand-in joined; the restarts needed.

    As systemd would: the lab's k3s unit gives up when its gate waits longer than 120 s, and
    k3s's own unit has Restart=always (RestartSec=5s); sugarkube-agent.service has
    Restart=on-failure (RestartSec=5s). A process that exited is started again 5 s later.
    """
    restarts = {"k3s": 0, "agent": 0}
    exited: dict[tuple[str, int], float] = {}
    deadline = time.monotonic() + timeout
    while True:
        done = True
        for i, pi in enumerate(nodes):
            assert pi.agent is not None
            if pi.released() and pi.joined():
                continue
            done = False
            now = time.monotonic()
            if pi.agent.proc.poll() is not None and (
                now - exited.setdefault(("agent", i), now) >= 5.0
            ):
                del exited[("agent", i)]
                pi.agent = Agent(pi.node, pi.agent.log, env=pi.env)
                restarts["agent"] += 1
            if pi.k3s.poll() is not None and now - exited.setdefault(("k3s", i), now) >= 5.0:
                del exited[("k3s", i)]
                pi.k3s = pi.node.spawn("sh", "-c", K3S_UNIT, log=pi.k3s_log,
                                       env=node_env(**pi.env))
                restarts["k3s"] += 1
        if done:
            return restarts
        if time.monotonic() > deadline:
            late = [pi.node.name for pi in nodes if not (pi.released() and pi.joined())]
            raise AssertionError(f"not formed within {timeout:g} s: {', '.join(late)}")
        time.sleep(0.25)


def _peers_missing(pi: PiNode, n: int) -> int:
    """How many of the N hosts (itself included) the agent's peer table lacks at the end."""
    assert pi.agent is not None
    present: dict[str, str] = {}
    for line in pi.agent.text().rsplit("\n--- lab ", 1)[-1].splitlines():  # its last start
        event = parse_event(line)
        if event.get("event") == "peer_added":
            present[event["name"]] = event.get("host", "")
        elif event.get("event") == "peer_removed":
            present.pop(event.get("name", ""), None)
    return n - len(set(present.values()))


def _wait_serving(nodes: Sequence[PiNode], timeout: float) -> None:
    """Wait until every server (not agent) reported its local k3s API up."""
    deadline = time.monotonic() + timeout
    for pi in nodes:
        assert pi.agent is not None
        released = pi.released()
        if released is not None and released.get("mode") != "join-agent":
            pi.agent.wait_event("k3s_serving", max(1.0, deadline - time.monotonic()))


def _agent_summary(pi: PiNode, n: int) -> dict[str, Any]:
    assert pi.agent is not None
    released = pi.released() or {}
    return {
        "mode": released.get("mode"),
        "peers_missing": _peers_missing(pi, n),
        "gate_ms": float(released.get("ms_elapsed", "nan")),
        "peer_added": len(pi.agent.events("peer_added")),
        "resolve_failed": len(pi.agent.events("resolve_failed")),
        "absence_rounds": len(pi.agent.events("absence_round")),
    }


def measure_size(n: int, runs: int, window: float, workdir: Path, log: Log) -> dict[str, Any]:
    """Everything for one lab of N agent nodes (+ the observer); the raw row."""
    row: dict[str, Any] = {"n": n, "runs": runs, "window_s": window}
    t_begin = time.monotonic()
    logs = workdir / f"n{n}"
    logs.mkdir(parents=True)
    hostnames = [f"node{i}" for i in range(1, n + 1)] + ["observer"]
    captures: list[Capture] = []
    try:
        with Lab(n + 1, prefix=PREFIX, subnet=SUBNET, workdir=logs / "lab",
                 hostnames=hostnames) as lab:
            row["lab_up_s"] = time.monotonic() - t_begin
            observer = lab.node(n + 1)
            ifindexes = lab_ifindexes(PREFIX)
            log(f"N={n}: lab up in {row['lab_up_s']:.1f} s; starting {n} agents")

            # Formation: every node powered on at once, as after a power cut.
            cap = Capture(logs / "formation.pcap")
            captures.append(cap)
            t0 = time.monotonic()
            nodes = [PiNode(lab.node(i), logs, SUGARKUBE_SERVERS=SERVERS).start()
                     for i in range(1, n + 1)]
            row["restarts"] = wait_formed_restarting(nodes, 120 + 4 * n)
            _wait_serving(nodes, 60)
            row["formation_s"] = time.monotonic() - t0
            time.sleep(SETTLE)
            row["formation_capture"] = {**cap.stop(), **classify(cap.path, ifindexes),
                                        "seconds": cap.stopped - cap.started}
            pids = [pi.agent.proc.pid for pi in nodes if pi.agent is not None]
            row["agent_cpu_formation_s"] = [cpu_seconds(p) for p in pids]
            row["agents"] = [_agent_summary(pi, n) for pi in nodes]
            modes = Counter(a["mode"] for a in row["agents"])
            log(f"N={n}: formed in {row['formation_s']:.1f} s ({dict(modes)})")

            # Discovery from the observer: cold (its cache emptied by a restart), then warm.
            row["discovery"] = []
            for i in range(runs):
                observer.restart_avahi()
                cold = browse_all(observer, n)
                warm = browse_all(observer, n)
                row["discovery"].append({"cold": cold, "warm": warm})
                log(f"N={n}: discovery run {i + 1}/{runs}: cold {cold}, warm {warm}")

            # Steady state.
            avahi_pids = {node.index: node.avahi_pid() for node in lab.nodes}
            cap = Capture(logs / "steady.pcap")
            captures.append(cap)
            bridge0 = bridge_counters(lab.bridge)
            cpu0 = [cpu_seconds(p) for p in pids]
            avahi0 = {i: cpu_seconds(p) for i, p in avahi_pids.items() if p}
            t_start = time.monotonic()
            row["window_age_s"] = t_start - t0  # Avahi's queriers back off with age (1 s..1 h)
            time.sleep(window)
            elapsed = time.monotonic() - t_start
            cpu1 = [cpu_seconds(p) for p in pids]
            avahi1 = {i: cpu_seconds(p) for i, p in avahi_pids.items() if p}
            bridge1 = bridge_counters(lab.bridge)
            steady = {**cap.stop(), **classify(cap.path, ifindexes), "seconds": elapsed}
            row["steady_capture"] = steady
            row["bridge"] = {k: (bridge1[k] - bridge0[k]) / elapsed for k in bridge0}
            row["agent_cpu_pct"] = [(b - a) / elapsed * 100 for a, b in zip(cpu0, cpu1,
                                                                              strict=True)]
            row["agent_rss_mib"] = [rss_mib(p) for p in pids]
            row["avahi_cpu_pct"] = {
                i: (avahi1[i] - avahi0[i]) / elapsed * 100 for i in avahi0 if i in avahi1
            }
            node1_avahi = avahi_pids.get(1)
            row["avahi_rss_mib_node1"] = rss_mib(node1_avahi) if node1_avahi else None
            obs_avahi = observer.avahi_pid()
            row["avahi_rss_mib_observer"] = rss_mib(obs_avahi) if obs_avahi else None
            row["avahi_cache_node1"] = avahi_cache_entries(lab.node(1))
            for summary, pi in zip(row["agents"], nodes, strict=True):  # after the window
                summary["peers_missing_after_window"] = _peers_missing(pi, n)
            row["pkts_per_s"] = steady.get("packets", 0) / elapsed
            row["bytes_per_s"] = steady.get("bytes", 0) / elapsed
            log(f"N={n}: steady {row['pkts_per_s']:.2f} pkt/s, {row['bytes_per_s']:.0f} B/s, "
                f"agent CPU median {statistics.median(row['agent_cpu_pct']):.3f} %, "
                f"RSS median {statistics.median(row['agent_rss_mib']):.1f} MiB, "
                f"node1 cache {row['avahi_cache_node1']}")
    finally:
        for cap in captures:
            cap.stop()
    row["wall_s"] = time.monotonic() - t_begin
    return row


# -- the figures ----------------------------------------------------------------------------------


def figures_of(row: dict[str, Any]) -> list[Figure]:
    """The Markdown-table figures of one size's raw row."""
    n = row["n"]
    runs = row["discovery"]

    def times(kind: str, key: str) -> tuple[float, ...]:
        return tuple(r[kind][key] for r in runs if r[kind][key] is not None)

    steady = row["steady_capture"]
    window = row["window_s"]
    return [
        Figure(f"N={n}: formation, first start -> all gates released + k3s joined", "s",
               (row["formation_s"],)),
        Figure(f"N={n}: agent CPU time from start through formation, per node", "s",
               tuple(row["agent_cpu_formation_s"])),
        Figure(f"N={n}: discovery, cold: first advert resolved (observer)", "ms",
               times("cold", "first_ms")),
        Figure(f"N={n}: discovery, cold: all {n} adverts resolved (observer)", "ms",
               times("cold", "all_ms")),
        Figure(f"N={n}: discovery, warm: all {n} adverts resolved (observer)", "ms",
               times("warm", "all_ms")),
        Figure(f"N={n}: steady agent CPU over {window:g} s, per node", "%",
               tuple(row["agent_cpu_pct"])),
        Figure(f"N={n}: steady agent RSS, per node", "MiB", tuple(row["agent_rss_mib"])),
        Figure(f"N={n}: steady mDNS packets on the lab's links ({window:g} s)", "pkt/s",
               (row["pkts_per_s"],)),
        Figure(f"N={n}: steady mDNS bytes on the lab's links ({window:g} s)", "B/s",
               (row["bytes_per_s"],)),
        Figure(f"N={n}: steady QU queries (our live rounds)", "pkt/s",
               (steady.get("qu_queries", 0) / window,)),
        Figure(f"N={n}: hosts missing from an agent's peer table after the window", "hosts",
               tuple(float(a["peers_missing_after_window"]) for a in row["agents"])),
        Figure(f"N={n}: avahi-daemon RSS on node1", "MiB",
               tuple(v for v in (row["avahi_rss_mib_node1"],) if v is not None)),
    ]


def measure(
    sizes: Sequence[int] = SIZES,
    runs: int = 5,
    *,
    window: float = 120.0,
    runs_at_50: int = 3,
    workdir: Path | None = None,
    log: Log = lambda text: print(text, file=sys.stderr, flush=True),
) -> tuple[list[Figure], list[dict[str, Any]]]:
    """Scale figures and raw rows (one per size; a skipped size's row says why).

    RUNS discovery repetitions per size (RUNS_AT_50 from 50 nodes up), WINDOW s of steady state.
    Stops before a size whose nodes MemAvailable cannot hold at MIB_PER_NODE each.
    """
    figures: list[Figure] = []
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scale-")))
        for n in sizes:
            need = (n + 1) * MIB_PER_NODE
            free = mem_available_mib()
            if free < need:
                reason = (f"stopped before N={n}: MemAvailable {free:.0f} MiB < "
                          f"{n + 1} nodes x {MIB_PER_NODE} MiB = {need} MiB")
                log(reason)
                rows.append({"n": n, "skipped": reason})
                break
            try:
                row = measure_size(n, runs if n < 50 else min(runs, runs_at_50), window,
                                   workdir, log)
            except Exception as err:  # keep what the smaller sizes measured
                log(f"N={n} failed: {type(err).__name__}: {err}")
                rows.append({"n": n, "error": f"{type(err).__name__}: {err}"})
                break
            rows.append(row)
            figures += figures_of(row)
    return figures, rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.scale", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--runs-at-50", type=int, default=3)
    parser.add_argument("--window", type=float, default=120.0)
    parser.add_argument("--json", type=Path, help="write the raw rows here")
    parser.add_argument("--workdir", type=Path, help="keep logs and pcaps here (must be new)")
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True)
    figures, rows = measure(
        [int(s) for s in args.sizes.split(",")], args.runs, window=args.window,
        runs_at_50=args.runs_at_50, workdir=args.workdir,
    )
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print(markdown(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
