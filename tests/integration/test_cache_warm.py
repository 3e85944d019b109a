"""Warm on real servers: the snapshot boundary, exact values, TOAST, sweep, ACL, continuity.

`ssmd cdc` runs as a subprocess; the cache daemon runs in the test's event loop so the test can
commit changes inside the warm, between the slot's creation and the reads.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import urllib.error
import urllib.request

import nats
import pytest
import redis

from ssmd.core.jsontext import loads
from ssmd.dev.servers import RedisServer, free_port
from tests.integration.cache_stack import (
    InProcessCache, apply_schema, cache_settings, cached, execute, meta, start_ssmd, stop, verify_now,
    wait_for_stream, wait_until_async,
)

FILLER_ROWS = 6000


class CdcProcess:
    """`ssmd cdc` as a subprocess, started when the test has seeded its rows.

    Rows seeded before the publisher's slot exists reach the cache only through the warm, so
    the stream carries just the test's own changes and the consumer has no backlog to skip.
    """

    def __init__(self, env: dict[str, str], log_path) -> None:
        self.env = env
        self._log_path = log_path
        self._process = None

    async def start(self) -> None:
        self._process = start_ssmd("cdc", self.env, log_path=self._log_path)
        await wait_for_stream(self.env["NATS_URL"], self.env["NATS_STREAM"])

    def stop(self) -> None:
        if self._process is not None:
            stop(self._process)
            self._process = None


@pytest.fixture
async def cdc_process(ssmd_env, tmp_path):
    apply_schema(ssmd_env["DATABASE_URL"])
    process = CdcProcess(ssmd_env, tmp_path / "cdc.log")
    yield process
    process.stop()


@pytest.fixture
async def cdc(cdc_process):
    """The environment of a running `ssmd cdc` over the sample schema with no rows yet."""
    await cdc_process.start()
    return cdc_process.env


def seed_markets(dsn: str, *tickers: str, filler: int = 0) -> None:
    # Filler first: COPY returns rows in insertion order here, so the slowed warm writes the
    # named rows last, after the consumer may already have applied newer versions of them.
    statements = []
    if filler:
        statements.append(
            "INSERT INTO markets (ticker, event_ticker, title, status, last_price) "
            f"SELECT 'F' || g, 'E', 'filler', 'open', g * 0.25 FROM generate_series(1, {filler}) g"
        )
    statements += [f"INSERT INTO markets (ticker, event_ticker, title, status) VALUES ('{ticker}', 'E', 't', 'open')" for ticker in tickers]
    execute(dsn, *statements)


def http_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def market(redis_url: str, ticker: str) -> dict | None:
    value = cached(redis_url, f"secmaster:market:{ticker}")
    return loads(value) if value is not None else None


@pytest.mark.parametrize("moment", ["window", "during"])
async def test_warm_race_boundary(cdc_process, moment):
    cdc = cdc_process.env
    dsn = cdc["DATABASE_URL"]
    seed_markets(dsn, "TEST-1", "TEST-2", "TEST-4", filler=FILLER_ROWS)
    await cdc_process.start()
    changes_done = threading.Event()

    def commit_changes() -> None:
        execute(
            dsn,
            "UPDATE markets SET status = 'closed' WHERE ticker = 'TEST-1'",
            "DELETE FROM markets WHERE ticker = 'TEST-2'",
            "INSERT INTO markets (ticker, event_ticker, title, status) VALUES ('TEST-3', 'E', 't', 'open')",
            "UPDATE markets SET title = 'first' WHERE ticker = 'TEST-4'",
        )
        changes_done.set()

    def after_snapshot(snapshot_lsn) -> None:
        # Runs in the warm's reader thread after the slot exists and before any table is read.
        if moment == "window":
            commit_changes()
        else:
            threading.Timer(0.2, commit_changes).start()

    from ssmd.cache.daemon import CacheHooks

    port = free_port()
    settings = cache_settings(cdc, warm_delay_ms=300, metrics_port=port)
    async with InProcessCache(settings, CacheHooks(after_snapshot=after_snapshot)) as cache:
        await wait_until_async(changes_done.is_set, 30, "changes committed during the warm")
        assert meta(cdc["REDIS_URL"]).get("state") == "warming", "warm finished before the changes; slow it down more"
        assert http_status(port, "/readyz") == 503
        execute(dsn, "UPDATE markets SET title = 'newest' WHERE ticker = 'TEST-4'")
        await cache.wait_warms(1)
        assert http_status(port, "/readyz") == 200
        assert http_status(port, "/healthz") == 200

        assert await verify_now(cdc) == []
        assert market(cdc["REDIS_URL"], "TEST-1")["status"] == "closed"
        assert market(cdc["REDIS_URL"], "TEST-2") is None
        assert market(cdc["REDIS_URL"], "TEST-3")["status"] == "open"
        assert market(cdc["REDIS_URL"], "TEST-4")["title"] == "newest"


async def test_exact_numerics_warm_equals_stream(cdc):
    dsn = cdc["DATABASE_URL"]
    exact = "last_price = 12345678901234567890.123456789012345678, volume = 9223372036854775807"
    seed_markets(dsn, "WARM-1")
    execute(dsn, f"UPDATE markets SET {exact} WHERE ticker = 'WARM-1'")
    execute(dsn, "INSERT INTO series_fees VALUES ('S', '2024-01-01', 0.07, 'flat')")

    async with InProcessCache(cache_settings(cdc)) as cache:
        await cache.wait_warms(1)
        warm_bytes = cached(cdc["REDIS_URL"], "secmaster:market:WARM-1")
        assert b'"last_price":12345678901234567890.123456789012345678' in warm_bytes
        assert b'"volume":9223372036854775807' in warm_bytes

        seed_markets(dsn, "STREAM-1")
        execute(dsn, f"UPDATE markets SET {exact} WHERE ticker = 'STREAM-1'")
        execute(dsn, "UPDATE series_fees SET fee = 'NaN' WHERE series_ticker = 'S'")
        assert await verify_now(cdc) == []
        stream_bytes = cached(cdc["REDIS_URL"], "secmaster:market:STREAM-1")
        assert stream_bytes == warm_bytes.replace(b"WARM-1", b"STREAM-1")
        assert b'"fee":"NaN"' in cached(cdc["REDIS_URL"], "secmaster:fee:S:2024-01-01")

        execute(dsn, "UPDATE markets SET last_price = 0.0700 WHERE ticker = 'STREAM-1'")
        assert await verify_now(cdc) == []
        streamed = cached(cdc["REDIS_URL"], "secmaster:market:STREAM-1")
        assert b'"last_price":0.0700' in streamed

        # A second warm reads the same rows: same bytes as the stream wrote.
        fee_from_stream = cached(cdc["REDIS_URL"], "secmaster:fee:S:2024-01-01")
        redis.Redis.from_url(cdc["REDIS_URL"]).delete("secmaster:meta")
        await cache.wait_warms(2)
        assert cached(cdc["REDIS_URL"], "secmaster:market:STREAM-1") == streamed
        assert cached(cdc["REDIS_URL"], "secmaster:fee:S:2024-01-01") == fee_from_stream


async def test_unchanged_toast_kept(cdc):
    dsn = cdc["DATABASE_URL"]
    notes = secrets.token_hex(5000)  # 10 KB that does not compress
    execute(dsn, "ALTER TABLE markets ALTER COLUMN notes SET STORAGE EXTERNAL")
    async with InProcessCache(cache_settings(cdc)) as cache:
        await cache.wait_warms(1)
        execute(dsn, f"INSERT INTO markets (ticker, event_ticker, title, status, notes) VALUES ('TOAST-1', 'E', 't', 'open', '{notes}')")
        execute(dsn, "UPDATE markets SET status = 'closed' WHERE ticker = 'TOAST-1'")
        assert await verify_now(cdc) == []
        row = market(cdc["REDIS_URL"], "TOAST-1")
        assert row["status"] == "closed"
        assert row["notes"] == notes

        execute(dsn, "UPDATE markets SET notes = NULL WHERE ticker = 'TOAST-1'")
        assert await verify_now(cdc) == []
        assert market(cdc["REDIS_URL"], "TOAST-1")["notes"] is None


async def test_deleted_while_down_gone_after_restart(cdc):
    dsn = cdc["DATABASE_URL"]
    seed_markets(dsn, "KEEP-1", "GONE-1", "GONE-2")
    settings = cache_settings(cdc)
    async with InProcessCache(settings) as cache:
        await cache.wait_warms(1)

    # Down: one delete reaches the stream; then the stream loses its messages (purge), so the
    # next start must notice the gap, warm again and sweep the rows the snapshot no longer has.
    execute(dsn, "DELETE FROM markets WHERE ticker = 'GONE-1'")
    await asyncio.sleep(1)
    client = await nats.connect(cdc["NATS_URL"])
    await client.jetstream().purge_stream(cdc["NATS_STREAM"])
    execute(dsn, "DELETE FROM markets WHERE ticker = 'GONE-2'")
    await asyncio.sleep(1)
    await client.jetstream().purge_stream(cdc["NATS_STREAM"])
    await client.close()

    async with InProcessCache(settings) as cache:
        await cache.wait_warms(1)
        assert market(cdc["REDIS_URL"], "GONE-1") is None
        assert market(cdc["REDIS_URL"], "GONE-2") is None
        assert market(cdc["REDIS_URL"], "KEEP-1") is not None
        assert await verify_now(cdc) == []


async def test_first_warm_into_empty_namespaces_skips_sweep(cdc, caplog):
    caplog.set_level(logging.INFO, logger="ssmd.cache.warm")
    seed_markets(cdc["DATABASE_URL"], "A-1", "A-2")
    async with InProcessCache(cache_settings(cdc)) as cache:
        await cache.wait_warms(1)
        assert cache.daemon.last_warm.sweep_seconds == 0.0
        assert "sweep skipped" in caplog.text
        assert await verify_now(cdc) == []


async def test_first_warm_sweeps_entry_left_from_before(cdc):
    seed_markets(cdc["DATABASE_URL"], "A-1")
    # An entry at an old version for a row the database no longer has, as after a cache that
    # stopped before it saw the delete and whose stream messages are gone.
    client = redis.Redis.from_url(cdc["REDIS_URL"])
    client.set("secmaster:market:GHOST-1", b'{"ticker":"GHOST-1"}')
    client.set("{secmaster:market:GHOST-1}:v", b"%016X%08X" % (1, 0))
    try:
        async with InProcessCache(cache_settings(cdc)) as cache:
            await cache.wait_warms(1)
            assert client.get("secmaster:market:GHOST-1") is None
            assert cache.daemon.last_warm.swept >= 1
            assert await verify_now(cdc) == []
    finally:
        client.close()


async def test_stream_recreated_rewarms(ssmd_env, tmp_path):
    apply_schema(ssmd_env["DATABASE_URL"])
    dsn = ssmd_env["DATABASE_URL"]
    seed_markets(dsn, "A-1")
    process = start_ssmd("cdc", ssmd_env, log_path=tmp_path / "cdc.log")
    try:
        await wait_for_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"])
        async with InProcessCache(cache_settings(ssmd_env)) as cache:
            await cache.wait_warms(1)
            stop(process)
            client = await nats.connect(ssmd_env["NATS_URL"])
            await client.jetstream().delete_stream(ssmd_env["NATS_STREAM"])
            await client.close()
            execute(dsn, "UPDATE markets SET status = 'closed' WHERE ticker = 'A-1'")
            process = start_ssmd("cdc", ssmd_env, log_path=tmp_path / "cdc.log")
            await cache.wait_warms(2)
            execute(dsn, "INSERT INTO markets (ticker, event_ticker, title, status) VALUES ('A-2', 'E', 't', 'open')")
            assert await verify_now(ssmd_env) == []
            assert market(ssmd_env["REDIS_URL"], "A-1")["status"] == "closed"
    finally:
        stop(process)


async def test_cache_under_acl_user_without_keys(cdc):
    admin = redis.Redis.from_url(cdc["REDIS_URL"])
    user, password = f"ssmd_{secrets.token_hex(4)}", secrets.token_hex(12)
    admin.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all", "-keys", "-flushall", "-flushdb")
    try:
        url = cdc["REDIS_URL"].replace("redis://", f"redis://{user}:{password}@")
        limited = redis.Redis.from_url(url)
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.keys("*")
        seed_markets(cdc["DATABASE_URL"], "ACL-1", "ACL-2")
        env = {**cdc, "REDIS_URL": url}
        async with InProcessCache(cache_settings(env)) as cache:
            await cache.wait_warms(1)
            execute(cdc["DATABASE_URL"], "DELETE FROM markets WHERE ticker = 'ACL-2'", "TRUNCATE series_fees")
            assert await verify_now(env) == []
            redis.Redis.from_url(url).delete("secmaster:meta")
            await cache.wait_warms(2)
            assert await verify_now(env) == []
    finally:
        admin.execute_command("ACL", "DELUSER", user)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("SSMD_LONG") != "1", reason="set SSMD_LONG=1 to measure the warm rate over 200,000 rows")
async def test_warm_rate_200k_markets(cdc_process, capsys):
    dsn = cdc_process.env["DATABASE_URL"]
    execute(
        dsn,
        "INSERT INTO markets (ticker, event_ticker, title, status, yes_bid, yes_ask, last_price, volume, open_time, tags, metadata, notes) "
        "SELECT 'M' || g, 'E' || (g % 1000), 'market number ' || g, 'open', 0.4500, 0.5500, g * 0.001, g, "
        "timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second', ARRAY['x', 'y'], jsonb_build_object('g', g), 'note ' || g "
        "FROM generate_series(1, 200000) g",
        "ANALYZE markets",
    )
    await cdc_process.start()
    async with InProcessCache(cache_settings(cdc_process.env)) as cache:
        await cache.wait_warms(1, timeout=300)
        result = cache.daemon.last_warm

    assert result.rows == 200000
    assert result.written == 200000
    with capsys.disabled():
        print(f"\nwarm of {result.rows} markets rows: {result.seconds:.1f} s, {result.rows / result.seconds:.0f} rows/s (sweep included)")


async def test_redis_restart_without_data_rewarms(cdc, tmp_path):
    # A private Redis: the shared one must not restart under other tests.
    own_redis = RedisServer.start(tmp_path / "own", die_with_parent=True)
    try:
        env = {**cdc, "REDIS_URL": own_redis.url_for(0)}
        seed_markets(cdc["DATABASE_URL"], "LOST-1")
        async with InProcessCache(cache_settings(env)) as cache:
            await cache.wait_warms(1)
            await asyncio.to_thread(own_redis.restart, keep_data=False)
            execute(cdc["DATABASE_URL"], "UPDATE markets SET status = 'closed' WHERE ticker = 'LOST-1'")
            await cache.wait_warms(2)
            assert await verify_now(env) == []
            assert market(env["REDIS_URL"], "LOST-1")["status"] == "closed"
    finally:
        own_redis.stop()
