"""The only code that touches D-Bus: Avahi's publisher and browser behind plain async methods."""
