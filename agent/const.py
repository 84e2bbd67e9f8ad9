"""Timings and limits, each with its unit and where the number comes from.

Tests shrink these through fixtures (monkeypatching this module), never by editing code.
"""

from pathlib import Path

# Exit codes (sysexits.h where one fits; DESIGN.md §A "Command line").
EXIT_OK = 0
EXIT_FAIL = 1  # timed out, refused, nothing found
EXIT_USAGE = 2  # argparse's code for a bad flag or value
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: the daemon (or avahi-daemon) cannot be reached
EXIT_CONFIG = 78  # EX_CONFIG: bad configuration; systemd's RestartPreventExitStatus= names it

DEFAULT_CONFIG_PATH = Path("/etc/sugarkube/agent.yaml")
STATE_DIR = Path("/var/lib/sugarkube")

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
VERIFY_REPORT_LOCK_TIMEOUT = 10.0  # s; wait for another verifier appending to the same report
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
CONFIG_MAX_BYTES = 1 << 20  # bytes; agent.yaml is ~3 KiB, the cap stops `--config /dev/zero`
TOKEN_FILE_MAX_BYTES = 4096  # bytes; a secure k3s token is ~110 (K10 + 64 hex + ::server: + 32)
IFNAME_MAX = 15  # bytes; IFNAMSIZ (16, include/uapi/linux/if.h) less the NUL
# chars; the instance name `k3s-<cluster>-<env>@<host>.local (<role>)` is one DNS label of at
# most 63 bytes (RFC 1034 §3.1, RFC 6763 §7.2); with env=staging and role=bootstrap the fixed
# part is 31, leaving 32 for cluster and hostname: 16 each.
CLUSTER_NAME_MAX = 16
