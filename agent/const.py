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
