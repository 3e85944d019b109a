"""Prometheus metrics and a small HTTP server for /metrics, /healthz and /readyz.

Both daemons use it. Each daemon builds its metrics on its own `CollectorRegistry`, so tests can
run several daemons in one process, and starts `HealthServer` on 127.0.0.1 only: the endpoints
carry no secrets, but nothing outside the host needs them either. The server runs in a daemon
thread because `http.server` blocks; the handlers only read a flag and render the registry.
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)

# Publish latency from handing a message to nats-py to its PubAck, in seconds.
PUBLISH_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Readiness:
    """A thread-safe flag with the reason it is down, shown by /readyz."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False
        self._reason = "starting"

    def set_ready(self) -> None:
        with self._lock:
            self._ready, self._reason = True, "ready"

    def set_not_ready(self, reason: str) -> None:
        with self._lock:
            self._ready, self._reason = False, reason

    def state(self) -> tuple[bool, str]:
        with self._lock:
            return self._ready, self._reason


LATENCY_SAMPLE_EVERY = 16  # a histogram observation per PubAck cost about 1 µs of the cdc's ~75 per change


class CdcMetrics:
    """Metrics of `ssmd cdc`, the publisher daemon."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.changes_read = Counter("ssmd_cdc_changes_read", "Row changes decoded from wal2json", registry=r)
        self.changes_published = Counter("ssmd_cdc_changes_published", "Messages acknowledged by JetStream (duplicates included)", registry=r)
        self.duplicates = Counter("ssmd_cdc_publish_duplicates", "PubAcks that reported a duplicate message id", registry=r)
        self.publish_retries = Counter("ssmd_cdc_publish_retries", "Publishes retried after a timeout or error", registry=r)
        self.bytes_read = Counter("ssmd_cdc_wal2json_bytes_read", "Bytes of wal2json output received", registry=r)
        self.bytes_published = Counter("ssmd_cdc_bytes_published", "Message body bytes acknowledged by JetStream", registry=r)
        self.transactions = Counter("ssmd_cdc_transactions", "Transactions whose commit record was read", registry=r)
        self.reread_rows = Counter("ssmd_cdc_reread_rows", "Rows re-read to fill TOAST-omitted or NaN-ambiguous columns", registry=r)
        self.reconnects = Counter("ssmd_cdc_reconnects", "Sessions restarted after PostgreSQL or NATS failed", registry=r)
        self.confirmed_lsn = Gauge("ssmd_cdc_confirmed_lsn", "Slot position last confirmed (LSN as a number)", registry=r)
        self.slot_lag_bytes = Gauge("ssmd_cdc_slot_lag_bytes", "Server WAL end minus the confirmed position, in bytes", registry=r)
        self.in_flight_messages = Gauge("ssmd_cdc_in_flight_messages", "Messages published and waiting for their PubAck", registry=r)
        self.in_flight_bytes = Gauge("ssmd_cdc_in_flight_bytes", "Body bytes of messages waiting for their PubAck", registry=r)
        self.publish_latency = Histogram(
            "ssmd_cdc_publish_latency_seconds", f"Time from publish to PubAck, in seconds, of one in {LATENCY_SAMPLE_EVERY} PubAcks",
            buckets=PUBLISH_LATENCY_BUCKETS, registry=r,
        )


class HealthServer:
    """HTTP server on 127.0.0.1:`port`: /metrics, /healthz (process alive) and /readyz."""

    def __init__(self, port: int, registry: CollectorRegistry, readiness: Readiness) -> None:
        self._registry = registry
        self._readiness = readiness
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ssmd-health", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def start(self) -> None:
        self._thread.start()
        log.info("metrics and health endpoints listening port=%s", self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        registry, readiness = self._registry, self._readiness

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (name fixed by http.server)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._reply(200, b"ok\n")
                elif path == "/readyz":
                    ready, reason = readiness.state()
                    self._reply(200 if ready else 503, f"{reason}\n".encode())
                else:
                    self._reply(404, b"not found: use /metrics, /healthz or /readyz\n")

            def _reply(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would flood the daemon's log

        return Handler


def start_health_server(port: int, registry: CollectorRegistry, readiness: Readiness) -> HealthServer | None:
    """Start the server when `port` is not 0 (METRICS_PORT=0 disables it)."""
    if port == 0:
        return None
    server = HealthServer(port, registry, readiness)
    server.start()
    return server
