"""What stops k3s from running here at all: a node failing one of these must not stand.

Judged as k3s judges them, not by the kernel command line's text (which the verifier's
`cgroup_memory` check also reads, to say how to fix it):
- the memory cgroup controller: k3s's agent exits ("failed to find memory cgroup") unless the
  controller is enabled, in cgroup v2's cgroup.controllers or cgroup v1's /proc/cgroups.
  Raspberry Pi OS ships it disabled (`cgroup_disable=memory` on its command line).
- kube-proxy's dataplane in nftables mode (the runbook's default: our 10-kube-proxy.yaml, or
  K3S_KUBE_PROXY_MODE): kube-proxy runs the `nft` tool and fails without a working one. iptables
  mode is not judged: k3s ships its own iptables binaries.
"""

from __future__ import annotations

from agent.verify import checks
from agent.verify.probe import Probe
from agent.verify.result import CheckFailed, Status, Unavailable


def blocking(probe: Probe) -> str:
    """Why k3s cannot run on this node, with the fix; "" when it can."""
    problems = []
    try:
        enabled, where = checks.memory_controller(probe)
        if not enabled:
            problems.append(
                f"the memory cgroup controller is off ({where}): add cgroup_memory=1 "
                "cgroup_enable=memory to cmdline.txt and reboot"
            )
    except Unavailable as err:
        problems.append(f"the memory cgroup controller cannot be judged: {err}")
    try:
        mode, source = checks.proxy_mode(probe)
        if mode == "nftables":
            verdict = checks.nft_usable(probe, source or "")
            if verdict.status == Status.FAIL:
                problems.append(verdict.detail)
    except Unavailable as err:
        problems.append(f"{err}: install nftables")
    except CheckFailed as err:
        problems.append(str(err))
    return "; ".join(problems)
