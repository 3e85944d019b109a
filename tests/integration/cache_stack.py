"""Helpers for the cache's integration tests: schema, subprocess daemons, waits, Redis reads."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import redis

SCHEMA = Path(__file__).parents[2] / "ssmd" / "sql" / "schema.sql"


def apply_schema(dsn: str, extra_sql: str = "") -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA.read_text())
        if extra_sql:
            conn.execute(extra_sql)


def execute(dsn: str, *statements: str) -> None:
    """Run each statement in its own transaction."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def start_ssmd(command: str, env: dict[str, str], *flags: str, log_path: Path | None = None) -> subprocess.Popen:
    """Start `python -m ssmd <command>` with `env` added to the environment."""
    full_env = {**os.environ, **env, "LOG_LEVEL": env.get("LOG_LEVEL", "INFO")}
    output = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "ssmd", command, *flags], env=full_env, stdout=output, stderr=output)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    """Signal one process we started (by its pid) and wait for it."""
    if process.poll() is None:
        process.send_signal(sig)
    return process.wait(timeout=timeout)


def run_verify(env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-m", "ssmd", "verify", "--timeout", str(timeout)],
        env=full_env, capture_output=True, text=True, timeout=timeout + 60,
    )


def meta(redis_url: str) -> dict[str, str]:
    with redis.Redis.from_url(redis_url, protocol=2) as client:
        return {key.decode(): value.decode() for key, value in client.hgetall("secmaster:meta").items()}


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


async def wait_until_async(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_ready(redis_url: str, timeout: float = 60) -> dict[str, str]:
    return wait_until(lambda: (m := meta(redis_url)).get("state") == "ready" and m, timeout, "cache state ready")


def cached(redis_url: str, key: str) -> bytes | None:
    with redis.Redis.from_url(redis_url, protocol=2) as client:
        return client.get(key)


class InProcessCache:
    """A CacheDaemon running as a task of the test's event loop."""

    def __init__(self, settings, hooks=None) -> None:
        from ssmd.cache.daemon import CacheDaemon

        self.daemon = CacheDaemon(settings, hooks=hooks)
        self.settings = settings
        self._stop = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> InProcessCache:
        self._task = asyncio.create_task(self.daemon.run(self._stop))
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._stop.set()
        await asyncio.wait_for(self._task, 60)

    def sample(self, name: str) -> float:
        return self.daemon.metrics.registry.get_sample_value(name) or 0.0

    async def wait_warms(self, count: int, timeout: float = 60) -> None:
        await wait_until_async(lambda: self.daemon.warms_done >= count and meta(self.settings.redis_url).get("state") == "ready", timeout, f"{count} finished warm(s)")


def cache_settings(env: dict[str, str], **overrides):
    from ssmd.cache.daemon import CacheSettings

    values = dict(
        database_url=env["DATABASE_URL"], nats_url=env["NATS_URL"], redis_url=env["REDIS_URL"],
        tables=["events", "markets", "series_fees"], stream=env["NATS_STREAM"], consumer="ssmd-cache",
        ack_wait_s=5.0, max_deliver=5, fetch_batch=500, fetch_timeout_s=0.3, check_interval_s=1.0,
    )
    values.update(overrides)
    return CacheSettings(**values)


async def wait_for_stream(nats_url: str, stream: str, timeout: float = 30) -> None:
    import nats

    from ssmd.bus.stream import read_stream_state

    client = await nats.connect(nats_url)
    try:
        deadline = time.monotonic() + timeout
        while await read_stream_state(client.jetstream(), stream) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"stream {stream} not created within {timeout}s; is ssmd cdc running?")
            await asyncio.sleep(0.1)
    finally:
        await client.close()


async def verify_now(env: dict[str, str], timeout: float = 30):
    from ssmd.config import parse_namespaces
    from ssmd.core.keys import KeySpace
    from ssmd.verify import verify

    keyspace = KeySpace(namespaces=parse_namespaces("markets=market,events=event,series_fees=fee"))
    return await verify(env["DATABASE_URL"], env["REDIS_URL"], ["events", "markets", "series_fees"], keyspace, timeout=timeout)
