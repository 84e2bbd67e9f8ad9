"""Avahi's D-Bus names, signatures and enums, verbatim, in one place.

Sources: the interface XML shipped in /usr/share/dbus-1/interfaces/org.freedesktop.Avahi.*.xml
(avahi 0.8, https://github.com/avahi/avahi/tree/master/avahi-daemon) and the enums of
avahi-common/defs.h.
"""

from enum import IntEnum, IntFlag

BUS_NAME = "org.freedesktop.Avahi"
SERVER_PATH = "/"

IFACE_SERVER = "org.freedesktop.Avahi.Server"
IFACE_SERVER2 = "org.freedesktop.Avahi.Server2"  # avahi >= 0.8: *Prepare methods
IFACE_ENTRY_GROUP = "org.freedesktop.Avahi.EntryGroup"
IFACE_SERVICE_BROWSER = "org.freedesktop.Avahi.ServiceBrowser"
IFACE_SERVICE_RESOLVER = "org.freedesktop.Avahi.ServiceResolver"
IFACE_RECORD_BROWSER = "org.freedesktop.Avahi.RecordBrowser"

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_IFACE = "org.freedesktop.DBus"

# Error names from avahi-common/dbus.h (AVAHI_DBUS_ERR_*).
ERR_COLLISION = "org.freedesktop.Avahi.CollisionError"
ERR_NOT_FOUND = "org.freedesktop.Avahi.NotFoundError"
ERR_TIMEOUT = "org.freedesktop.Avahi.TimeoutError"
ERR_BAD_STATE = "org.freedesktop.Avahi.BadStateError"
# The bus itself, when avahi-daemon is not running or its object went away.
ERR_SERVICE_UNKNOWN = "org.freedesktop.DBus.Error.ServiceUnknown"
ERR_NAME_HAS_NO_OWNER = "org.freedesktop.DBus.Error.NameHasNoOwner"
ERR_NO_REPLY = "org.freedesktop.DBus.Error.NoReply"
ERR_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"
ERR_UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"

IF_UNSPEC = -1  # AVAHI_IF_UNSPEC: every interface


class Protocol(IntEnum):
    """AvahiProtocol."""

    UNSPEC = -1
    INET = 0
    INET6 = 1


class ServerState(IntEnum):
    """AvahiServerState."""

    INVALID = 0
    REGISTERING = 1
    RUNNING = 2
    COLLISION = 3
    FAILURE = 4


class EntryGroupState(IntEnum):
    """AvahiEntryGroupState."""

    UNCOMMITED = 0  # sic, as in defs.h
    REGISTERING = 1
    ESTABLISHED = 2
    COLLISION = 3
    FAILURE = 4


class LookupResultFlags(IntFlag):
    """AvahiLookupResultFlags, as carried in ItemNew/Found."""

    CACHED = 1
    WIDE_AREA = 2
    MULTICAST = 4
    LOCAL = 8  # the record comes from this host
    OUR_OWN = 16  # the record was published by this very client
    STATIC = 32


# Method signatures: (in-signature, out-signature), as in the interface XML.
SIG_SERVICE_BROWSER_PREPARE = ("(iissu)", "(o)")  # interface, protocol, type, domain, flags
SIG_SERVICE_RESOLVER_PREPARE = ("(iisssiu)", "(o)")  # ..., name, type, domain, aprotocol, flags
SIG_RECORD_BROWSER_PREPARE = ("(iisqqu)", "(o)")  # interface, protocol, name, class, type, flags
# interface, protocol, flags, name, class, type, ttl, rdata
SIG_ADD_RECORD = ("(iiusqquay)", "()")

# AvahiPublishFlags (avahi-common/defs.h), the two AddRecord needs.
PUBLISH_UNIQUE = 1  # probe the record and defend it: SRV and TXT
PUBLISH_UPDATE = 64  # replace the group's record of that name and type in place
