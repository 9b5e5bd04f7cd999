"""``pear-mqtt dashboard``: a read-only page over a ``make up`` topology (docs/DASHBOARD.md)."""
