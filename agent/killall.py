"""What k3s-killall.sh does, for `wipe`: k3s stopped with everything it left running or mounted.

`systemctl stop k3s` stops k3s itself, but its unit has KillMode=process: the containerd shims
and the containers under them keep running, the CNI links stay up and the kubelet's mounts stay
mounted (a later `rm` of the state then fails on them). k3s's own k3s-killall.sh (written by
install.sh) does, in this order, and so do we:

1. stop the k3s units;
2. kill the process tree of every containerd shim k3s started (its argv[0] is
   `.../k3s/data/<hash>/bin/containerd-shim...`), SIGKILL as killtree does;
3. unmount, deepest first, what is mounted under /run/k3s, /var/lib/kubelet/pods,
   /var/lib/kubelet/plugins, /run/netns/cni-* and below /var/lib/rancher/k3s (the state's own
   mount point, an operator's disk, stays mounted: `wipe` empties it), each with `umount -f`, then
   remove the emptied mount point;
4. delete the links: every veth enslaved to cni0, then cni0, flannel.1, flannel-v6.1, kube-ipvs0,
   flannel-wg, flannel-wg-v6; and remove /var/lib/cni (IP allocations of the deleted pods);
5. filter KUBE-, CNI- and flannel rules out of iptables and ip6tables (k3s-killall.sh:
   `iptables-save | grep -v KUBE- | grep -v CNI- | grep -iv flannel | iptables-restore`), with the
   system's iptables or the one k3s bundles (data/current/bin/aux).
Not done: kube-proxy's own nftables tables (nftables mode), which it rebuilds when it starts.
Links are deleted over rtnetlink with agent/daemon/rtnl.py (the daemon's own, no pyroute2).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from agent import const
from agent.cluster import k3s

UNITS = ("k3s.service", "k3s-agent.service")
LINKS = ("cni0", "flannel.1", "flannel-v6.1", "kube-ipvs0", "flannel-wg", "flannel-wg-v6")
BRIDGE = "cni0"
MOUNT_PREFIXES = ("run/k3s", "var/lib/kubelet/pods", "var/lib/kubelet/plugins")
NETNS_PREFIX = "run/netns/cni-"
CNI_STATE = "var/lib/cni"
K3S_AUX = k3s.K3S_STATE + "/data/current/bin/aux"  # k3s's bundled iptables
# k3s-killall.sh's getshims: `grep -w 'k3s/data/[^/]*/bin/containerd-shim'` on the args.
_SHIM = re.compile(r"(^|/)k3s/data/[^/]+/bin/containerd-shim")

Umount = Callable[[Path], None]


class KillallError(Exception):
    """One step of the killall work failed; the message names what is left."""


def stop_units(systemctl: str | None = None, booted: bool | None = None) -> str:
    """`systemctl stop` the k3s units installed here (an agent has only k3s-agent.service, and
    stopping a unit that is not loaded fails); what was done, one line."""
    systemctl = systemctl or shutil.which("systemctl")
    if booted is None:
        booted = Path("/run/systemd/system").is_dir()
    if systemctl is None or not booted:
        return "k3s: no units to stop (systemd is not running here)"
    units = [u for u in UNITS if _systemctl(systemctl, "show", "-P", "LoadState", u) != "not-found"]
    if not units:
        return "k3s: no k3s units installed"
    _systemctl(systemctl, "stop", *units)
    return f"k3s: stopped {', '.join(units)}"


def _systemctl(systemctl: str, *args: str) -> str:
    """Run systemctl; its stdout, or KillallError with its last line of stderr."""
    command = f"systemctl {' '.join(args)}"
    return _run([systemctl, *args], const.WIPE_STOP_TIMEOUT, f"{command} did not finish",
                f"{command} failed")  # fmt: skip


def _run(argv: list[str], timeout: float, unfinished: str, failed: str) -> str:
    """ARGV's stdout; KillallError `<unfinished>: <why>` or `<failed>: <its last stderr line>`."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KillallError(f"{unfinished}: {exc}") from exc
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise KillallError(f"{failed}: {last}")
    return done.stdout.strip()


def shim_trees(proc: Path = Path("/proc")) -> list[int]:
    """PIDs of every containerd shim of k3s and of all their descendants, parents first.

    Only shims in our own mount namespace: k3s runs its shims in the host's, where `wipe` runs;
    a shim in another one belongs to another system's k3s (a container, a lab node), not ours.
    """
    parent: dict[int, int] = {}
    shims = []
    ours = _mount_ns(proc / "self")
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            parent[pid] = int(stat[stat.rindex(")") + 2 :].split()[1])
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
            if _SHIM.search(argv0) and _mount_ns(entry) == ours:
                shims.append(pid)
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = sorted(shims)
    while todo:
        pid = todo.pop(0)
        if pid not in found:
            found.append(pid)
            todo += sorted(children.get(pid, []))
    return found


def _mount_ns(entry: Path) -> str:
    """The mount namespace of process ENTRY (/proc/<pid>), "" when it cannot be read."""
    try:
        return os.readlink(entry / "ns" / "mnt")
    except OSError:
        return ""


def kill_shims(proc: Path = Path("/proc")) -> str:
    """SIGKILL the shims' trees (killtree); what was done, one line."""
    pids = shim_trees(proc)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return f"containers: killed {len(pids)} processes of containerd shims" if pids else (
        "containers: none running"
    )


def k3s_mounts(root: Path) -> list[Path]:
    """What k3s-killall.sh unmounts, deepest first (the state's own mount point excluded)."""
    state = root / k3s.K3S_STATE
    points = []
    for point in k3s.mount_points(root):
        inside = point.relative_to(root).as_posix() if point.is_relative_to(root) else ""
        if (
            any(inside == p or inside.startswith(p + "/") for p in MOUNT_PREFIXES)
            or inside.startswith(NETNS_PREFIX)
            or (point != state and point.is_relative_to(state))
        ):
            points.append(point)
    return sorted(set(points), key=lambda p: (len(p.parts), str(p)), reverse=True)


def umount(point: Path) -> None:
    """util-linux `umount -f`, as k3s-killall.sh runs it; KillallError with umount's words."""
    what = f"cannot unmount {point}"
    _run(["umount", "-f", str(point)], const.WIPE_UMOUNT_TIMEOUT, what, what)


def unmount_all(root: Path, run: Umount = umount) -> str:
    """Unmount k3s's and the kubelet's mounts and remove the mount points; one line."""
    points = k3s_mounts(root)
    for point in points:
        run(point)
        with contextlib.suppress(OSError):  # busy or not empty: the state removal reports it
            if point.is_dir() and not point.is_symlink():
                point.rmdir()
            else:
                point.unlink()
    return f"mounts: unmounted {len(points)}" if points else "mounts: none of k3s's"


def delete_links(root: Path = Path("/")) -> str:
    """Delete cni0's veths, then the CNI links; remove /var/lib/cni; one line."""
    from agent.daemon.rtnl import IPRoute, NetlinkError  # lazy: only wipe needs netlink

    deleted = []
    try:
        with IPRoute() as ipr:
            links = {m.get_attr("IFLA_IFNAME"): m for m in ipr.get_all_links()}
            bridge = links.get(BRIDGE)
            veths = [
                name for name, m in sorted(links.items())
                if bridge is not None and m.get_attr("IFLA_MASTER") == bridge["index"]
            ]
            for name in [*veths, *LINKS]:
                if name in links:
                    try:
                        ipr.link_del(links[name]["index"])
                    except NetlinkError as exc:
                        if exc.code != errno.ENODEV:  # gone meanwhile (with its veth peer)
                            raise
                    deleted.append(name)
    except OSError as exc:
        done = f" (deleted {', '.join(deleted)})" if deleted else ""
        raise KillallError(f"cannot delete the CNI links{done}: {exc.strerror or exc}") from exc
    cni = root / CNI_STATE
    try:
        for child in sorted(cni.iterdir()) if cni.is_dir() else []:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    except OSError as exc:
        raise KillallError(f"cannot remove {cni}: {exc.strerror}") from exc
    with contextlib.suppress(OSError):  # a mount point (a disk of its own) stays, emptied
        cni.rmdir()
    return f"links: deleted {', '.join(deleted)}" if deleted else "links: none of k3s's"


def filtered_rules(saved: str) -> str:
    """iptables-save output without k3s's rules: k3s-killall.sh's `grep -v KUBE- | grep -v CNI-
    | grep -iv flannel`."""
    return "".join(
        line for line in saved.splitlines(keepends=True)
        if "KUBE-" not in line and "CNI-" not in line and "flannel" not in line.lower()
    )


def _tool(root: Path, name: str) -> str | None:
    found = shutil.which(name)
    if found is None and os.access(root / K3S_AUX / name, os.X_OK):
        found = str(root / K3S_AUX / name)
    return found


def filter_firewall(root: Path = Path("/")) -> str:
    """Remove k3s's iptables and ip6tables rules, keep the rest; one line."""
    done = []
    for family in ("iptables", "ip6tables"):
        save, restore = _tool(root, f"{family}-save"), _tool(root, f"{family}-restore")
        if save is None or restore is None:
            continue
        try:
            saved = subprocess.run(
                [save], capture_output=True, text=True, timeout=const.WIPE_UMOUNT_TIMEOUT,
                check=True,
            ).stdout  # fmt: skip
            kept = filtered_rules(saved)
            if kept != saved:
                subprocess.run(
                    [restore], input=kept, capture_output=True, text=True,
                    timeout=const.WIPE_UMOUNT_TIMEOUT, check=True,
                )  # fmt: skip
                removed = len(saved.splitlines()) - len(kept.splitlines())
                done.append(f"{family} {removed} lines")
        except subprocess.CalledProcessError as exc:
            last = (str(exc.stderr or "").strip().splitlines() or [f"exit {exc.returncode}"])[-1]
            raise KillallError(f"cannot filter k3s's {family} rules: {last}") from exc
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KillallError(f"cannot filter k3s's {family} rules: {exc}") from exc
    return f"firewall: removed k3s's rules ({', '.join(done)})" if done else (
        "firewall: no rules of k3s's"
    )
