"""A live change workload on the secmaster tables, paced and bounded in time, from a seeded RNG.

Each step runs one kind of transaction, chosen at random:
- a short transaction of 1-4 statements;
- two transactions open at once on two connections, whose statements interleave and which
  commit in random order, so commit order differs from start order and change LSNs are not
  ordered by commit;
- a batch of many updates in one transaction;
- a transaction that is rolled back, whose changes must never reach the cache.
Statements insert, update, delete and change primary keys in all three tables. Updates of
markets mostly leave `notes` alone, which makes wal2json omit an unchanged TOASTed value.

Two open transactions never touch the same key, so they cannot block each other on row locks.
The workload keeps the set of existing keys in memory, read once at the start, and applies a
transaction's key changes to that set only when the transaction commits.

Run `python -m ssmd.dev.workload --seconds 10 --rate 50` against DATABASE_URL.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from decimal import Decimal

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from ssmd.config import DATABASE_URL, redact_url, require
from ssmd.dev.sample import EVENT_COLUMNS, FEE_COLUMNS, MARKET_COLUMNS, RowFactory, apply_schema

PROGRESS_INTERVAL_S = 1.0
BATCH_SIZE = (20, 80)


@dataclass
class WorkloadCounts:
    """Committed work; statements of rolled-back transactions are counted in `rolled_back` only."""

    transactions: int = 0
    rolled_back: int = 0
    inserts: int = 0
    updates: int = 0
    deletes: int = 0
    key_changes: int = 0

    @property
    def changes(self) -> int:
        """Row changes committed; a key change counts once (wal2json emits it as one update)."""
        return self.inserts + self.updates + self.deletes + self.key_changes

    def add(self, other: WorkloadCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "changes": self.changes}


class _KeySet:
    """Keys of one table with O(1) add, remove and seeded random choice.

    A list gives `rng.choice` a reproducible order for a seed; a plain set's order would depend
    on string hashing, which varies per process.
    """

    def __init__(self, keys) -> None:
        self._keys = sorted(keys)
        self._index = {key: position for position, key in enumerate(self._keys)}

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def add(self, key) -> None:
        if key not in self._index:
            self._index[key] = len(self._keys)
            self._keys.append(key)

    def discard(self, key) -> None:
        position = self._index.pop(key, None)
        if position is None:
            return
        last = self._keys.pop()
        if position < len(self._keys):
            self._keys[position] = last
            self._index[last] = position

    def choice(self, rng: random.Random):
        return rng.choice(self._keys)


@dataclass
class _Keys:
    """Existing keys per table, as committed."""

    markets: _KeySet
    events: _KeySet
    fees: _KeySet
    series: list[str]


@dataclass
class _Transaction:
    """One open transaction: its connection, the keys it touches and its effect on `_Keys`."""

    connection: psycopg.Connection
    reserved: set = field(default_factory=set)
    counts: WorkloadCounts = field(default_factory=WorkloadCounts)
    added: list[tuple[str, object]] = field(default_factory=list)
    removed: list[tuple[str, object]] = field(default_factory=list)


class Workload:
    """Drives random transactions against one database through two connections."""

    def __init__(self, conninfo: str, *, seed: int = 0, edge_cases: bool = True) -> None:
        self.rng = random.Random(seed)
        self.rows = RowFactory(self.rng, edge_cases=edge_cases)
        self.counts = WorkloadCounts()
        self._conninfo = conninfo
        self._connections: list[psycopg.Connection] = []
        self._reserved: set = set()
        self._serial = 0

    def __enter__(self) -> Workload:
        apply_schema(self._conninfo)
        self._connections = [psycopg.connect(self._conninfo, application_name="ssmd-workload") for _ in range(2)]
        self.keys = self._read_keys(self._connections[0])
        return self

    def __exit__(self, *exc_info) -> None:
        for connection in self._connections:
            connection.close()

    def run(self, *, seconds: float, rate: float, progress: Callable[[WorkloadCounts, float], None] | None = None) -> WorkloadCounts:
        """Run steps at `rate` per second for `seconds`, calling `progress(counts, elapsed)` each second.

        A step is one transaction, except an interleaved step, which commits two.
        """
        if rate <= 0:
            raise ValueError(f"invalid rate {rate}: must be above 0 steps per second")
        start = time.monotonic()
        next_step = next_progress = start
        reported: dict[str, int] | None = None
        while True:
            now = time.monotonic()
            if now - start >= seconds:
                break
            if now < next_step:
                time.sleep(min(next_step - now, start + seconds - now))
                continue
            self.step()
            next_step += 1.0 / rate
            if progress is not None and time.monotonic() >= next_progress:
                progress(self.counts, time.monotonic() - start)
                reported = self.counts.as_dict()
                next_progress += PROGRESS_INTERVAL_S
        if progress is not None and self.counts.as_dict() != reported:
            progress(self.counts, time.monotonic() - start)
        return self.counts

    def step(self) -> None:
        """Run one randomly chosen kind of transaction to its end."""
        roll = self.rng.random()
        if roll < 0.70:
            self._single(self.rng.randint(1, 4))
        elif roll < 0.88:
            self._interleaved()
        elif roll < 0.95:
            self._batch()
        else:
            self._rolled_back()

    # Kinds of transaction.

    def _single(self, statements: int) -> None:
        transaction = _Transaction(self._connections[0])
        for _ in range(statements):
            self._statement(transaction)
        self._commit(transaction)

    def _interleaved(self) -> None:
        first, second = _Transaction(self._connections[0]), _Transaction(self._connections[1])
        for _ in range(self.rng.randint(2, 6)):
            self._statement(self.rng.choice((first, second)))
        # Each side needs at least one change, or its connection has no transaction open.
        self._statement(first)
        self._statement(second)
        order = [first, second]
        self.rng.shuffle(order)
        for transaction in order:
            self._commit(transaction)

    def _batch(self) -> None:
        transaction = _Transaction(self._connections[0])
        for _ in range(self.rng.randint(*BATCH_SIZE)):
            self._update_market(transaction)
        self._commit(transaction)

    def _rolled_back(self) -> None:
        transaction = _Transaction(self._connections[0])
        for _ in range(self.rng.randint(1, 4)):
            self._statement(transaction)
        transaction.connection.rollback()
        self._release(transaction)
        self.counts.rolled_back += 1

    def _commit(self, transaction: _Transaction) -> None:
        transaction.connection.commit()
        for table, key in transaction.removed:
            self._key_set(table).discard(key)
        for table, key in transaction.added:
            self._key_set(table).add(key)
        self._release(transaction)
        self.counts.add(transaction.counts)
        self.counts.transactions += 1

    def _release(self, transaction: _Transaction) -> None:
        self._reserved -= transaction.reserved

    # Statements.

    def _statement(self, transaction: _Transaction) -> None:
        roll = self.rng.random()
        actions = (
            (0.25, self._insert_market),
            (0.60, self._update_market),
            (0.70, self._delete_market),
            (0.75, self._rekey_market),
            (0.80, self._insert_event),
            (0.88, self._update_event),
            (0.90, self._delete_event),
            (0.91, self._rekey_event),
            (0.95, self._insert_fee),
            (0.98, self._update_fee),
            (0.99, self._delete_fee),
            (1.00, self._rekey_fee),
        )
        for threshold, action in actions:
            if roll < threshold:
                action(transaction)
                return

    def _insert_market(self, transaction: _Transaction) -> None:
        event_ticker = self._pick(self.keys.events, transaction, reserve=False) or "KXNEW-EVENT"
        ticker = self._new_key(self.keys.markets, lambda: f"{event_ticker}-W{self._next_serial()}", transaction)
        self._insert(transaction, "markets", MARKET_COLUMNS, self.rows.market(ticker, event_ticker))
        transaction.added.append(("markets", ticker))
        transaction.counts.inserts += 1

    def _update_market(self, transaction: _Transaction) -> None:
        ticker = self._pick(self.keys.markets, transaction)
        if ticker is None:
            return self._insert_market(transaction)
        bid = Decimal(self.rng.randint(1, 97)) / 100
        values: dict[str, object] = {
            "yes_bid": bid,
            "yes_ask": bid + Decimal(self.rng.randint(1, 2)) / 100,
            "last_price": self.rows.price(),
            "volume": self.rng.randint(0, 5_000_000),
        }
        roll = self.rng.random()
        if roll < 0.1:
            values["notes"] = self.rows.notes()
        elif roll < 0.2:
            values["status"] = self.rng.choice(("open", "closed", "settled"))
            values["tags"] = self.rows.tags()
            values["metadata"] = Jsonb(self.rows.metadata())
        self._update(transaction, "markets", {"ticker": ticker}, values)
        transaction.counts.updates += 1

    def _delete_market(self, transaction: _Transaction) -> None:
        ticker = self._pick(self.keys.markets, transaction)
        if ticker is None:
            return self._insert_market(transaction)
        self._delete(transaction, "markets", {"ticker": ticker})
        transaction.removed.append(("markets", ticker))
        transaction.counts.deletes += 1

    def _rekey_market(self, transaction: _Transaction) -> None:
        ticker = self._pick(self.keys.markets, transaction)
        if ticker is None:
            return self._insert_market(transaction)
        new_ticker = self._new_key(self.keys.markets, lambda: f"{ticker.split('-R')[0]}-R{self._next_serial()}", transaction)
        self._update(transaction, "markets", {"ticker": ticker}, {"ticker": new_ticker, "volume": self.rng.randint(0, 1000)})
        transaction.removed.append(("markets", ticker))
        transaction.added.append(("markets", new_ticker))
        transaction.counts.key_changes += 1

    def _insert_event(self, transaction: _Transaction) -> None:
        series_ticker = self.rng.choice(self.keys.series)
        event_ticker = self._new_key(self.keys.events, lambda: f"{series_ticker}-W{self._next_serial()}", transaction)
        self._insert(transaction, "events", EVENT_COLUMNS, self.rows.event(event_ticker, series_ticker))
        transaction.added.append(("events", event_ticker))
        transaction.counts.inserts += 1

    def _update_event(self, transaction: _Transaction) -> None:
        event_ticker = self._pick(self.keys.events, transaction)
        if event_ticker is None:
            return self._insert_event(transaction)
        values = {"status": self.rng.choice(("open", "closed", "settled")), "close_time": self.rows.timestamp(nullable=True), "tags": self.rows.tags()}
        self._update(transaction, "events", {"event_ticker": event_ticker}, values)
        transaction.counts.updates += 1

    def _delete_event(self, transaction: _Transaction) -> None:
        event_ticker = self._pick(self.keys.events, transaction)
        if event_ticker is None:
            return self._insert_event(transaction)
        self._delete(transaction, "events", {"event_ticker": event_ticker})
        transaction.removed.append(("events", event_ticker))
        transaction.counts.deletes += 1

    def _rekey_event(self, transaction: _Transaction) -> None:
        event_ticker = self._pick(self.keys.events, transaction)
        if event_ticker is None:
            return self._insert_event(transaction)
        new_ticker = self._new_key(self.keys.events, lambda: f"{event_ticker.split('-R')[0]}-R{self._next_serial()}", transaction)
        self._update(transaction, "events", {"event_ticker": event_ticker}, {"event_ticker": new_ticker})
        transaction.removed.append(("events", event_ticker))
        transaction.added.append(("events", new_ticker))
        transaction.counts.key_changes += 1

    def _insert_fee(self, transaction: _Transaction) -> None:
        series_ticker = self.rng.choice(self.keys.series)
        key = self._new_key(self.keys.fees, lambda: (series_ticker, self._random_day()), transaction)
        self._insert(transaction, "series_fees", FEE_COLUMNS, self.rows.fee(*key))
        transaction.added.append(("series_fees", key))
        transaction.counts.inserts += 1

    def _update_fee(self, transaction: _Transaction) -> None:
        key = self._pick(self.keys.fees, transaction)
        if key is None:
            return self._insert_fee(transaction)
        self._update(transaction, "series_fees", _fee_key(key), {"fee": self.rows.fee_value()})
        transaction.counts.updates += 1

    def _delete_fee(self, transaction: _Transaction) -> None:
        key = self._pick(self.keys.fees, transaction)
        if key is None:
            return self._insert_fee(transaction)
        self._delete(transaction, "series_fees", _fee_key(key))
        transaction.removed.append(("series_fees", key))
        transaction.counts.deletes += 1

    def _rekey_fee(self, transaction: _Transaction) -> None:
        # Changes one column of the composite key: (series_ticker, effective_from).
        key = self._pick(self.keys.fees, transaction)
        if key is None:
            return self._insert_fee(transaction)
        new_key = self._new_key(self.keys.fees, lambda: (key[0], self._random_day()), transaction)
        self._update(transaction, "series_fees", _fee_key(key), {"effective_from": new_key[1]})
        transaction.removed.append(("series_fees", key))
        transaction.added.append(("series_fees", new_key))
        transaction.counts.key_changes += 1

    # SQL and key bookkeeping.

    def _insert(self, transaction: _Transaction, table: str, columns: tuple[str, ...], row: tuple) -> None:
        query = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns)), sql.SQL(", ").join(sql.Placeholder() * len(columns))
        )
        transaction.connection.execute(query, row)

    def _update(self, transaction: _Transaction, table: str, key: dict[str, object], values: dict[str, object]) -> None:
        query = sql.SQL("UPDATE {} SET {} WHERE {}").format(
            sql.Identifier(table), _assignments(values, ", "), _assignments(key, " AND ")
        )
        cursor = transaction.connection.execute(query, [*values.values(), *key.values()])
        if cursor.rowcount != 1:
            raise RuntimeError(f"workload bookkeeping is wrong: UPDATE {table} {key} changed {cursor.rowcount} rows, expected 1")

    def _delete(self, transaction: _Transaction, table: str, key: dict[str, object]) -> None:
        query = sql.SQL("DELETE FROM {} WHERE {}").format(sql.Identifier(table), _assignments(key, " AND "))
        cursor = transaction.connection.execute(query, list(key.values()))
        if cursor.rowcount != 1:
            raise RuntimeError(f"workload bookkeeping is wrong: DELETE {table} {key} removed {cursor.rowcount} rows, expected 1")

    def _pick(self, keys: _KeySet, transaction: _Transaction, *, reserve: bool = True):
        """Pick an existing key that no other open transaction touches, or None."""
        for _ in range(20):
            if not keys:
                return None
            key = keys.choice(self.rng)
            if key in self._reserved and key not in transaction.reserved:
                continue
            if any(key == removed for _, removed in transaction.removed):
                continue
            if reserve:
                self._reserve(transaction, key)
            return key
        return None

    def _new_key(self, keys: _KeySet, make: Callable[[], object], transaction: _Transaction):
        while True:
            key = make()
            if key not in keys and key not in self._reserved:
                self._reserve(transaction, key)
                return key

    def _reserve(self, transaction: _Transaction, key: object) -> None:
        self._reserved.add(key)
        transaction.reserved.add(key)

    def _key_set(self, table: str) -> _KeySet:
        return {"markets": self.keys.markets, "events": self.keys.events, "series_fees": self.keys.fees}[table]

    def _next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def _random_day(self) -> date:
        return date(2025, 1, 1) + timedelta(days=self.rng.randint(0, 3650))

    @staticmethod
    def _read_keys(connection: psycopg.Connection) -> _Keys:
        markets = [row[0] for row in connection.execute("SELECT ticker FROM markets")]
        events = [row[0] for row in connection.execute("SELECT event_ticker FROM events")]
        fees = [(row[0], row[1]) for row in connection.execute("SELECT series_ticker, effective_from FROM series_fees")]
        series = sorted({row[0] for row in connection.execute("SELECT series_ticker FROM events")} | {key[0] for key in fees}) or ["KXWORKLOAD"]
        connection.commit()
        return _Keys(markets=_KeySet(markets), events=_KeySet(events), fees=_KeySet(fees), series=series)


def _assignments(values: dict[str, object], separator: str) -> sql.Composed:
    return sql.SQL(separator).join(sql.SQL("{} = %s").format(sql.Identifier(column)) for column in values)


def _fee_key(key: tuple[str, date]) -> dict[str, object]:
    return {"series_ticker": key[0], "effective_from": key[1]}


def run_workload(
    conninfo: str,
    *,
    seconds: float,
    rate: float = 50.0,
    seed: int = 0,
    edge_cases: bool = True,
    progress: Callable[[WorkloadCounts, float], None] | None = None,
) -> WorkloadCounts:
    """Run the workload for `seconds` at `rate` steps per second and return what committed."""
    with Workload(conninfo, seed=seed, edge_cases=edge_cases) as workload:
        return workload.run(seconds=seconds, rate=rate, progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssmd.dev.workload", description="Drive a live change workload on the secmaster tables.")
    parser.add_argument("--database-url", default=os.environ.get(DATABASE_URL.env), help="PostgreSQL URL (env DATABASE_URL)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to run, in seconds (default 10)")
    parser.add_argument("--rate", type=float, default=50.0, help="steps per second; a step is one transaction, or two interleaved ones (default 50)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)

    conninfo = require(args.database_url, DATABASE_URL)

    def show(counts: WorkloadCounts, elapsed: float) -> None:
        print(f"{elapsed:5.1f}s " + " ".join(f"{name}={value}" for name, value in counts.as_dict().items()), flush=True)

    counts = run_workload(conninfo, seconds=args.seconds, rate=args.rate, seed=args.seed, progress=show)
    print(f"done against {redact_url(conninfo)}: {counts.changes} changes in {counts.transactions} transactions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
