"""Prometheus metrics of `ssmd cache`, on the daemon's own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.applied = Counter("ssmd_cache_changes_applied", "Key writes and deletes that changed Redis", registry=r)
        self.stale = Counter("ssmd_cache_changes_stale", "Key writes skipped because Redis held the same or a newer version", registry=r)
        self.skipped = Counter("ssmd_cache_changes_in_snapshot", "Changes skipped because the warm snapshot already contains them", registry=r)
        self.tombstones = Counter("ssmd_cache_tombstones_written", "Deletes that left a versioned tombstone", registry=r)
        self.terminated = Counter("ssmd_cache_messages_terminated", "Messages terminated as poison or after too many deliveries", registry=r)
        self.redelivered = Counter("ssmd_cache_messages_redelivered", "Messages received with a delivery count above 1", registry=r)
        self.warms = Counter("ssmd_cache_warms", "Warms started (the log line gives each reason)", registry=r)
        self.lag_seconds = Gauge("ssmd_cache_lag_seconds", "Time from the commit of the last applied change to its write in Redis", registry=r)
        self.lag_bytes = Gauge("ssmd_cache_lag_lsn_bytes", "Newest LSN seen on the stream minus the applied LSN, in bytes", registry=r)
        self.stream_seq = Gauge("ssmd_cache_stream_seq", "Highest stream sequence applied with all earlier ones", registry=r)
        self.warm_rows = Gauge("ssmd_cache_warm_rows", "Rows written by the current or last warm", registry=r)
        self.warm_rows_per_second = Gauge("ssmd_cache_warm_rows_per_second", "Warm write rate over the current or last warm", registry=r)
        self.warm_swept = Gauge("ssmd_cache_warm_swept_keys", "Keys removed by the sweep after the last warm", registry=r)
