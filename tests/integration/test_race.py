"""Race test: writers change all three tables while the cache warms and is killed and restarted.

`ssmd cdc` and `ssmd cache` run as subprocesses. Writer threads insert, update, delete and
re-key rows (one seed per run) while the cache warms slowly, is SIGKILLed, resumes, and warms
again after its meta hash is removed (as after Redis lost its data). After the writers stop,
`ssmd verify` must find the cache equal to the database.
"""

from __future__ import annotations

import asyncio
import random
import signal
import threading
import time

import psycopg
import pytest
import redis

from tests.integration.cache_stack import (
    apply_schema, execute, meta, run_verify, start_ssmd, stop, wait_for_stream, wait_ready, wait_until,
)

WRITERS = 3
TICKERS = 400
STATUSES = ("initialized", "open", "closed", "settled")


def seed(dsn: str) -> None:
    execute(
        dsn,
        # Filler first: COPY returns rows in insertion order here, so the slowed warm writes the
        # rows the writers change last, after the consumer applied newer versions of them.
        "INSERT INTO markets (ticker, event_ticker, title, status) SELECT 'F' || g, 'E1', 'filler', 'open' FROM generate_series(1, 6000) g",
        "INSERT INTO markets (ticker, event_ticker, title, status, last_price, volume, tags, metadata) "
        f"SELECT 'R' || g, 'E' || (g % 50), 'market ' || g, 'open', g * 0.01, g, ARRAY['a', 'b' || g], jsonb_build_object('n', g) "
        f"FROM generate_series(1, {TICKERS}) g",
        "INSERT INTO events (event_ticker, series_ticker, title, category, status) "
        "SELECT 'E' || g, 'S' || (g % 10), 'event ' || g, 'c', 'open' FROM generate_series(0, 49) g",
        "INSERT INTO series_fees SELECT 'S' || g, date '2024-01-01' + (g % 5), 0.01 * g, 'flat' FROM generate_series(0, 39) g",
    )


def write_randomly(dsn: str, rng: random.Random, done: threading.Event, counts: dict[str, int]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not done.is_set():
            try:
                with conn.transaction():
                    for _ in range(rng.choice((1, 1, 1, 3))):
                        conn.execute(*random_statement(rng))
                counts["committed"] += 1
            except psycopg.errors.UniqueViolation:
                counts["conflicts"] += 1
            time.sleep(rng.random() * 0.004)


def random_statement(rng: random.Random) -> tuple[str, tuple]:
    ticker = f"R{rng.randint(1, TICKERS)}"
    other = f"R{rng.randint(1, TICKERS)}"
    event = f"E{rng.randint(0, 59)}"
    series = f"S{rng.randint(0, 44)}"
    day = f"2024-01-0{rng.randint(1, 7)}"
    choice = rng.random()
    if choice < 0.25:
        return ("UPDATE markets SET status = %s, last_price = %s, volume = volume + 1 WHERE ticker = %s", (rng.choice(STATUSES), f"{rng.random() * 100:.4f}", ticker))
    if choice < 0.38:
        return ("INSERT INTO markets (ticker, event_ticker, title, status, last_price) VALUES (%s, %s, 'new', 'open', %s) ON CONFLICT DO NOTHING", (ticker, event, f"{rng.randint(0, 99)}.{rng.randint(0, 99):02d}"))
    if choice < 0.50:
        return ("DELETE FROM markets WHERE ticker = %s", (ticker,))
    if choice < 0.58:
        return ("UPDATE markets SET ticker = %s WHERE ticker = %s AND NOT EXISTS (SELECT 1 FROM markets WHERE ticker = %s)", (other, ticker, other))
    if choice < 0.68:
        return ("INSERT INTO events (event_ticker, series_ticker, title, category, status) VALUES (%s, 'S1', 'e', 'c', 'open') ON CONFLICT (event_ticker) DO UPDATE SET title = events.title || '+'", (event,))
    if choice < 0.74:
        return ("DELETE FROM events WHERE event_ticker = %s", (event,))
    if choice < 0.80:
        return ("UPDATE events SET status = %s, tags = ARRAY[%s] WHERE event_ticker = %s", (rng.choice(("open", "closed", "settled")), event, event))
    if choice < 0.88:
        return ("INSERT INTO series_fees VALUES (%s, %s, %s, 'maker') ON CONFLICT (series_ticker, effective_from) DO UPDATE SET fee = EXCLUDED.fee", (series, day, f"0.{rng.randint(0, 99999):05d}"))
    if choice < 0.93:
        return ("DELETE FROM series_fees WHERE series_ticker = %s AND effective_from = %s", (series, day))
    if choice < 0.999:
        return ("UPDATE series_fees SET effective_from = effective_from + 10 WHERE series_ticker = %s AND effective_from = %s", (series, day))
    return ("TRUNCATE series_fees", ())


@pytest.mark.parametrize("seed_value", [11, 22, 33])
def test_race_writers_kills_and_warms(ssmd_env, tmp_path, seed_value):
    dsn = ssmd_env["DATABASE_URL"]
    apply_schema(dsn)
    seed(dsn)  # before the publisher's slot exists: the warm alone brings these rows
    rng = random.Random(seed_value)
    log = tmp_path / "cache.log"
    cdc = start_ssmd("cdc", ssmd_env, log_path=tmp_path / "cdc.log")
    asyncio.run(wait_for_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"]))
    cache_flags = ("--warm-delay-ms", "300", "--check-interval", "1", "--ack-wait", "5")
    cache = start_ssmd("cache", ssmd_env, *cache_flags, log_path=log)
    counts = {"committed": 0, "conflicts": 0}
    done = threading.Event()
    try:
        writers = [threading.Thread(target=write_randomly, args=(dsn, random.Random(seed_value * 100 + i), done, counts)) for i in range(WRITERS)]
        for writer in writers:
            writer.start()

        # Killed while its first warm is still running.
        wait_until(lambda: meta(ssmd_env["REDIS_URL"]).get("state") == "warming", 20, "first warm to start")
        time.sleep(rng.uniform(0.3, 1.0))
        stop(cache, signal.SIGKILL)
        cache = start_ssmd("cache", ssmd_env, *cache_flags, log_path=log)
        wait_ready(ssmd_env["REDIS_URL"], 60)

        # Killed while applying the stream; resumes from the durable consumer.
        time.sleep(rng.uniform(0.5, 1.5))
        stop(cache, signal.SIGKILL)
        time.sleep(rng.uniform(0.1, 0.8))
        cache = start_ssmd("cache", ssmd_env, *cache_flags, log_path=log)

        # Redis "lost" the meta hash: the running daemon notices and warms under load. The
        # writers stop while that warm still writes, so a row the warm overwrote with an older
        # version would not be fixed by a later change.
        time.sleep(rng.uniform(0.5, 1.0))
        redis.Redis.from_url(ssmd_env["REDIS_URL"]).delete("secmaster:meta")
        wait_until(lambda: meta(ssmd_env["REDIS_URL"]).get("state") == "warming", 20, "the daemon to warm again")
        time.sleep(rng.uniform(0.5, 1.2))
        done.set()
        for writer in writers:
            writer.join()
        assert counts["committed"] > 100

        result = run_verify(ssmd_env, timeout=90)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:] + log.read_text()[-3000:]
        assert stop(cache, signal.SIGTERM) == 0
    finally:
        done.set()
        for process in (cache, cdc):
            if process.poll() is None:
                stop(process, signal.SIGKILL)
