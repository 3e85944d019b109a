"""One simulated scenario: the models, a seeded scheduler, quiesce and the invariants check.

A scenario first runs a random phase. Writers, the publisher, JetStream, the cache daemon and
faults (crashes, lost PubAcks, a dropped slot, a recreated stream) take turns chosen by
`random.Random(seed)` on a virtual clock in milliseconds. Then it quiesces: writers stop, and
the daemons restart and run until everything is delivered. The production checker then compares
the database with Redis and the recorded history. The same seed gives the same trace.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ssmd.core.changes import Op
from ssmd.core.encoding import encode_row
from ssmd.core.invariants import ApplyLag, BoundaryDecision, Gap, History, Violation, VersionWrite, check
from ssmd.core.jsontext import JsonNumber, loads
from ssmd.core.keys import key_text
from ssmd.core.lsn import Lsn
from sim.cache import CacheDaemon, Recorder, Redis
from sim.database import NAMESPACES, TABLES, TOAST_PREFIX, Database, Key, Transaction, WalChange
from sim.jetstream import Stream
from sim.publisher import Publisher

# LSN regions where text comparison breaks: 7 to 8 hex digits in the low half, a carry into the
# high half, and 1 to 2 hex digits in the high half.
LSN_BOUNDARIES = (0x10000000, 0x1_00000000, 0x10_00000000, 0x1_10000000)
LAG_BOUND_MS = 60_000  # commit-to-apply bound; scenarios last a few virtual seconds
QUIESCE_STEP_LIMIT = 20_000

MARKET_TICKERS = tuple(f"M-{i}" for i in range(1, 7))
EVENT_TICKERS = tuple(f"E-{i}" for i in range(1, 4))
SERIES = ("S-1", "S-2")
DATES = ("2026-01-01", "2026-02-01")
STATUSES = ("open", "closed", "halted", "settled")
FEES = ("0.0700", "0.07", "1.5", "12345678901234567890.123456789012345678", "NaN", None)


@dataclass(slots=True)
class Params:
    """Scenario shape, drawn from the seed."""

    steps: int
    max_messages: int
    window: int
    ack_wait: int
    max_ack_pending: int
    warm_chunk: int
    fault_rate: float
    ack_loss: float


@dataclass(slots=True)
class Result:
    seed: int
    strategy: str
    violations: list[Violation]
    trace: list[str] = field(default_factory=list)

    @property
    def invariants(self) -> list[str]:
        return sorted({violation.invariant for violation in self.violations})


class World:
    def __init__(self, seed: int, strategy: str = "correct") -> None:
        self.seed = seed
        self.strategy = strategy
        self.rng = random.Random(seed)
        self.now = 0
        self.trace: list[str] = []
        self.gaps: list[Gap] = []
        rng = self.rng
        self.params = Params(
            steps=rng.randint(120, 260),
            max_messages=rng.choice((4, 6, 10, 10_000, 10_000)),
            window=rng.randint(30, 400),
            ack_wait=rng.randint(15, 80),
            max_ack_pending=rng.randint(1, 4),
            warm_chunk=rng.randint(1, 4),
            fault_rate=rng.choice((0.0, 0.01, 0.03)),
            ack_loss=rng.choice((0.0, 0.1)),
        )

        self.db = Database(rng.choice(LSN_BOUNDARIES) - rng.randint(0x80, 0x900))
        self._bootstrap()
        self.stream = Stream(self.params.window, self.params.max_messages)
        self.publisher = Publisher(strategy, self.stream.ever_stored)
        self.log(self.publisher.start(self.db, self.now))
        self.redis = Redis()
        self.recorder = Recorder()
        self.cache = CacheDaemon(strategy, self.redis, self.recorder)
        self.log(self.cache.start(self.db, self.stream, self.now))

    def log(self, line: str) -> None:
        self.trace.append(f"{self.now:>6} {line}")

    def _bootstrap(self) -> None:
        transaction = self.db.begin()
        for ticker in MARKET_TICKERS[:3]:
            self._write(transaction, Op.INSERT, "markets", None, self._market_row(ticker))
        for ticker in EVENT_TICKERS[:2]:
            self._write(transaction, Op.INSERT, "events", None, {"event_ticker": ticker, "title": f"{ticker} title"})
        self._write(transaction, Op.INSERT, "series_fees", None, self._fee_row(SERIES[0], DATES[0]))
        self.db.commit(transaction, self.now, 0, 0x30)

    # --- writers ----------------------------------------------------------------------------

    def _market_row(self, ticker: str) -> dict:
        return {
            "event_ticker": self.rng.choice(EVENT_TICKERS),
            "ticker": ticker,
            "status": self.rng.choice(STATUSES),
            "notes": self._notes(),
        }

    def _notes(self) -> str | None:
        draw = self.rng.random()
        if draw < 0.2:
            return None
        prefix = TOAST_PREFIX if draw < 0.7 else "short-"
        return f"{prefix}{self.rng.randint(1, 999)}"

    def _fee_row(self, series: str, date: str) -> dict:
        return {"series_ticker": series, "effective_from": date, "fee": _fee(self.rng.choice(FEES))}

    def _write(self, transaction: Transaction, op: Op, table: str, old_key: Key | None, row: dict | None, key: Key | None = None) -> str:
        spec = TABLES[table]
        if row is not None:
            key = spec.key_of(row)
        omitted: tuple[str, ...] = ()
        if op is Op.UPDATE and table == "markets":
            before = self.db.current(transaction, table, old_key or key)
            notes = before["notes"] if before is not None else None
            if isinstance(notes, str) and notes.startswith(TOAST_PREFIX) and row["notes"] == notes:
                omitted = ("notes",)  # wal2json leaves an unchanged out-of-line value out
        change_lsn = self.db.allocate(self.rng.randint(0x18, 0x60))
        self.db.write(transaction, WalChange(op, table, key, old_key, row, change_lsn, omitted))
        moved = f" from {old_key}" if old_key else ""
        return f"xid={transaction.xid} {op.value} {table} {key}{moved} at change {Lsn(change_lsn)}"

    def begin(self) -> Transaction:
        transaction = self.db.begin()
        self.log(f"begin xid={transaction.xid}")
        return transaction

    def write_random(self, transaction: Transaction) -> str:
        table = self.rng.choice(("markets", "markets", "events", "series_fees"))
        if table == "markets":
            key = (self.rng.choice(MARKET_TICKERS),)
        elif table == "events":
            key = (self.rng.choice(EVENT_TICKERS),)
        else:
            key = (self.rng.choice(SERIES), self.rng.choice(DATES))
        if not self.db.can_lock(transaction, table, key):
            return f"xid={transaction.xid} waits for lock on {table} {key}"
        current = self.db.current(transaction, table, key)
        if current is None:
            return self._write(transaction, Op.INSERT, table, None, self._new_row(table, key))

        draw = self.rng.random()
        if draw < 0.2:
            return self._write(transaction, Op.DELETE, table, None, None, key=key)
        if draw < 0.3 and table != "events":
            return self._change_key(transaction, table, key, current)
        return self._write(transaction, Op.UPDATE, table, None, self._updated_row(table, current))

    def _new_row(self, table: str, key: Key) -> dict:
        if table == "markets":
            return self._market_row(key[0])
        if table == "events":
            return {"event_ticker": key[0], "title": f"{key[0]} v{self.rng.randint(1, 99)}"}
        return self._fee_row(*key)

    def _updated_row(self, table: str, current: dict) -> dict:
        row = dict(current)
        if table == "markets":
            row["status"] = self.rng.choice(STATUSES)
            if self.rng.random() < 0.3:
                row["notes"] = self._notes()
            if self.rng.random() < 0.2:
                row["event_ticker"] = self.rng.choice(EVENT_TICKERS)
        elif table == "events":
            row["title"] = f"{row['event_ticker']} v{self.rng.randint(1, 99)}"
        else:
            row["fee"] = _fee(self.rng.choice(FEES))
        return row

    def _change_key(self, transaction: Transaction, table: str, key: Key, current: dict) -> str:
        row = dict(current)
        if table == "markets":
            row["ticker"] = self.rng.choice(MARKET_TICKERS)
        else:
            row["effective_from"] = self.rng.choice(DATES)
        new_key = TABLES[table].key_of(row)
        if new_key == key or not self.db.can_lock(transaction, table, new_key):
            return f"xid={transaction.xid} skips a key change of {table} {key}"
        if self.db.current(transaction, table, new_key) is not None:
            return f"xid={transaction.xid} skips a key change of {table} {key}: {new_key} exists"
        return self._write(transaction, Op.UPDATE, table, key, row)

    def update(self, transaction: Transaction, table: str, key: Key, **values) -> None:
        """Update a row's columns in an open transaction (for explicit scenarios)."""
        row = {**self.db.current(transaction, table, key), **values}
        self.log(self._write(transaction, Op.UPDATE, table, None, row))

    def insert(self, transaction: Transaction, table: str, row: dict) -> None:
        self.log(self._write(transaction, Op.INSERT, table, None, row))

    def delete(self, transaction: Transaction, table: str, key: Key) -> None:
        self.log(self._write(transaction, Op.DELETE, table, None, None, key=key))

    def commit(self, transaction: Transaction, visible_delay: int | None = None) -> None:
        self.log(self._commit(transaction, visible_delay))

    def _commit(self, transaction: Transaction, visible_delay: int | None = None) -> str:
        if visible_delay is None:
            visible_delay = 0 if self.rng.random() < 0.5 else self.rng.randint(1, 40)
        self.db.commit(transaction, self.now, visible_delay, self.rng.randint(0x18, 0x40))
        return f"commit xid={transaction.xid} at {Lsn(transaction.commit_lsn)} visible +{visible_delay}"

    def truncate(self, table: str) -> str:
        transaction = self.db.begin()
        change_lsn = self.db.allocate(0x30)
        self.db.write(transaction, WalChange(Op.TRUNCATE, table, None, None, None, change_lsn))
        self.db.commit(transaction, self.now, 0, 0x20)
        return f"truncate {table} xid={transaction.xid} at {Lsn(transaction.commit_lsn)}"

    # --- publisher, stream and cache steps --------------------------------------------------

    def publish(self, index: int = 0, lose_ack: bool = False) -> str:
        outgoing = self.publisher.pop_outgoing(index)
        stored = self.stream.publish(outgoing.message, outgoing.change_lsn, outgoing.commit_time, self.now)
        verb = "stored" if stored else "duplicate"
        if lose_ack:
            self.publisher.outbox.append(outgoing)
            return f"publish {outgoing.message.msg_id} {verb}, PubAck lost"
        self.publisher.acknowledged(self.db, outgoing)
        return f"publish {outgoing.message.msg_id} {verb} seq={self.stream.last_seq}"

    def consume(self, pick: int = 0) -> str:
        """Check stream continuity, then deliver one message to the cache's handler."""
        rewarm = self.cache.check_continuity(self.db, self.stream, self.now)
        if rewarm is not None:
            return rewarm
        seqs = self.stream.deliverable(self.now, 3)
        seq = seqs[min(pick, len(seqs) - 1)]
        redelivery = " (redelivery)" if seq in self.stream.deadlines else ""
        self.cache.take(self.stream, seq, self.now, self.params.ack_wait)
        return f"deliver seq={seq}{redelivery}"

    def can_consume(self) -> bool:
        cache = self.cache
        if not cache.up:
            return False
        if self.stream.identity != cache.identity:
            return True
        if self.strategy != "discard-unnoticed" and self.stream.first_seq > cache.applied_seq + 1:
            return True
        return len(cache.handling) < self.params.max_ack_pending and bool(self.stream.deliverable(self.now, 1))

    def handle(self, index: int = 0) -> str:
        return self.cache.handle(self.db, self.stream, index, self.now)

    def poison_message(self) -> str:
        """Make the handler fail on a stored message a few times, or on every delivery."""
        seq = self.rng.choice(list(self.stream.messages))
        failures = self.rng.choice((1, 2, 3, 1_000_000))
        self.stream.messages[seq].failures_left = failures
        return f"seq {seq} will fail {failures} times"

    def drop_slot(self) -> str:
        self.db.drop_slot()
        self.publisher.crash()
        return "admin drops the slot; publisher disconnected"

    def recreate_stream(self) -> str:
        self.stream.recreate()
        self.gaps.append(Gap(self.now, f"stream recreated (identity {self.stream.identity})"))
        return "admin recreates the stream"

    def start_publisher(self) -> str:
        if not self.db.slot_exists:
            self._record_slot_loss()
        return self.publisher.start(self.db, self.now)

    def _record_slot_loss(self) -> None:
        """Record a gap for transactions the dropped slot never got into the stream."""
        confirmed = max(self.db.slot_confirmed, self.db.slot_point)
        lost = [
            transaction
            for transaction in self.db.committed_between(confirmed, self.db.wal_end)
            if not self.publisher.all_stored(transaction)
        ]
        if lost:
            latest = max(transaction.commit_time for transaction in lost)
            self.gaps.append(Gap(latest, f"slot dropped; {len(lost)} transactions never reached the stream"))

    # --- helpers for scripted scenarios ----------------------------------------------------

    def tick(self, ms: int = 1) -> None:
        self.now += ms

    def publish_all(self) -> None:
        """Receive every decoded transaction, publish every message and confirm the slot."""
        while self.publisher.can_receive(self.db):
            self.tick()
            self.log(self.publisher.receive(self.db, self.now))
        while self.publisher.outbox:
            self.tick()
            self.log(self.publish())
        if self.publisher.can_confirm(self.db):
            self.log(self.publisher.confirm(self.db))

    def deliver_all(self) -> int:
        """Deliver every deliverable message to the cache's handler; return how many."""
        count = 0
        while self.stream.deliverable(self.now, 1):
            self.tick()
            self.log(self.consume())
            count += 1
        return count

    def cached(self, table: str, *key: str) -> dict | None:
        """Return the cached row of a key, None when absent or a tombstone."""
        entry = self.redis.entries.get(TABLES[table].namespace, {}).get(key_text(list(key)))
        if entry is None or entry.value is None:
            return None
        return loads(entry.value)

    # --- scheduler --------------------------------------------------------------------------

    def _actions(self, writers: bool, faults: bool) -> list[tuple[float, Callable[[], str]]]:
        rng = self.rng
        db, publisher, cache = self.db, self.publisher, self.cache
        actions: list[tuple[float, Callable[[], str]]] = []
        if writers:
            if len(db.open) < 3:
                actions.append((2.0, lambda: f"begin xid={db.begin().xid}"))
            if db.open:
                actions.append((6.0, lambda: self.write_random(rng.choice(list(db.open.values())))))
                ready = [t for t in db.open.values() if t.changes]
                if ready:
                    actions.append((3.0, lambda: self._commit(rng.choice(ready))))
                    actions.append((0.2, lambda: self._rollback(rng.choice(ready))))
            table = rng.choice(tuple(TABLES))
            if not db.table_locked_by_other(None, table):
                actions.append((0.15, lambda: self.truncate(table)))

        if not publisher.up:
            actions.append((1.0, self.start_publisher))
        else:
            if publisher.can_receive(db):
                actions.append((4.0, lambda: publisher.receive(db, self.now)))
            if publisher.outbox:
                outbox_index = 0 if rng.random() < 0.7 else rng.randrange(len(publisher.outbox))
                lose = faults and rng.random() < self.params.ack_loss
                actions.append((5.0, lambda: self.publish(outbox_index, lose)))
            if publisher.can_confirm(db):
                actions.append((2.0, lambda: publisher.confirm(db)))

        if not cache.up:
            actions.append((1.0, lambda: cache.start(db, self.stream, self.now)))
        else:
            if cache.can_warm():
                actions.append((3.0, lambda: cache.warm_step(db, self.now, self.params.warm_chunk)))
            if self.can_consume():
                actions.append((5.0, lambda: self.consume(0 if rng.random() < 0.75 else rng.randrange(3))))
            if cache.handling:
                handling_index = 0 if rng.random() < 0.6 else rng.randrange(len(cache.handling))
                actions.append((5.0, lambda: self.handle(handling_index)))

        if faults and self.params.fault_rate:
            rate = self.params.fault_rate
            if publisher.up:
                actions.append((rate * 10, self.crash_publisher))
            if cache.up:
                actions.append((rate * 10, self.crash_cache))
            if db.slot_exists:
                actions.append((rate, self.drop_slot))
            if self.stream.messages:
                actions.append((rate * 3, self.poison_message))
            actions.append((rate, self.recreate_stream))
        return actions

    def crash_publisher(self) -> str:
        self.publisher.crash()
        return "publisher crashes"

    def crash_cache(self) -> str:
        self.cache.crash()
        return "cache crashes"

    def _rollback(self, transaction: Transaction) -> str:
        self.db.rollback(transaction)
        return f"rollback xid={transaction.xid}"

    def step(self, writers: bool = True, faults: bool = True) -> bool:
        """Run one scheduled action; return False when none is enabled."""
        actions = self._actions(writers, faults)
        if not actions:
            return False
        total = sum(weight for weight, _ in actions)
        draw = self.rng.random() * total
        for weight, action in actions:
            draw -= weight
            if draw <= 0:
                break
        self.now += self.rng.randint(1, 6)
        line = action()
        if line:
            self.log(line)
        return True

    def quiesce(self) -> None:
        """Stop writers, restart the daemons and run until every message is applied."""
        for transaction in list(self.db.open.values()):
            if transaction.changes:
                self.commit(transaction)
            else:
                self._rollback(transaction)
        for _ in range(QUIESCE_STEP_LIMIT):
            if self.step(writers=False, faults=False):
                continue
            deadline = self.stream.next_deadline()
            if deadline is None or deadline <= self.now:
                return
            self.now = deadline
        raise RuntimeError(
            f"seed {self.seed} did not quiesce within {QUIESCE_STEP_LIMIT} steps, a simulator bug: "
            f"replay it with ssmd sim --seed {self.seed} --strategy {self.strategy} --trace"
        )

    def run(self) -> Result:
        for _ in range(self.params.steps):
            self.step()
        self.log("quiesce")
        self.quiesce()
        return Result(self.seed, self.strategy, self.check(), self.trace)

    # --- the check --------------------------------------------------------------------------

    def database_state(self) -> dict[str, dict[str, bytes]]:
        return {table: {key_text(list(key)): encode_row(row) for key, row in rows.items()} for table, rows in self.db.rows.items()}

    def history(self) -> History:
        recorder = self.recorder
        transactions = {transaction.commit_lsn: transaction for transaction in self.db.committed}
        decisions = []
        for table, position, decided, warm in recorder.boundary:
            commit_lsn = position.commit_lsn.value
            if warm.exact:
                actual = commit_lsn < warm.snapshot_lsn
            else:
                read_at = warm.read_times.get(table)
                actual = read_at is not None and transactions[commit_lsn].visible_at <= read_at
            decisions.append(BoundaryDecision(table, position, decided, actual))

        discards = [
            Gap(time, f"stream discarded seq {seq} before it was applied")
            for time, identity, seq in self.stream.discarded
            if (identity, seq) not in recorder.applied
        ]
        discards += [
            Gap(time, f"handler terminated seq {seq} before it was applied")
            for time, identity, seq in self.stream.terminated
            if (identity, seq) not in recorder.applied
        ]
        return History(
            version_writes=[VersionWrite(namespace, key, version.pack()) for namespace, key, version in recorder.version_writes],
            confirmations=self.publisher.confirmations,
            boundary_decisions=decisions,
            deleted_keys=recorder.deleted,
            gaps=self.gaps + discards,
            warm_snapshot_times=recorder.warm_snapshot_times,
            lags=[ApplyLag(namespace, key, position, lag) for namespace, key, position, lag in recorder.lags],
            lag_bound=LAG_BOUND_MS,
            replayed_cache=self._replay(),
        )

    def _replay(self):
        """Return the cache state after applying every delivered message again, on a copy."""
        if self.cache.warm is None:
            return None  # the cache daemon is down and has no snapshot point
        copy = self.redis.copy()
        replayer = CacheDaemon(self.strategy, copy, None)
        replayer.warm = self.cache.warm
        for stored in self.recorder.delivered:
            replayer.apply_message(None, None, stored, self.now)
        return copy.state()

    def check(self) -> list[Violation]:
        return check(self.database_state(), self.redis.state(), NAMESPACES, self.history())


def _fee(text: str | None) -> JsonNumber | str | None:
    """Return a numeric's canonical value: exact number text, "NaN" as a string, or None."""
    if text is None or text == "NaN":
        return text
    return JsonNumber(text)


def run_scenario(seed: int, strategy: str = "correct") -> Result:
    """Run one seeded scenario and check every invariant."""
    return World(seed, strategy).run()
