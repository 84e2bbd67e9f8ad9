"""A client of a lab node's system bus that forges Avahi's signals, and says who it is.

To every other connection on the bus (unique names, avahi-daemon's excepted) and to the bus at
large, it sends what would steer an agent that believed it: ItemNew for a fake server on the
agent's browser path, that server's Found on every resolver path the agent's client could have,
COLLISION on its entry groups and on the server. Prints {"sender": <its unique name>, "sent": n}.
Usage (inside a node): python3 -m tests.integration.forge_probe BROWSER_PATH GROUP_PATH... NAME
"""

from __future__ import annotations

import json
import sys
import time
import warnings

from agent.avahi import defs
from agent.mdns.records import Advert, Role, encode_txt

with warnings.catch_warnings():  # gi's importer warns under Python 3.11; not ours to fix
    warnings.simplefilter("ignore", ImportWarning)
    from gi.repository import Gio, GLib

STYPE = "_k3s-sugar-dev._tcp"
RESOLVERS = 32  # resolver paths tried per client: /ClientN/ServiceResolver1..32
FAKE = Advert(
    cluster="sugar", env="dev", role=Role.SERVER, phase="serving", host="evil.local",
    leader="evil.local", ip4="10.242.0.250", ip6="", key="0000000000000000",
    vote="0000000000000000", servers="3",
)


def forge(browser: str, groups: list[str], name: str) -> dict[str, object]:
    con = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
    names = con.call_sync(
        defs.DBUS_NAME, defs.DBUS_PATH, defs.DBUS_IFACE, "ListNames", None,
        GLib.VariantType.new("(as)"), Gio.DBusCallFlags.NONE, 5000, None,
    ).unpack()[0]
    avahi = con.call_sync(
        defs.DBUS_NAME, defs.DBUS_PATH, defs.DBUS_IFACE, "GetNameOwner",
        GLib.Variant("(s)", (defs.BUS_NAME,)), GLib.VariantType.new("(s)"),
        Gio.DBusCallFlags.NONE, 5000, None,
    ).unpack()[0]
    me = con.get_unique_name()
    targets = [n for n in names if n.startswith(":") and n not in (me, avahi)] + [None]
    item = (2, 0, name, STYPE, "local")
    txt = list(reversed(encode_txt(FAKE)))  # Found carries them reversed (browser.py)
    found = GLib.Variant("(iissssisqaayu)", (*item, "evil.local", 0, FAKE.ip4, 6443, txt, 0))
    new = GLib.Variant("(iisssu)", (*item, 0))
    client = browser.rsplit("/", 1)[0]
    signals = [(browser, defs.IFACE_SERVICE_BROWSER, "ItemNew", new)]
    signals += [
        (f"{client}/ServiceResolver{n}", defs.IFACE_SERVICE_RESOLVER, "Found", found)
        for n in range(1, RESOLVERS + 1)
    ]
    collision = GLib.Variant("(is)", (defs.EntryGroupState.COLLISION, ""))
    signals += [(path, defs.IFACE_ENTRY_GROUP, "StateChanged", collision) for path in groups]
    signals.append((defs.SERVER_PATH, defs.IFACE_SERVER, "StateChanged",
                    GLib.Variant("(is)", (defs.ServerState.COLLISION, ""))))
    sent = 0
    for path, interface, member, args in signals:
        for target in targets:
            con.emit_signal(target, path, interface, member, args)
            sent += 1
        if member == "ItemNew":
            con.flush_sync(None)
            time.sleep(0.5)  # a believer creates its resolver now: Found then lands on it
    con.flush_sync(None)
    return {"sender": me, "sent": sent, "targets": len(targets)}


if __name__ == "__main__":
    print(json.dumps(forge(sys.argv[1], sys.argv[2:-1], sys.argv[-1])), flush=True)
