"""Redis and the cache daemon (`ssmd cache`) in the simulator.

Redis holds, per namespace, key text -> `Entry` (value and version, or a tombstone), a truncate
floor per namespace and a meta record that survives daemon crashes. Every write goes through
one per-key decision, which stands for the atomic Lua script: `ssmd.core.versioning` for the
correct strategy, a swapped piece for a known-bad one.

The daemon warms from a snapshot in chunks while its consumer applies the stream, sweeps when
the warm is done, and re-warms on a stream gap, a recreated stream or a `slot_created` message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ssmd.core.changes import Change
from ssmd.core.encoding import encode_row
from ssmd.core.envelope import SLOT_CREATED_SUBJECT, decode_change, decode_slot_created
from ssmd.core.jsontext import loads
from ssmd.core.keys import KeyDelete, KeySpace, KeyWrite, NamespaceTruncate, cache_actions, key_text
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position, warm_version
from ssmd.core.versioning import (
    Decision,
    Entry,
    decide,
    has_stream_gap,
    in_snapshot,
    merge_unchanged,
    needs_rewarm_for_slot,
    raise_floor,
    should_sweep,
    truncate_clears,
)
from sim.database import NAMESPACES, TABLES, Database, Key
from sim.jetstream import StoredMessage, Stream

MAX_DELIVER = 4  # deliveries of a failing message before the handler terminates it
NAK_DELAY = 3  # ms before a negatively acknowledged message is redelivered

KEYSPACE = KeySpace(key_columns={name: spec.key_columns for name, spec in TABLES.items()})
PREFIX_LENGTH = len(KEYSPACE.prefix) + 1


class Redis:
    def __init__(self) -> None:
        self.entries: dict[str, dict[str, Entry]] = {}
        self.floors: dict[str, Position] = {}
        self.meta: dict[str, object] = {}

    def copy(self) -> Redis:
        other = Redis()
        other.entries = {namespace: dict(entries) for namespace, entries in self.entries.items()}
        other.floors = dict(self.floors)
        other.meta = dict(self.meta)
        return other

    def state(self) -> dict[str, dict[str, tuple[bytes | None, str | None]]]:
        """Return the cache state in the checker's shape."""
        return {
            namespace: {key: (entry.value, entry.version.pack()) for key, entry in entries.items()}
            for namespace, entries in self.entries.items()
        }


@dataclass(slots=True)
class Warm:
    """One warm: its snapshot point, the rows still to write, and when each table was read."""

    snapshot_lsn: int
    started_at: int
    exact: bool
    rows: list[tuple[str, Key, dict]] = field(default_factory=list)
    unread_tables: list[str] = field(default_factory=list)
    read_times: dict[str, int] = field(default_factory=dict)
    done: bool = False


@dataclass(slots=True)
class Recorder:
    """Observations of one run, turned into the checker's `History` at the end."""

    version_writes: list[tuple[str, str, Position]] = field(default_factory=list)
    boundary: list[tuple[str, Position, bool, Warm]] = field(default_factory=list)
    deleted: set[tuple[str, str]] = field(default_factory=set)
    warm_snapshot_times: list[int] = field(default_factory=list)
    lags: list[tuple[str, str, Position, int]] = field(default_factory=list)
    delivered: list[StoredMessage] = field(default_factory=list)
    applied: set[tuple[int, int]] = field(default_factory=set)  # (stream identity, seq)


class CacheDaemon:
    def __init__(self, strategy: str, redis: Redis, recorder: Recorder | None) -> None:
        self.strategy = strategy
        self.redis = redis
        self.recorder = recorder
        self.up = False
        self.warm: Warm | None = None  # the warm whose snapshot the consumer uses
        self.identity = 0
        self.applied_seq = 0
        self.applied_out_of_order: set[int] = set()
        self.handling: list[tuple[int, StoredMessage]] = []
        self.now = 0

    # --- lifecycle --------------------------------------------------------------------------

    def crash(self) -> None:
        self.up = False
        self.warm = None
        self.handling = []
        self.applied_out_of_order = set()

    def start(self, db: Database, stream: Stream, now: int) -> str:
        """Resume from the meta record when the last warm finished, else warm again."""
        self.up = True
        self.now = now
        meta = self.redis.meta
        if meta.get("state") == "ready" and meta.get("stream_identity") == stream.identity:
            self.warm = meta["warm"]  # type: ignore[assignment]
            self.identity = stream.identity
            self.applied_seq = int(meta["stream_seq"])  # type: ignore[arg-type]
            return f"cache start, resume at stream seq {self.applied_seq}"
        return "cache start; " + self.begin_warm(db, stream, now, "no finished warm")

    def begin_warm(self, db: Database, stream: Stream, now: int, reason: str) -> str:
        if self.strategy == "lsn-before-warm":
            # The bad plan: read the WAL position, then each table in its own query later.
            warm = Warm(db.wal_end, now, exact=False, unread_tables=list(TABLES))
        else:
            point, rows = db.exported_snapshot()
            warm = Warm(point, now, exact=True, read_times={name: now for name in TABLES})
            for table, table_rows in rows.items():
                warm.rows.extend((table, key, row) for key, row in table_rows.items())
        self.warm = warm
        self.identity = stream.identity
        self.applied_seq = max(self.applied_seq if self.redis.meta.get("stream_identity") == stream.identity else 0, stream.first_seq - 1)
        self.applied_out_of_order = {seq for seq in self.applied_out_of_order if seq > self.applied_seq}
        self.redis.meta.update(state="warming", warm=warm, stream_identity=stream.identity, stream_seq=self.applied_seq)
        return f"warm begin at {Lsn(warm.snapshot_lsn)} ({reason})"

    # --- warm -------------------------------------------------------------------------------

    def can_warm(self) -> bool:
        return self.up and self.warm is not None and not self.warm.done

    def warm_step(self, db: Database, now: int, chunk: int) -> str:
        warm = self.warm
        assert warm is not None
        if not warm.rows and warm.unread_tables:
            table = warm.unread_tables.pop(0)
            warm.read_times[table] = now
            warm.rows = [(table, key, row) for key, row in db.visible_rows(table, now).items()]
            return f"warm read {table} rows={len(warm.rows)}"
        if warm.rows:
            batch, warm.rows = warm.rows[:chunk], warm.rows[chunk:]
            version = warm_version(Lsn(warm.snapshot_lsn))
            for table, key, row in batch:
                self._write(self._warm_namespace(table), self._warm_key(table, key, row), encode_row(row), version, None, now)
            return f"warm write {len(batch)} rows at {version}"
        if warm.unread_tables:
            return "warm idle"

        swept = 0 if self.strategy == "no-sweep" else self._sweep(warm.snapshot_lsn)
        warm.done = True
        self.redis.meta.update(state="ready")
        if self.recorder is not None:
            self.recorder.warm_snapshot_times.append(warm.started_at)
        return f"warm done at {Lsn(warm.snapshot_lsn)}, swept {swept}"

    def _warm_namespace(self, table: str) -> str:
        return table if self.strategy == "namespace-mismatch" else TABLES[table].namespace

    def _warm_key(self, table: str, key: Key, row: dict) -> str:
        if self.strategy == "first-column-key":
            return key_text([row[TABLES[table].columns[0]]])
        return key_text(list(key))

    def _sweep(self, snapshot_lsn: int) -> int:
        swept = 0
        snapshot = Lsn(snapshot_lsn)
        for namespace in NAMESPACES.values():
            entries = self.redis.entries.get(namespace, {})
            for key in [key for key, entry in entries.items() if self._sweeps(entry.version, snapshot)]:
                del entries[key]
                swept += 1
        return swept

    def _sweeps(self, version: Position, snapshot: Lsn) -> bool:
        if self.strategy == "string-lsn":
            return _text(version) < _text(warm_version(snapshot))
        return should_sweep(version, snapshot)

    # --- consumer ---------------------------------------------------------------------------

    def check_continuity(self, db: Database, stream: Stream, now: int) -> str | None:
        """Return a re-warm log line when the stream is new or lost messages, else None."""
        if stream.identity != self.identity:
            self.handling = []
            self.applied_seq = 0
            self.applied_out_of_order = set()
            return self.begin_warm(db, stream, now, f"stream recreated (identity {stream.identity})")
        if self.strategy != "discard-unnoticed" and has_stream_gap(self.applied_seq, stream.first_seq):
            return self.begin_warm(db, stream, now, f"stream gap after seq {self.applied_seq}, first is {stream.first_seq}")
        return None

    def take(self, stream: Stream, seq: int, now: int, ack_wait: int) -> None:
        self.handling.append((stream.identity, stream.deliver(seq, now, ack_wait)))

    def handle(self, db: Database, stream: Stream, index: int, now: int) -> str:
        """Apply one delivered message and ack it."""
        identity, stored = self.handling.pop(index)
        if identity != stream.identity:
            return f"drop seq {stored.seq} of an old stream"
        if stored.failures_left > 0:
            return self._fail(db, stream, identity, stored, now)
        line = self.apply_message(db, stream, stored, now)
        if self.recorder is not None:
            self.recorder.delivered.append(stored)
            self.recorder.applied.add((identity, stored.seq))
        stream.ack(identity, stored.seq)
        self._advance(stored.seq)
        return line

    def _fail(self, db: Database, stream: Stream, identity: int, stored: StoredMessage, now: int) -> str:
        """Handle a failed apply: NAK it, or after the last delivery terminate it and re-warm.

        A terminated message is never applied, so only a new snapshot can bring its change in.
        """
        stored.failures_left -= 1
        deliveries = stream.deliveries.get(stored.seq, 0)
        if deliveries < MAX_DELIVER:
            stream.nak(identity, stored.seq, now + NAK_DELAY)
            return f"seq {stored.seq} failed on delivery {deliveries}, nak"
        stream.terminate(identity, stored.seq, now)
        self._advance(stored.seq)
        return f"seq {stored.seq} failed {deliveries} times, terminated; " + self.begin_warm(
            db, stream, now, f"seq {stored.seq} terminated"
        )

    def _advance(self, seq: int) -> None:
        if seq <= self.applied_seq:
            return
        self.applied_out_of_order.add(seq)
        while self.applied_seq + 1 in self.applied_out_of_order:
            self.applied_seq += 1
            self.applied_out_of_order.discard(self.applied_seq)
        self.redis.meta["stream_seq"] = self.applied_seq

    def apply_message(self, db: Database | None, stream: Stream | None, stored: StoredMessage, now: int) -> str:
        message = stored.message
        if message.subject == SLOT_CREATED_SUBJECT:
            point = decode_slot_created(message.body).consistent_point
            snapshot = Lsn(self.warm.snapshot_lsn) if self.warm is not None else None
            if db is not None and stream is not None and needs_rewarm_for_slot(snapshot, point):
                return self.begin_warm(db, stream, now, f"slot created at {point}")
            return f"seq {stored.seq} slot created at {point}, snapshot is not older"

        change = decode_change(message.subject, message.body)
        warm = self.warm
        assert warm is not None
        contained = self._in_snapshot(change.position.commit_lsn, Lsn(warm.snapshot_lsn))
        if self.recorder is not None and db is not None:
            self.recorder.boundary.append((change.table, change.position, contained, warm))
        if contained:
            return f"seq {stored.seq} skip {change.op.value} {change.table} at {change.position}: in snapshot"

        version = change.position
        if self.strategy == "change-lsn-order":
            version = Position(Lsn(stored.change_lsn), 0)
        applied = [self._apply_action(action, change, version, stored, now) for action in self._actions(change)]
        return f"seq {stored.seq} {change.op.value} {change.table} {change.key} at {change.position}: {applied}"

    def _actions(self, change: Change) -> list:
        if self.strategy != "first-column-key" or change.data is None:
            return cache_actions(change, KEYSPACE)
        spec = TABLES[change.table]
        namespace = spec.namespace
        value_key = KEYSPACE.value_key(namespace, key_text([change.data[spec.columns[0]]]))
        return [KeyWrite(namespace, value_key, change.data, change.position, change.unchanged)]

    def _apply_action(self, action, change: Change, version: Position, stored: StoredMessage, now: int) -> str:
        namespace = action.namespace
        if isinstance(action, NamespaceTruncate):
            return self._truncate(namespace, version)

        key = action.value_key[PREFIX_LENGTH + len(namespace) + 1 :]
        if isinstance(action, KeyDelete):
            if self.recorder is not None:
                self.recorder.deleted.add((namespace, key))
            return self._delete(namespace, key, version, now, stored)

        row = action.row
        if action.unchanged and self.strategy != "toast-replace":
            entry = self.redis.entries.get(namespace, {}).get(key)
            cached = loads(entry.value) if entry is not None and entry.value is not None else None
            row = merge_unchanged(cached, row, action.unchanged)
        return self._write(namespace, key, encode_row(row), version, stored, now)

    # --- the per-key scripts ----------------------------------------------------------------

    def _write(self, namespace: str, key: str, value: bytes | None, version: Position, stored, now: int) -> str:
        entries = self.redis.entries.setdefault(namespace, {})
        entry = entries.get(key)
        if not self._may_write(entry, version, self.redis.floors.get(namespace)):
            return "stale"
        entries[key] = Entry(value, version)
        if self.recorder is not None:
            self.recorder.version_writes.append((namespace, key, version))
            if stored is not None:
                self.recorder.lags.append((namespace, key, version, now - stored.commit_time))
        return "set" if value is not None else "tombstone"

    def _delete(self, namespace: str, key: str, version: Position, now: int, stored) -> str:
        if self.strategy == "del-without-tombstone":
            self.redis.entries.setdefault(namespace, {}).pop(key, None)
            return "del"
        return self._write(namespace, key, None, version, stored, now)

    def _truncate(self, namespace: str, position: Position) -> str:
        floor = self.redis.floors.get(namespace)
        if self.strategy == "string-lsn":
            if floor is None or _text(position) > _text(floor):
                self.redis.floors[namespace] = position
        else:
            self.redis.floors[namespace] = raise_floor(floor, position)
        entries = self.redis.entries.get(namespace, {})
        cleared = [key for key, entry in entries.items() if truncate_clears(entry.version, position)]
        for key in cleared:
            del entries[key]
        return f"truncate cleared {len(cleared)}"

    def _may_write(self, entry: Entry | None, version: Position, floor: Position | None) -> bool:
        if self.strategy == "blind-set":
            return True
        stored = entry.version if entry is not None else None
        if self.strategy == "string-lsn":
            if floor is not None and not _text(version) > _text(floor):
                return False
            return stored is None or _text(version) > _text(stored)
        return decide(stored, version, floor) is Decision.APPLY

    def _in_snapshot(self, commit_lsn: Lsn, snapshot_lsn: Lsn) -> bool:
        if self.strategy == "string-lsn":
            return str(commit_lsn) < str(snapshot_lsn)
        return in_snapshot(commit_lsn, snapshot_lsn)


def _text(position: Position) -> tuple[str, int]:
    """The `string-lsn` strategy's version: LSN text, which orders wrongly across digit counts."""
    return (str(position.commit_lsn), position.index)
