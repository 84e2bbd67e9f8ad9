"""mDNS records (pure), live wire queries, and the no-D-Bus fallback."""
