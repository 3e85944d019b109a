"""`ssmd cdc`: the publisher daemon from a wal2json slot to NATS JetStream."""
