"""Timings and limits, each with its unit and where the number comes from.

Tests shrink these through fixtures (monkeypatching this module), never by editing code.
"""

from pathlib import Path

# Exit codes (sysexits.h where one fits; DESIGN.md §A "Command line").
EXIT_OK = 0
EXIT_FAIL = 1  # timed out, refused, nothing found
EXIT_USAGE = 2  # argparse's code for a bad flag or value
EXIT_OTHER_ROLE = 3  # `gate --role`: released in the other role (this k3s unit must not run)
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the daemon (or avahi-daemon) cannot be reached
EXIT_CONFIG = 78  # EX_CONFIG: bad configuration; systemd's RestartPreventExitStatus= names it

DEFAULT_CONFIG_PATH = Path("/etc/sugarkube/agent.yaml")
STATE_DIR = Path("/var/lib/sugarkube")
BALLOT_FILE = STATE_DIR / "ballot.json"  # election key and promises (agent/daemon/ballot.py)

K3S_API_PORT = 6443  # k3s supervisor/apiserver port, what every advert points at
HTTPS_SERVICE_TYPE = "_https._tcp"  # what the runbook's avahi-browse checks

# D-Bus
DBUS_CALL_TIMEOUT = 5.0  # s; pydbus/GDBus default is G_MAXINT ms (~25 days), never use it
AVAHI_RECONNECT_DELAY = 0.5  # s; first retry after avahi-daemon vanished, doubled up to the max
AVAHI_RECONNECT_DELAY_MAX = 5.0  # s

# Browsing
DISCOVER_TIMEOUT = 5.0  # s; default for `discover --timeout`
DISCOVER_SETTLE = 0.3  # s; after Avahi's AllForNow, wait this long for late resolutions
RESOLVE_TIMEOUT = 5.0  # s; Avahi's own resolver gives up after 5 s (avahi-core/resolve-service.c)

# Shutdown
SHUTDOWN_GRACE = 5.0  # s; withdraw adverts and stop within this; systemd's TimeoutStopSec is larger

# --- mDNS records (agent/mdns/records.py) ---
TXT_STRING_MAX = 255  # bytes per TXT string: one length octet (RFC 6763 §6.1)
DNS_LABEL_MAX = 63  # bytes per DNS label, instance names too (RFC 1035 §2.3.4, RFC 6763 §4.1.1)
ELECTION_KEY_HEX = 16  # hex digits of an election key (64 random bits; agent/daemon/ballot.py)

# --- Tables keyed by what the network sends (agent/bounded.py; issue 12 item 7) ---
PEER_TABLE_MAX = 1024  # entries of a table of names, hosts or keys heard (records ignored, servers
#   refused or held down, hosts with another servers=): a cluster fills a handful; past it the
#   oldest half goes
VIEW_ADVERTS_MAX = 8192  # adverts the election's view keeps; past it the oldest of those no
#   longer held go. Held ones stay well below: Avahi lists at most objects-per-client-max
#   (1024: one resolver each) and live rounds add <= LIVE_ROUND_MAX_NAMES per LIVE_SEEN_TTL s

# --- Verifier (agent/verify/) ---
VERIFY_COMMAND_TIMEOUT = 10.0  # s; per tool run (timedatectl, nft, iptables, cloud-init, dbus-send)
VERIFY_KUBECTL_TIMEOUT = 15.0  # s; kubectl also gets --request-timeout=VERIFY_KUBECTL_REQUEST
VERIFY_KUBECTL_REQUEST = "10s"  # kubectl's own API deadline, inside VERIFY_KUBECTL_TIMEOUT
VERIFY_KUBECTL_OUTPUT_CAP = 8 * 1024 * 1024  # bytes; `get nodes -o json` lists every node image
VERIFY_CHECK_CONFIG_TIMEOUT = 60.0  # s; `k3s check-config` unpacks its data dir on first use
VERIFY_AVAHI_TIMEOUT = 10.0  # s; avahi-browse -t / avahi-resolve; Avahi resolves within 5 s
VERIFY_KILL_GRACE = 2.0  # s; after SIGKILL to a timed-out tool's process group, wait this long
VERIFY_OUTPUT_CAP = 64 * 1024  # bytes kept per stream of a tool; the rest is read and discarded
VERIFY_FILE_CAP = 4 * 1024 * 1024  # bytes read from a /proc or /etc file (mountinfo grows w/ pods)
VERIFY_DETAIL_MAX = 300  # characters in a check's one-line detail
VERIFY_WORKERS = 8  # checks run concurrently, each bounded by its own timeout
VERIFY_PLUGIN_DIR = "/etc/sugarkube/checks.d"  # operator checks, one YAML file per check
VERIFY_PLUGIN_TIMEOUT = 10.0  # s; default `timeout:` of an operator check (NPD plugins: 5 s)
VERIFY_PLUGIN_TIMEOUT_MAX = 120.0  # s; larger `timeout:` values are a broken plugin file
VERIFY_PLUGIN_FILE_CAP = 64 * 1024  # bytes; a larger checks.d file is a broken plugin file
VERIFY_PLUGIN_GRACE = 5.0  # s beyond a plugin's timeout before its wrapper (agent/verify/reaper.py)
#   is killed too: it starts a Python (0.1-0.3 s on a Pi) and kills what the plugin left (ms)
VERIFY_REPORT_LOCK_TIMEOUT = 10.0  # s; wait for another verifier appending to the same report
VERIFY_REPORT_MAX = 256 * 1024  # bytes of report kept on the FAT boot partition: ~200 blocks of
#   ~1.2 KiB (25 checks); an append past it drops the oldest blocks, never the new one
VERIFY_MIGRATION_LOG = "/var/log/sugarkube/migrations.log"  # pi_node_verifier.sh's MIGRATION_LOG
VERIFY_MIGRATION_LINES_MAX = 200  # migration-log lines copied into one report block

# --- Logging (agent/log.py; DESIGN.md §A "Observability") ---
LOG_SALT_SIZE = 16  # bytes of random salt keying the address pseudonyms (HMAC-SHA256 key)
PSEUDONYM_HEX_DIGITS = 6  # hex digits shown (`ip-3fa2c1`): 24 bits, collisions unlikely on one LAN
SECRET_MIN_LENGTH = 8  # chars; shorter configured secrets would redact ordinary words

# --- Configuration (agent/config.py) ---
BOOT_FIRMWARE_DIR = Path("/boot/firmware")  # bookworm mounts the FAT boot partition here
BOOT_DIR = Path("/boot")  # where it was mounted before bookworm (bullseye and older images)
REPORT_FILENAME = "first-boot-report.txt"  # the verifier report's name in the runbook
METRICS_PORT = 9469  # TCP; DESIGN.md §A default for metrics.listen
METRICS_RETRY = 30.0  # s, at most, between attempts to bind a metrics port that was taken
INTERFACE_RETRY = 2.0  # s between looks for a usable interface while a member waits for one
CONFIG_MAX_BYTES = 1 << 20  # bytes; agent.yaml is ~3 KiB, the cap stops `--config /dev/zero`
TOKEN_FILE_MAX_BYTES = 4096  # bytes; a secure k3s token is ~110 (K10 + 64 hex + ::server: + 32)
IFNAME_MAX = 15  # bytes; IFNAMSIZ (16, include/uapi/linux/if.h) less the NUL
# chars; the instance name `k3s-<cluster>-<env>@<host>.local (<role>)` is one DNS label of at
# most 63 bytes (RFC 1034 §3.1, RFC 6763 §7.2); with env=staging and role=bootstrap the fixed
# part is 31, leaving 32 for cluster and hostname: 16 each.
CLUSTER_NAME_MAX = 16

# Cluster formation (agent/cluster/election.py, gate.py)
SETTLE_WINDOW = 2.0  # s after our advert is established before an election may be won; Avahi's
#   probe-and-announce takes ~0.9 s (3 probes 250 ms apart, RFC 6762 §8.1) plus 0-250 ms delay
CANDIDATE_HOLD = 3.0  # s a vanished candidate still counts: renaming to "(bootstrap)" re-probes
DEAD_SERVER_HOLD = 10.0  # s a vanished server, bootstrapper or agent advert still counts (an
#   avahi-daemon restart hides a node's adverts for 2.5-4 s, measured in the lab), and a server
#   that failed its proof while claiming to serve is not retried
JOIN_ORDER_WAIT = 120.0  # s the admitting server waits at most for a starting server or a
#   joiner to serve, and a grant (admit=) stands untaken, before the next one has its turn
#   (etcd admits one learner at a time: "too many learner members in cluster")
LEARNER_REMOVAL = 330.0  # s after a joiner was last heard until etcd no longer holds it as a
#   learner if it died: k3s removes a learner that made no progress for 5 minutes
#   (pkg/etcd learnerMaxStallTime), checked every 15 s (manageTickerTime), plus 15 s of margin;
#   a server join before that is refused ("too many learner members in cluster")
ETCD_VOTER_SETTLE = 6.0  # s a server serves before it advertises phase=serving and, unless it
#   is the only server, before it admits a joiner: etcd 3.4 refuses MemberAdd ("unhealthy
#   cluster") until every voter has been connected for its HealthInterval, 5 s
#   (etcdserver/server.go, mayAddMember); seen in the lab with a real etcd when a join
#   followed a promotion at once
JOIN_STALL_WARN = 180.0  # s waiting on a server or bootstrapper that does not serve before the
#   node warns (a Pi's k3s serves within 20-60 s of starting)
BOOTSTRAP_PROVE_RETRY = 0.5  # s between proofs of a bootstrapper whose k3s is still starting
FORMATION_TICK = 0.25  # s: the longest the formation loop waits without an observation
IDLE_WAKE = 3600.0  # s: the same, once the gate is open (nothing left to time)
ABSENCE_ROUNDS = 2  # consecutive absent live rounds (DESIGN.md §A "Double-absence gate")
ABSENCE_ROUND_GAP = 1.0  # s at least between the starts of counted rounds (DESIGN.md §A)
DB_INFO_MAX = 1 << 20  # bytes of k3s's /db/info answer read at most (a few hundred a member)
ETCD_INFO_TTL = 10.0  # s a server acts on its etcd's member list (k3s's /db/info, asked at
#   every live round while it admits joiners)
ADMISSION_IDLE_ROUND = 5.0  # s between a serving server's live rounds while a server slot is
#   free and no fresh node is listed: a joiner Avahi's browser never lists again (after a
#   partition heals) is still heard and admitted
ROUND_RETRY = 1.0  # s before a failed live round is asked for again (no address, sockets refused)

# --- k3s files (agent/tokens.py: k3s pkg/clientaccess/token.go; cluster/k3s.py: configfilearg) ---
K3S_K10_PREFIX = "K10"  # token.go tokenPrefix: starts `K10<ca hash>::<credentials>` tokens
K3S_CA_HASH_HEX = 64  # chars; token.go caHashLength = sha256.Size * 2
K3S_CONFIG_FILE_MAX = 1 << 20  # bytes; a k3s config file is a few KiB, the cap stops a runaway one
# The runbook's etcd snapshots, written for the servers of an etcd cluster unless the operator set
# them (k3s's own defaults: the same schedule, 5 kept): two a day, two weeks of them.
K3S_ETCD_SNAPSHOTS = (
    ("etcd-snapshot-schedule-cron", "0 */12 * * *"), ("etcd-snapshot-retention", 28),
)
K3S_DROPIN_MODE = 0o600  # our drop-in holds the join token (DESIGN.md §A "Gates")
K3S_DIR_MODE = 0o755  # /etc/rancher/k3s and config.yaml.d, as the k3s installer leaves them

# --- Port 6443 wire proof (agent/cluster/probe.py; DESIGN.md §A "Gates") ---
WIRE_PROOF_TIMEOUT = 10.0  # s; the whole proof, as k3s's client (token.go defaultClientTimeout)
PROBE_BODY_MAX = 64 * 1024  # bytes; /cacerts is one PEM CA (~0.6 KiB) or a short custom chain
PROBE_HEADER_MAX = 16 * 1024  # bytes; status line and headers (Go's net/http: 3 short headers)
PROBE_READ_CHUNK = 16 * 1024  # bytes per read: one TLS record's plaintext at most (RFC 8446 §5.1)
PROBE_DETAIL_MAX = 200  # characters in a ProofResult's one-line detail
CAPTURE_OPEN_TIMEOUT = 3.0  # s; first scapy import (0.2 s measured on x86; a Pi is slower) + socket
CAPTURE_SETTLE = 0.2  # s; after the connect, for the sniffer thread to dissect the SYN-ACK
CAPTURE_STOP_TIMEOUT = 1.0  # s; stop and join the sniffer thread (it wakes on a pipe at once)
LIVE_SEEN_TTL = 5.0  # s an advert a live round heard counts as live (rounds run back to back,
#   ~1 s each, until the release: a live node is heard again well within it, even with loss)

# Control socket and the k3s gate (agent/daemon/control.py, agent/client.py)
CONTROL_SOCKET = Path("/run/sugarkube/agent.sock")
GATE_RELEASED_MARKER = Path("/run/sugarkube/gate-released")  # tmpfs: once per boot
GATE_REPORT_INTERVAL = 5.0  # s between "why the gate waits" lines
GATE_UNREACHABLE_GRACE = 10.0  # s `gate` keeps trying to reach a daemon that is starting
LOCAL_API_POLL = 0.1  # s: first wait between checks that the local k3s API answers
LOCAL_API_POLL_MAX = 2.0  # s: the wait doubles up to this while k3s starts
WIPE_CONFIRM_TIMEOUT = 15.0  # s `wipe` waits for the double-absence of our own adverts
WIPE_STOP_TIMEOUT = 120.0  # s for `systemctl stop` of the k3s units (k3s-killall.sh waits as long)
WIPE_UMOUNT_TIMEOUT = 30.0  # s for one `umount -f` of a k3s or kubelet mount
ETCD_CLIENT_PORT = 2379  # k3s's embedded etcd: https://127.0.0.1:2379 and https://<node-ip>:2379
ETCD_TIMEOUT = 10.0  # s per request to etcd, k3s's etcd testTimeout (pkg/etcd, v1.22)
ETCD_ANSWER_MAX = 1 << 20  # bytes of an etcd JSON-gateway answer read at most
ETCD_UNHEALTHY_RETRY = 15.0  # s to retry a removal etcd refuses as "unhealthy cluster": its
#   strict reconfig check wants every voter connected to the leader for 5 s (etcdserver
#   HealthInterval), so a member promoted or restarted just now defers it; k3s retries too
ETCD_RETRY_EVERY = 1.0  # s between those tries

# --- Live rounds on the wire (agent/mdns/wire.py; DESIGN.md §A "Double-absence gate") ---
# Avahi 0.8 (avahi-core/response-sched.c) multicasts a shared record such as the PTR 20 ms plus
# up to 100 ms of jitter after the question (RFC 6762 §6), never re-sends a record it multicast
# in the last 500 ms (AVAHI_RESPONSE_HISTORY_MSEC), and does not multicast to a querier *address*
# that listed the record as a known answer in the last 700 ms (AVAHI_RESPONSE_SUPPRESS_MSEC); for
# a QU question it then answers by unicast at once. Schedule and measurements: wire.py docstring.
LIVE_ROUND_WINDOW = 1.0  # s a round listens; the resend's answers are in by 0.5 + 0.12 s (+ DTIM)
LIVE_ROUND_RESEND = 0.5  # s: the PTR question again, with SRV/TXT of instances heard without them
LIVE_ROUND_FOLLOWUP = 0.75  # s: SRV/TXT/A of instances still without them, if any
LIVE_ROUND_QU = True  # unicast-response bit set (RFC 6762 §5.4): see agent/mdns/wire.py
LIVE_ROUND_START_TIMEOUT = 2.0  # s for the fresh instance's sockets to be on the loop (~1 ms here)
LIVE_ROUND_CLOSE_TIMEOUT = 2.0  # s to wait for it to close; zeroconf's own close waits <= 1 s
LIVE_ROUND_MAX_NAMES = 1024  # instances, and hosts with addresses, kept per round: flood bound
PROC_UDP_LINES_MAX = 65536  # lines of /proc/net/udp read for a round's drop counters (bounded)
IGNORED_MAX = 256  # adverts said once each in the journal as ignored; a flood only counts
LIVE_ROUND_MAX_FOLLOWUP = 64  # instances asked about again per query; a cluster has a handful
DNS_TYPE_A = 1  # RFC 1035 §3.2.2
DNS_TYPE_PTR = 12  # RFC 1035 §3.2.2
DNS_TYPE_TXT = 16  # RFC 1035 §3.2.2
DNS_TYPE_SRV = 33  # RFC 2782
DNS_CLASS_IN = 1  # RFC 1035 §3.2.4; the top bit clear makes a question QM (RFC 6762 §5.4)
DNS_FLAGS_QUERY = 0x0000  # QR=0, opcode 0: a standard query (RFC 6762 §18.2-18.3)
IP_MULTICAST_ALL = 49  # linux/in.h; 0 = a socket gets only the groups it joined, where it joined
IPV6_MULTICAST_ALL = 29  # linux/in6.h (Linux 4.20): the same for IPv6 sockets
GATE_TIMEOUT = 900.0  # s: `gate --timeout` default (systemd/k3s.service.d/10-sugarkube-gate.conf)
SPLIT_BRAIN_MARKER = Path("/run/sugarkube/split-brain")  # two cluster CAs heard: the verifier fails
VERIFIED_MARKER = Path("/run/sugarkube/verified")  # tmpfs: the daemon's verifier ran this boot
VERIFIER_WAIT_FOR_K3S = 120.0  # s after the release to wait for k3s before verifying anyway

# --- systemd notify (agent/daemon/notify.py; sd_notify(3), systemd.service(5) WatchdogSec=) ---
NOTIFY_STATUS_MAX = 1000  # characters of STATUS=; x 4 bytes of UTF-8 + "STATUS=" fit systemd's
#   4096-byte notify datagram (NOTIFY_BUFFER_MAX = PIPE_BUF, src/basic/def.h); longer is dropped
WATCHDOG_PROOF_SHARE = 0.5  # of the ping interval (WATCHDOG_USEC / 2) a proof of life may take:
#   timely pings are then at most 0.75 x WATCHDOG_USEC apart, inside systemd's deadline

# --- Metrics (agent/daemon/metrics.py; DESIGN.md §A "Observability") ---
# Histogram upper bounds, s. Discovery: Avahi answers a visible server in ~90 ms (DESIGN.md §A,
# measured in the lab); `discover --timeout` defaults to DISCOVER_TIMEOUT (5 s).
METRICS_DISCOVERY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Absence gate: two live rounds of LIVE_ROUND_WINDOW (1 s) started ABSENCE_ROUND_GAP (1 s) apart
# take 2 s at the least; a presence in between restarts the count.
METRICS_ABSENCE_BUCKETS = (2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0, 120.0)
# Wire proof: a LAN TCP+TLS handshake and /cacerts take milliseconds; WIRE_PROOF_TIMEOUT is 10 s.
METRICS_WIRE_PROOF_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METRICS_REASONS_MAX = 16  # distinct join_refused reasons kept; later ones count as "other"
METRICS_CHECKS_MAX = 128  # verifier checks exported per run (~25 built in, plus checks.d)
METRICS_REQUEST_MAX = 8 * 1024  # bytes of request line and headers; Prometheus sends ~250
METRICS_HEADERS_MAX = 64  # header lines in one request
METRICS_READ_TIMEOUT = 5.0  # s for the whole request head; scrapers send it in one segment
METRICS_WRITE_TIMEOUT = 5.0  # s to hand the response to the kernel (~10 KiB fits its buffer)
METRICS_CONNECTIONS_MAX = 256  # open connections (one fd each); more are reset at once
METRICS_RESOLVE_TIMEOUT = 2.0  # s to resolve a host name in metrics.listen (lab: no DNS)
METRICS_CLOSE_TIMEOUT = 2.0  # s for open connections to end when the server closes
METRICS_ACCEPT_BATCH = 32  # connections accepted per loop wake-up (asyncio's default is 100)
METRICS_RENDER_REUSE = 1.0  # s a render serves further scrapes unless an event changed a metric

# --- Netlink watch of the mDNS interface (agent/daemon/netlink.py; issue 5 item 4) ---
NETLINK_SETTLE = 0.1  # s without another change before one is reported: a renumber (del+add,
#   `ip addr replace`, a DHCP client's swap) lands within ms, so it gives one event; the lab
#   measures the whole path (event to the peer's new ip4) against issue 5's 2 s
NETLINK_SETTLE_MAX = 1.0  # s a change is held at most while the link keeps flapping
NETLINK_RECV_SIZE = 64 * 1024  # bytes per datagram read; one notification is well under 32 KiB
NETLINK_DRAIN_MAX = 256  # datagrams read per loop pass; the rest wait for the next pass
ADDRESS_LOSS_SETTLE = 1.0  # s an address must stay gone before the advert drops it

# --- No-D-Bus fallback (agent/mdns/fallback.py; SUGARKUBE_MDNS_DBUS=0, issue 5 item 5) ---
FALLBACK_SERVICE_FILE_MODE = 0o644  # avahi-daemon reads /etc/avahi/services as its own user
FALLBACK_CONFIRM_RETRY = 0.5  # s between live rounds that look for our own static advert
FALLBACK_BROWSE_INTERVAL = 1.0  # s from one browse round's start to the next: back to back, as a
#   round lasts LIVE_ROUND_WINDOW (1 s); 3 queries/s per node, a handful of nodes on the link
FALLBACK_BROWSE_MISSES = 2  # consecutive rounds a record must be missing before it is removed:
#   one lost answer must not flap the peer table
DEBUG_ARGS_MAX = 500  # characters of a D-Bus signal's arguments in a debug line
