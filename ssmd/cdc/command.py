"""`ssmd cdc`: settings and flags of the publisher daemon, and its entry point."""

from __future__ import annotations

import argparse
import asyncio

from ssmd import config
from ssmd.bus.connect import add_nats_auth_arguments, nats_auth_from_args
from ssmd.bus.publisher import PublishSettings
from ssmd.bus.stream import StreamLimits
from ssmd.cdc.daemon import CdcDaemon, CdcSettings
from ssmd.core.errors import ConfigError
from ssmd.gctune import tune_for_daemon
from ssmd.logs import setup_logging
from ssmd.pg.replication import validate_slot_name

_SETTINGS = (
    config.DATABASE_URL, config.NATS_URL, config.REPLICATION_SLOT, config.CDC_TABLES, config.NATS_STREAM,
    config.POLL_INTERVAL_MS, config.METRICS_PORT, config.LOG_LEVEL,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_settings(parser, *_SETTINGS)
    add_nats_auth_arguments(parser)

    stream = parser.add_argument_group("stream settings (applied when the stream is created or differs)")
    stream.add_argument("--stream-replicas", type=int, default=1, help="number of stream replicas in a NATS cluster (default 1)")
    stream.add_argument("--stream-max-messages", type=int, default=0, help="max messages kept; oldest discarded beyond it (default 0 = unlimited)")
    stream.add_argument("--stream-max-bytes", type=int, default=0, help="max stream size in bytes; oldest discarded beyond it (default 0 = unlimited)")
    stream.add_argument("--stream-max-age", type=float, default=0, help="max message age in seconds (default 0 = unlimited)")
    stream.add_argument("--duplicate-window", type=float, default=120, help="seconds JetStream remembers a message id to drop repeats (default 120)")

    daemon = parser.add_argument_group("publisher")
    daemon.add_argument("--poll", action="store_true", help="read with pg_logical_slot_peek_changes every POLL_INTERVAL_MS instead of streaming replication")
    daemon.add_argument("--heartbeat-interval", type=float, default=0, help="seconds without changes after which a heartbeat mark is written so the slot keeps moving (default 0 = off)")
    daemon.add_argument("--max-in-flight", type=int, default=2000, help="max messages published and waiting for their PubAck (default 2000)")
    daemon.add_argument("--max-in-flight-bytes", type=int, default=64 * 1024 * 1024, help="max body bytes waiting for PubAcks (default 67108864 = 64 MiB)")
    daemon.add_argument("--ack-timeout", type=float, default=5, help="seconds to wait for a PubAck before publishing again with the same id (default 5)")
    daemon.add_argument("--batch-size", type=int, default=500, help="changes buffered for one batched re-read of TOAST/NaN columns (default 500)")
    daemon.add_argument("--status-interval", type=float, default=10, help="seconds between standby status updates to PostgreSQL (default 10)")


def settings_from_args(args: argparse.Namespace) -> CdcSettings:
    """Validate the parsed flags into CdcSettings; raise ConfigError naming the bad value."""
    for name, minimum in (("stream_replicas", 1), ("max_in_flight", 1), ("batch_size", 1), ("max_in_flight_bytes", 1)):
        if getattr(args, name) < minimum:
            raise ConfigError(f"invalid --{name.replace('_', '-')} {getattr(args, name)}: must be at least {minimum}")
    for name in ("stream_max_messages", "stream_max_bytes", "stream_max_age", "duplicate_window", "heartbeat_interval"):
        if getattr(args, name) < 0:
            raise ConfigError(f"invalid --{name.replace('_', '-')} {getattr(args, name)}: must not be negative")
    for name in ("ack_timeout", "status_interval"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"invalid --{name.replace('_', '-')} {getattr(args, name)}: must be positive")

    return CdcSettings(
        database_url=config.require(args.database_url, config.DATABASE_URL),
        nats_url=config.require(args.nats_url, config.NATS_URL),
        slot=validate_slot_name(config.require(args.replication_slot, config.REPLICATION_SLOT)),
        tables=config.parse_tables(args.cdc_tables),
        stream=config.require(args.nats_stream, config.NATS_STREAM),
        nats_auth=nats_auth_from_args(args),
        limits=StreamLimits(
            replicas=args.stream_replicas, max_messages=args.stream_max_messages, max_bytes=args.stream_max_bytes,
            max_age_s=args.stream_max_age, duplicate_window_s=args.duplicate_window,
        ),
        publish=PublishSettings(
            max_in_flight=args.max_in_flight, max_in_flight_bytes=args.max_in_flight_bytes, ack_timeout_s=args.ack_timeout,
        ),
        poll=args.poll,
        poll_interval_s=config.parse_int(args.poll_interval_ms, config.POLL_INTERVAL_MS, minimum=1) / 1000,
        heartbeat_s=args.heartbeat_interval,
        status_interval_s=args.status_interval,
        batch_size=args.batch_size,
        metrics_port=config.parse_int(args.metrics_port, config.METRICS_PORT),
    )


def run(args: argparse.Namespace) -> int:
    if str(args.log_level).upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"invalid LOG_LEVEL {args.log_level!r}: use DEBUG, INFO, WARNING or ERROR")
    setup_logging(args.log_level)
    settings = settings_from_args(args)
    tune_for_daemon()
    return asyncio.run(CdcDaemon(settings).run())
