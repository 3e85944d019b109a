"""`ssmd cache`: settings and flags of the cache daemon, and its entry point."""

from __future__ import annotations

import argparse
import asyncio
import signal

from ssmd import config
from ssmd.bus.connect import add_nats_auth_arguments, nats_auth_from_args
from ssmd.cache.daemon import CacheDaemon, CacheSettings
from ssmd.core.errors import ConfigError
from ssmd.gctune import tune_for_daemon
from ssmd.logs import setup_logging

_SETTINGS = (
    config.DATABASE_URL, config.NATS_URL, config.REDIS_URL, config.CDC_TABLES, config.NATS_STREAM,
    config.CONSUMER_NAME, config.CACHE_NAMESPACES, config.METRICS_PORT, config.LOG_LEVEL,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_settings(parser, *_SETTINGS)
    add_nats_auth_arguments(parser)
    group = parser.add_argument_group("consumer")
    group.add_argument("--ack-wait", type=float, default=30, help="seconds JetStream waits for an ack before redelivering (default 30)")
    group.add_argument("--max-deliver", type=int, default=5, help="deliveries of a failing message before it is terminated (default 5)")
    group.add_argument("--fetch-batch", type=int, default=500, help="messages fetched and applied per batch (default 500)")
    group.add_argument("--check-interval", type=float, default=5, help="seconds between stream continuity checks (default 5)")
    group.add_argument("--warm-delay-ms", type=int, default=0, help="milliseconds to pause between warm write batches, to slow a warm for tests (default 0)")


def settings_from_args(args: argparse.Namespace) -> CacheSettings:
    """Validate the parsed flags into CacheSettings; raise ConfigError naming the bad value."""
    for name, minimum in (("max_deliver", 1), ("fetch_batch", 1), ("warm_delay_ms", 0)):
        if getattr(args, name) < minimum:
            raise ConfigError(f"invalid --{name.replace('_', '-')} {getattr(args, name)}: must be at least {minimum}")
    for name in ("ack_wait", "check_interval"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"invalid --{name.replace('_', '-')} {getattr(args, name)}: must be positive")
    return CacheSettings(
        database_url=config.require(args.database_url, config.DATABASE_URL),
        nats_url=config.require(args.nats_url, config.NATS_URL),
        redis_url=config.require(args.redis_url, config.REDIS_URL),
        tables=config.parse_tables(args.cdc_tables),
        stream=config.require(args.nats_stream, config.NATS_STREAM),
        consumer=config.require(args.consumer_name, config.CONSUMER_NAME),
        namespaces=config.parse_namespaces(args.cache_namespaces),
        nats_auth=nats_auth_from_args(args),
        metrics_port=config.parse_int(args.metrics_port, config.METRICS_PORT),
        ack_wait_s=args.ack_wait,
        max_deliver=args.max_deliver,
        fetch_batch=args.fetch_batch,
        check_interval_s=args.check_interval,
        warm_delay_ms=args.warm_delay_ms,
    )


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    settings = settings_from_args(args)
    tune_for_daemon()
    asyncio.run(_main(settings))
    return 0


async def _main(settings: CacheSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await CacheDaemon(settings).run(stop)
