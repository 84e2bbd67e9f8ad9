"""The long-running service: lifecycle, systemd notify, metrics, netlink."""
