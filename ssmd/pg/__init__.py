"""PostgreSQL adapters: connections, catalog look-ups, replication and snapshots."""
