"""`make bench`: figures measured on the lab of real avahi-daemon/dbus-daemon nodes."""
