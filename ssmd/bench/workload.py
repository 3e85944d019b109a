"""Database side of the benchmark: slots, generated transactions and the paced writer.

Every generated change is an UPDATE of `markets.title` to `<label> <seq> <epoch>`, where
`<epoch>` is `clock_timestamp()` (seconds since 1970, microseconds) taken while the statement
runs, just before its COMMIT. The latency reader parses that stamp out of the cached row, so the
commit time travels with the change and no client clock is involved. The server and the reader
run on the same host and read the same system clock.

The rows to update come from `bench_targets(n, ticker)`, a table the daemons do not follow, so
its own writes never show up as changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

_SETUP_SQL = """
DROP TABLE IF EXISTS bench_targets;
CREATE TABLE bench_targets (n integer PRIMARY KEY, ticker text NOT NULL);
INSERT INTO bench_targets
    SELECT (row_number() OVER (ORDER BY ticker))::integer - 1, ticker
    FROM (SELECT ticker FROM markets ORDER BY ticker LIMIT {limit}) AS chosen;
ANALYZE bench_targets;

-- One transaction per UPDATE: a procedure called outside a transaction block may COMMIT.
CREATE OR REPLACE PROCEDURE bench_update_each(first_seq bigint, last_seq bigint, label text, ring integer)
LANGUAGE plpgsql AS $$
BEGIN
    FOR seq IN first_seq .. last_seq LOOP
        UPDATE markets
           SET title = label || ' ' || seq || ' ' || extract(epoch FROM clock_timestamp())
         WHERE ticker = (SELECT ticker FROM bench_targets WHERE n = (seq % ring)::integer);
        COMMIT;
    END LOOP;
END
$$;
"""


def prepare_targets(dsn: str, count: int) -> int:
    """Fill `bench_targets` with up to `count` market tickers and create the update procedure."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(sql.SQL(_SETUP_SQL).format(limit=sql.Literal(count)))
        row = connection.execute("SELECT count(*) FROM bench_targets").fetchone()
    return int(row[0])


def target_ticker(dsn: str, n: int) -> str:
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute("SELECT ticker FROM bench_targets WHERE n = %s", (n,)).fetchone()
    if row is None:
        raise RuntimeError(f"bench_targets has no row n={n}")
    return row[0]


def create_slots(dsn: str, names: list[str]) -> dict[str, str]:
    """Create one wal2json logical slot per name; return each slot's consistent point."""
    points = {}
    with psycopg.connect(dsn, autocommit=True) as connection:
        for name in names:
            row = connection.execute("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, 'wal2json')", (name,)).fetchone()
            points[name] = row[0]
    return points


def current_wal_lsn(dsn: str) -> str:
    with psycopg.connect(dsn, autocommit=True) as connection:
        return connection.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]


def run_update_each(dsn: str, first_seq: int, last_seq: int, label: str, ring: int) -> float:
    """Commit one single-row UPDATE transaction per seq in [first_seq, last_seq]; return seconds."""
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute("CALL bench_update_each(%s, %s, %s, %s)", (first_seq, last_seq, label, ring))
    return time.perf_counter() - started


def run_big_transaction(dsn: str, rows: int, sentinel_n: int, label: str) -> float:
    """Update `rows` markets in one transaction, then the sentinel row last; return seconds.

    The sentinel's new title is the last change of the transaction, so once Redis contains it,
    the cache has applied the whole transaction.
    """
    started = time.perf_counter()
    with psycopg.connect(dsn) as connection:
        connection.execute(
            "UPDATE markets SET volume = coalesce(volume, 0) + 1 WHERE ticker IN (SELECT ticker FROM bench_targets WHERE n < %s)",
            (rows,),
        )
        connection.execute(
            "UPDATE markets SET title = %s WHERE ticker = (SELECT ticker FROM bench_targets WHERE n = %s)",
            (f"{label} done", sentinel_n),
        )
        connection.commit()
    return time.perf_counter() - started


@dataclass(frozen=True)
class PacedResult:
    sent: int
    elapsed_s: float
    max_behind: int

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


def run_paced_updates(dsn: str, *, rate: float, duration_s: float, label: str, ring: int, tick_s: float = 0.005) -> PacedResult:
    """Offer `rate` single-row UPDATE transactions per second for `duration_s` seconds.

    Every tick sends the transactions that are due by then in one CALL, so the offered load
    follows the wall clock even when a tick runs late. `max_behind` is the largest number of
    transactions that were due but not yet sent at the start of a tick: a large value means the
    writer itself could not keep up with the rate.
    """
    total = int(rate * duration_s)
    sent = 0
    max_behind = 0
    with psycopg.connect(dsn, autocommit=True) as connection:
        started = time.perf_counter()
        next_tick = started
        while sent < total:
            now = time.perf_counter()
            due = min(total, int((now - started) * rate) + 1)
            max_behind = max(max_behind, due - sent - int(rate * tick_s) - 1)
            if due > sent:
                connection.execute("CALL bench_update_each(%s, %s, %s, %s)", (sent, due - 1, label, ring))
                sent = due
            next_tick += tick_s
            delay = next_tick - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            else:
                next_tick = time.perf_counter()
        elapsed = time.perf_counter() - started
    return PacedResult(sent, elapsed, max(max_behind, 0))
