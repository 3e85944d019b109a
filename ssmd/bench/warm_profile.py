"""Measure the warm alone and where its time goes, beside a Redis ceiling from the same run.

`python -m ssmd.bench.warm_profile --markets 1000000` starts a throwaway PostgreSQL and Redis on
loopback ports (or reuses the ones recorded under `--root`), loads the sample tables, and runs:

1. COPY read only: every followed table read from one snapshot, values left as text;
2. read and encode: the same plus key text and canonical JSON (`SnapshotReader.batches`);
3. Redis write only: the encoded rows of phase 2, kept in memory, written with the warm's
   writer into an empty database;
4. the warm itself (`Warmer`): snapshot, read, encode, write and sweep, into an empty database;
5. the ceiling: pipelined EVALSHA of a compare-and-set script through redis-py with the warm's
   batch size and row count, values cycled from the first row of every encoded batch
   (`ssmd.bench.ceilings.redis_cas_rate`).

Every figure is printed with the load average at the time, because the machine may be shared.
Phases 2 and 3 keep at most `--keep-rows` encoded rows in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import redis

from ssmd.bench.ceilings import redis_cas_rate
from ssmd.cache.metrics import CacheMetrics
from ssmd.cache.warm import BATCH_ROWS, Warmer, write_batches
from ssmd.core.keys import KeySpace
from ssmd.core.lsn import Lsn
from ssmd.core.position import warm_version
from ssmd.dev.sample import load_sample
from ssmd.dev.servers import PostgresServer, RedisServer
from ssmd.pg.snapshot import SnapshotReader
from ssmd.store.cache_store import CacheStore, connect_redis, connect_redis_blocking
from ssmd.store.scripts import BlockingScriptRunner

TABLES = ["events", "markets", "series_fees"]


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def report(name: str, rows: int, seconds: float) -> float:
    rate = rows / seconds if seconds else 0.0
    print(f"{name:<28} {rows:>9,} rows {seconds:>8.2f} s {rate:>10,.0f} rows/s   load {load_average()}", flush=True)
    return rate


def flush(redis_url: str) -> None:
    # FLUSHDB of millions of keys takes longer than redis-py's default socket timeout.
    with redis.Redis.from_url(redis_url, socket_timeout=300) as client:
        client.flushdb()


def time_copy_read(dsn: str) -> tuple[int, float]:
    started = time.perf_counter()
    rows = 0
    with SnapshotReader(dsn, export=False) as reader:
        for name in TABLES:
            rows += sum(1 for _ in reader.text_rows(reader.table_info(name)))
    return rows, time.perf_counter() - started


def time_read_encode(dsn: str, keyspace: KeySpace, keep_rows: int) -> tuple[int, float, list[tuple[str, list[tuple[bytes, bytes]]]], list[bytes]]:
    """Read and encode every table; return rows, seconds, the first batches and sampled values.

    The sample takes the first row of every batch, so the tables are in it in proportion.
    """
    started = time.perf_counter()
    rows = 0
    kept: list[tuple[str, list[tuple[bytes, bytes]]]] = []
    sampled: list[bytes] = []
    with SnapshotReader(dsn, export=False) as reader:
        for name in TABLES:
            table = reader.table_info(name)
            namespace = keyspace.namespace(table.schema, table.name)
            prefix = keyspace.value_key(namespace, "").encode()
            for batch in reader.batches(table, prefix, BATCH_ROWS):
                rows += len(batch)
                sampled.append(batch[0][1])
                if rows <= keep_rows:
                    kept.append((namespace, batch))
    return rows, time.perf_counter() - started, kept, sampled


def time_write(redis_url: str, kept: list[tuple[str, list[tuple[bytes, bytes]]]]) -> tuple[int, float]:
    flush(redis_url)
    client = connect_redis_blocking(redis_url, name="ssmd-profile-write")
    try:
        scripts = BlockingScriptRunner(client)
        scripts.load()
        version = warm_version(Lsn(0x100000000)).pack()
        started = time.perf_counter()
        written = sum(len(results) for results in write_batches(client, (batch for _, batch in kept), version, lambda: ""))
        elapsed = time.perf_counter() - started
    finally:
        client.close()
    flush(redis_url)
    return written, elapsed


async def run_warm(dsn: str, redis_url: str, keyspace: KeySpace):
    flush(redis_url)
    store = CacheStore(connect_redis(redis_url, name="ssmd-profile"), keyspace)
    try:
        warmer = Warmer(dsn, redis_url, store, TABLES, {}, CacheMetrics())
        return await warmer.run()
    finally:
        await store.client.aclose()


def database_exists(postgres: PostgresServer, database: str) -> bool:
    with psycopg.connect(postgres.url) as connection:
        return connection.execute("SELECT EXISTS (SELECT FROM pg_database WHERE datname = %s)", (database,)).fetchone()[0]


def markets_loaded(dsn: str) -> bool:
    # load_sample skips a loaded table only after generating its rows, which takes minutes for 1M.
    with psycopg.connect(dsn) as connection:
        if connection.execute("SELECT to_regclass('markets') IS NULL").fetchone()[0]:
            return False
        return connection.execute("SELECT EXISTS (SELECT FROM markets)").fetchone()[0]


def start_servers(root: Path) -> tuple[PostgresServer, RedisServer, bool]:
    postgres = PostgresServer.attach(root)
    redis_server = RedisServer.attach(root)
    reused = postgres is not None and redis_server is not None
    if postgres is None:
        postgres = PostgresServer.start(root)
    if redis_server is None:
        redis_server = RedisServer.start(root)
    return postgres, redis_server, reused


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssmd.bench.warm_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--markets", type=int, default=200_000, help="markets rows to load (default 200000)")
    parser.add_argument("--root", type=Path, help="directory for the servers; with it they keep running for the next run (default: a temporary directory, servers stopped at exit)")
    parser.add_argument("--database", default="warmprofile", help="database to load and warm from (default warmprofile)")
    parser.add_argument("--keep-rows", type=int, default=300_000, help="maximum encoded rows kept in memory for the write-only phase (default 300000)")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: read,encode,write,warm,ceiling")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    temporary = None
    root = args.root
    if root is None:
        temporary = tempfile.TemporaryDirectory(prefix="ssmd-profile-warm-")
        root = Path(temporary.name)
    postgres, redis_server, reused = start_servers(root)
    try:
        return profile(postgres, redis_server, args, skip, reused)
    finally:
        if temporary is not None:
            redis_server.stop()
            postgres.stop()
            temporary.cleanup()


def profile(postgres: PostgresServer, redis_server: RedisServer, args: argparse.Namespace, skip: set[str], reused: bool) -> int:
    dsn = postgres.url_for(args.database)
    if not reused or not database_exists(postgres, args.database):
        postgres.create_database(args.database)
    started = time.perf_counter()
    if markets_loaded(dsn):
        print("sample tables already loaded; --markets is ignored", flush=True)
    else:
        counts = load_sample(dsn, markets=args.markets, seed=1)
        print(f"loaded {counts.as_dict()} in {time.perf_counter() - started:.1f} s", flush=True)
    keyspace = KeySpace()
    redis_url = redis_server.url_for(0)

    if "read" not in skip:
        report("COPY read only", *time_copy_read(dsn))
    kept: list[tuple[str, list[tuple[bytes, bytes]]]] = []
    values: list[bytes] = []
    if "encode" not in skip:
        rows, seconds, kept, values = time_read_encode(dsn, keyspace, args.keep_rows)
        report("COPY read + encode", rows, seconds)
    if "write" not in skip and kept:
        report("Redis write only", *time_write(redis_url, kept))
    if "warm" not in skip:
        result = asyncio.run(run_warm(dsn, redis_url, keyspace))
        warm_rate = report("warm (read+encode+write+sweep)", result.rows, result.seconds)
        report("  of which sweep", result.rows, result.sweep_seconds)
    if "ceiling" not in skip and kept:
        rows = result.rows if "warm" not in skip else sum(len(batch) for _, batch in kept)
        ceiling_url = redis_server.url_for(1) + "?socket_timeout=120"
        rate = redis_cas_rate(ceiling_url, values, rows, BATCH_ROWS)
        print(f"{'ceiling: redis-py EVALSHA CAS':<28} {rows:>9,} rows {'':>10} {rate:>10,.0f} rows/s   load {load_average()} (batches of {BATCH_ROWS}, mean value {sum(map(len, values)) / len(values):.0f} bytes)", flush=True)
        if "warm" not in skip:
            print(f"warm / ceiling = {warm_rate / rate:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
