"""Fault cases checked where readers look: the Redis cache, behind a running cdc and cache.

Other tests check these cases on the stream messages or in the simulator. Here each one runs
through both daemons on real servers and ends with the cached rows and `ssmd verify`.
"""

from __future__ import annotations

import asyncio
import os

import psycopg
import redis

from ssmd.core.jsontext import loads
from tests.integration.cache_stack import InProcessCache, cache_settings, cached, execute, verify_now, wait_until_async
from tests.integration.test_cache_warm import cdc, cdc_process, market, seed_markets  # noqa: F401 (fixtures)

# Rows one UPDATE statement changes. SSMD_LONG=1 runs the 200,000 rows of the fault case.
HUGE_ROWS = 200_000 if os.environ.get("SSMD_LONG") else 5_000


def row_of(dsn: str, ticker: str) -> dict:
    with psycopg.connect(dsn) as connection:
        title, status = connection.execute("SELECT title, status FROM markets WHERE ticker = %s", (ticker,)).fetchone()
    return {"title": title, "status": status}


def count_status(redis_url: str, status: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match="secmaster:market:*", count=1000))
        values = [value for start in range(0, len(keys), 1000) for value in client.mget(keys[start:start + 1000])]
    finally:
        client.close()
    return sum(1 for value in values if value is not None and loads(value)["status"] == status)


async def test_key_change_moves_the_full_row(cdc):
    dsn = cdc["DATABASE_URL"]
    seed_markets(dsn, "TEST-1")
    execute(dsn, "UPDATE markets SET title = 'kept title', last_price = 0.0700 WHERE ticker = 'TEST-1'")
    async with InProcessCache(cache_settings(cdc)) as cache:
        await cache.wait_warms(1)
        execute(dsn, "UPDATE markets SET ticker = 'TEST-1B' WHERE ticker = 'TEST-1'")
        await wait_until_async(lambda: market(cdc["REDIS_URL"], "TEST-1B") is not None, 30, "the new key in Redis")

        moved = market(cdc["REDIS_URL"], "TEST-1B")
        assert market(cdc["REDIS_URL"], "TEST-1") is None
        assert moved["title"] == "kept title"
        assert str(moved["last_price"]) == "0.0700"
        assert moved["status"] == row_of(dsn, "TEST-1B")["status"]
        assert await verify_now(cdc) == []


async def test_huge_transaction_reaches_every_key(cdc):
    dsn = cdc["DATABASE_URL"]
    seed_markets(dsn, filler=HUGE_ROWS)
    async with InProcessCache(cache_settings(cdc)) as cache:
        await cache.wait_warms(1)
        # The sample schema's status check rejects 'halted', so the update uses 'settled'.
        execute(dsn, "UPDATE markets SET status = 'settled'")
        await wait_until_async(lambda: count_status(cdc["REDIS_URL"], "settled") == HUGE_ROWS, 300, f"{HUGE_ROWS} settled rows in Redis", interval=1.0)
        assert await verify_now(cdc) == []


async def test_full_identity_delete_removes_exactly_its_key(cdc_process):  # noqa: F811 (fixture)
    dsn = cdc_process.env["DATABASE_URL"]
    execute(dsn, "ALTER TABLE markets REPLICA IDENTITY FULL")
    seed_markets(dsn, "A-1", "A-2")
    await cdc_process.start()
    env = cdc_process.env
    async with InProcessCache(cache_settings(env)) as cache:
        await cache.wait_warms(1)
        execute(dsn, "DELETE FROM markets WHERE ticker = 'A-1'")
        await wait_until_async(lambda: market(env["REDIS_URL"], "A-1") is None, 30, "A-1 deleted in Redis")

        assert market(env["REDIS_URL"], "A-2") is not None
        assert cached(env["REDIS_URL"], "{secmaster:market:A-1}:v") is not None  # the tombstone
        assert await verify_now(env) == []


async def test_interleaved_transactions_both_cached(cdc):
    dsn = cdc["DATABASE_URL"]
    seed_markets(dsn, "TEST-1", "TEST-2")
    async with InProcessCache(cache_settings(cdc)) as cache:
        await cache.wait_warms(1)
        with psycopg.connect(dsn) as session_a, psycopg.connect(dsn, autocommit=True) as session_b:
            session_a.execute("UPDATE markets SET status = 'closed' WHERE ticker = 'TEST-1'")
            session_b.execute("UPDATE markets SET status = 'settled' WHERE ticker = 'TEST-2'")
            await asyncio.sleep(0.5)
            session_a.commit()
        await wait_until_async(
            lambda: (market(cdc["REDIS_URL"], "TEST-1") or {}).get("status") == "closed" and (market(cdc["REDIS_URL"], "TEST-2") or {}).get("status") == "settled",
            30, "both updates in Redis",
        )
        assert await verify_now(cdc) == []
