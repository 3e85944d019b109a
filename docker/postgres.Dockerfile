# PostgreSQL 15 with the wal2json output plugin, for compose.yaml.
# The official image's apt sources (the PostgreSQL project's repository) carry the plugin.
FROM postgres:15-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-15-wal2json \
    && rm -rf /var/lib/apt/lists/*

# Logical decoding needs wal_level=logical; ssmd uses one slot for `ssmd cdc` and a temporary
# one per cache warm or verify, so the defaults of 10 leave room for a few deployments.
CMD ["postgres", "-c", "wal_level=logical", "-c", "max_replication_slots=16", "-c", "max_wal_senders=16"]
