"""NATS JetStream adapters: connection, stream set-up, publishing and consuming."""
