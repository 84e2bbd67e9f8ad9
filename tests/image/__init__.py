"""Booting a real Debian bookworm system under systemd-nspawn, for the boot tests."""
