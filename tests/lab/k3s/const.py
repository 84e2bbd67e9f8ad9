"""Where the stand-in keeps its state, and its timings: each with its unit and its source.

Paths are relative to the node's root, as agent/cluster/k3s.py names them. Timings marked "k3s"
are the values of k3s's pkg/etcd/etcd.go (v1.22 to v1.30 alike) unless another file is named;
"etcd 3.4" ones were measured with Debian's etcd-server 3.4.23 on the lab machine.
"""

from __future__ import annotations

import os

from agent.cluster import etcd, k3s

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

# --- state on disk (k3s's own layout under /var/lib/rancher/k3s) ---------------------------------
TLS = k3s.K3S_STATE + "/server/tls"
CA_CERT, CA_KEY = TLS + "/server-ca.crt", TLS + "/server-ca.key"
SERVING_CERT, SERVING_KEY = TLS + "/serving-kube-apiserver.crt", TLS + "/serving-kube-apiserver.key"
SERVER_TOKEN = k3s.K3S_STATE + "/server/token"
NODE_TOKEN = k3s.K3S_STATE + "/server/node-token"  # a symlink to `token`, as k3s makes it
SQLITE_DB = k3s.SERVER_DB + "/state.db"
ETCD_DIR = k3s.SERVER_DB + "/etcd"  # etcd's --data-dir (k3s: dbDir)
ETCD_NAME = ETCD_DIR + "/name"  # the member name, kept across restarts (k3s: nameFile)
ETCD_WAL = ETCD_DIR + "/member/wal"  # present once etcd ran: k3s's IsInitialized test
ETCD_CONFIG = ETCD_DIR + "/config"  # the flags etcd last ran with (k3s: CurrentETCDOptions)
ETCD_LOG = k3s.K3S_STATE + "/server/logs/etcd.log"  # k3s logs etcd to its journal; ours is apart
# etcd's TLS as k3s sets it up (pkg/daemons/control/deps): one etcd server CA shared by every
# server (in the bootstrap data a joiner gets), a serving certificate per server
# (server-client.crt), and the client certificate k3s's own etcd clients and etcdctl present.
ETCD_CA_CERT, ETCD_CA_KEY = etcd.SERVER_CA, etcd.TLS_DIR + "/server-ca.key"
ETCD_SERVING_CERT = etcd.TLS_DIR + "/server-client.crt"
ETCD_SERVING_KEY = etcd.TLS_DIR + "/server-client.key"
ETCD_CLIENT_CERT, ETCD_CLIENT_KEY = etcd.CLIENT_CERT, etcd.CLIENT_KEY
AGENT_CA = k3s.AGENT_DIR + "/server-ca.crt"
AGENT_KEY = k3s.AGENT_DIR + "/client-kubelet.key"
DIR_MODE = 0o700  # k3s chmods db/etcd to 0700; etcd 3.4 warns about anything wider

# --- etcd (k3s's cluster() options) -------------------------------------------------------------
ETCD = "/usr/bin/etcd"  # Debian's etcd-server
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_HEARTBEAT = 500  # ms, k3s HeartbeatInterval (etcd's default is 100)
ETCD_ELECTION = 5000  # ms, k3s ElectionTimeout (etcd's default is 1000): a new single-member
# cluster elects itself 3.5 s after start with it (etcd 3.4; 0.13 s with etcd's defaults)
ETCD_SNAPSHOT_COUNT = 10000  # k3s SnapshotCount
ETCD_TIMEOUT = 10.0  # s per request to etcd, k3s testTimeout (v1.22; 30 s since v1.27)
ETCD_JOIN_TIMEOUT = 20.0  # s for the whole MemberAdd exchange, k3s join()'s client context
ETCD_POLL = 0.5  # s between looks at the local member's status while waiting on it (ours)
ETCD_STOP_TIMEOUT = 10.0  # s for etcd to exit after SIGTERM before SIGKILL (ours)
TOO_MANY_LEARNERS = "etcdserver: too many learner members in cluster"  # etcd's ErrTooManyLearners

# --- learners (k3s manageLearners / trackLearnerProgress) ----------------------------------------
LEARNER_TICK = 15.0  # s between the etcd leader's looks at learners, k3s manageTickerTime
LEARNER_TICK_ENV = "K3S_STANDIN_LEARNER_TICK"  # the lab shortens it (tests/integration/formation)
LEARNER_MAX_STALL = 300.0  # s a learner may make no progress before removal, learnerMaxStallTime

# --- what keeps etcd busy (k3s is never idle) -----------------------------------------------------
LEASE_RENEW = 2.0  # s between lease renewals: kube-controller-manager and kube-scheduler renew
# their leader-election leases every 2 s (client-go RetryPeriod), kubelets their node leases
# every 10 s. An idle etcd matters after a power cut: a follower persists a new commit index
# without fsync (etcd's raft.MustSync), so one idle since a learner's promotion can come back
# still believing it a learner, and a cluster of such members has no quorum.
LEASE_KEY = "/registry/leases/kube-system/kube-controller-manager/"  # + the node name

# --- start-up and the API port --------------------------------------------------------------------
SERVE_DELAY = 20.0  # s from process start to listening on 6443: a Pi 4's k3s takes 20-60 s
SERVE_DELAY_ENV = "K3S_STANDIN_SERVE_DELAY"
JOIN_TIMEOUT = 60.0  # s to keep asking an unreachable server before giving up (ours)
JOIN_RETRY = 0.5  # s between attempts while the server does not answer yet (ours)
CLIENT_TIMEOUT = 10.0  # s per HTTPS request, k3s's defaultClientTimeout (pkg/clientaccess)
REQUEST_TIMEOUT = 5.0  # s for a client to send its request once connected (ours)
HANDSHAKE_TIMEOUT = 5.0  # s for a TLS handshake (ours)
BODY_MAX = 64 * 1024  # bytes of a request or response body
CA_DAYS = 3650  # k3s's self-signed CA lives 10 years
LEAF_DAYS = 365  # k3s's leaf certificates live one year
# s this node's clock runs ahead of the others' (0: none): its certificates start in their
# future, as a joiner whose clock is behind (a Pi without an RTC battery before NTP) sees them.
CLOCK_AHEAD_ENV = "K3S_STANDIN_CLOCK_AHEAD"


def seconds_from_env(name: str, default: float) -> float:
    """A non-negative number of seconds from environment variable NAME; ValueError if bad."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"{name}={text!r} is not a number of seconds >= 0")
    return value
