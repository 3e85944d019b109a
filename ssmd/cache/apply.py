"""Apply a fetched batch of stream messages to Redis, then acknowledge it.

Rules:
- a change whose commit LSN is below the warm snapshot's point S is already in the warm data
  and is skipped (the snapshot contains exactly the transactions that committed before S);
- every key write or delete goes through a versioned script, so redeliveries, duplicates and
  overlap with the warm writer change nothing;
- writes run pipelined in stream order. A TRUNCATE or a row with TOAST-unchanged columns reads
  Redis state, so it first flushes the writes queued before it;
- a message is acknowledged only after Redis accepted all its writes; a poison message
  (undecodable, unknown table, wrong shape, oversized) is terminated, counted and logged, and a
  message whose handling keeps failing is terminated after `max_deliver` deliveries. Its change
  is then never applied, so the batch ends with a re-warm that brings the row in from a new
  snapshot.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from nats.aio.msg import Msg

from ssmd.bus.consumer import delivery_of
from ssmd.cache.continuity import SequenceTracker
from ssmd.cache.metrics import CacheMetrics
from ssmd.core.changes import Change, Op
from ssmd.core.envelope import CONTROL_PREFIX, SLOT_CREATED_SUBJECT, decode_change, decode_slot_created
from ssmd.core.errors import DecodeError, DependencyError
from ssmd.core.jsontext import dumps, loads
from ssmd.core.keys import CacheAction, KeyDelete, KeySpace, KeyWrite, NamespaceTruncate, cache_actions
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position
from ssmd.core.tables import TableInfo, column_name_set
from ssmd.core.versioning import in_snapshot, merge_unchanged, needs_rewarm_for_slot, raise_floor
from ssmd.logs import fields
from ssmd.store.cache_store import CacheStore
from ssmd.store.scripts import APPLIED, BELOW_FLOOR, CHANGED_SINCE_READ, STALE, Script, ScriptCall

log = logging.getLogger(__name__)

MARK_SUBJECT = f"{CONTROL_PREFIX}.mark"
MAX_MESSAGE_BYTES = 8 * 1024 * 1024  # NATS' own max_payload ceiling; anything larger is not ours
MERGE_ATTEMPTS = 20

BeforeApplyHook = Callable[[Msg], Awaitable[None]]


class RewarmNeeded(Exception):
    """The stream shows the cache may have missed changes; the daemon warms again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PoisonMessage(Exception):
    """A message that can never be applied; it is terminated."""


def decode_mark(body: bytes) -> Lsn:
    """Return the LSN of a `cdc._ssmd.mark` fence message (`{"lsn": "X/Y", ...}`)."""
    try:
        payload = loads(body)
        return Lsn.parse(str(payload["lsn"]))
    except (ValueError, KeyError, TypeError) as exc:
        raise DecodeError(f"invalid body on subject {MARK_SUBJECT}: {exc}") from None


@dataclass
class _Pending:
    """A message of the batch and the state of its writes."""

    msg: Msg
    stream_seq: int
    delivered: int
    lsn: Lsn | None = None
    failed: Exception | None = None
    poison: Exception | None = None


@dataclass
class Applier:
    """Applies stream messages for one warm generation (one snapshot point S)."""

    store: CacheStore
    tables: Mapping[tuple[str, str], TableInfo]
    snapshot_lsn: Lsn
    floors: dict[str, Position]
    tracker: SequenceTracker
    metrics: CacheMetrics
    max_deliver: int
    before_apply: BeforeApplyHook | None = None
    retry_delay_s: float = 0.5
    _calls: list[ScriptCall] = field(default_factory=list)
    _owners: list[_Pending] = field(default_factory=list)
    check_meta: bool = True  # False while a warm runs, because the meta state is `warming` then
    last_commit_time: str | None = None
    newest_seen_lsn: Lsn | None = None

    @property
    def keyspace(self) -> KeySpace:
        return self.store.keyspace

    async def apply_batch(self, msgs: list[Msg]) -> None:
        """Apply and acknowledge `msgs`; raise RewarmNeeded when the stream shows a gap."""
        pending = [_Pending(msg, *delivery_of(msg)) for msg in msgs]
        rewarm: str | None = None
        for item in pending:
            delivered = item.delivered
            if delivered > 1:
                self.metrics.redelivered.inc()
            gap = self.tracker.first_delivery_gap(item.stream_seq, delivered)
            if gap is not None:
                rewarm = gap
                break
            try:
                rewarm = await self._handle(item)
            except PoisonMessage as exc:
                item.poison = exc
            except DependencyError:
                raise
            except Exception as exc:  # a failing handler (or test hook): retried, then terminated
                item.failed = exc
            if rewarm is not None:
                break
        await self._flush()
        terminated = await self._settle(pending, rewarm is not None)
        await self._record_progress()
        rewarm = rewarm or terminated
        if rewarm is not None:
            raise RewarmNeeded(rewarm)

    async def _handle(self, item: _Pending) -> str | None:
        msg = item.msg
        if msg.subject.startswith(CONTROL_PREFIX + "."):
            return await self._handle_control(item)
        if len(msg.data) > MAX_MESSAGE_BYTES:
            raise PoisonMessage(f"message body of {len(msg.data)} bytes exceeds {MAX_MESSAGE_BYTES}")
        try:
            change = decode_change(msg.subject, msg.data)
        except DecodeError as exc:
            raise PoisonMessage(str(exc)) from None
        table = self.tables.get((change.schema, change.table))
        if table is None:
            raise PoisonMessage(f"table {change.schema}.{change.table} is not followed")
        check_columns(change, table)
        change = in_key_order(change, table)

        if self.before_apply is not None:
            await self.before_apply(msg)
        item.lsn = change.position.commit_lsn
        if self.newest_seen_lsn is None or item.lsn > self.newest_seen_lsn:
            self.newest_seen_lsn = item.lsn
        if in_snapshot(change.position.commit_lsn, self.snapshot_lsn):
            self.metrics.skipped.inc()
            return None
        self.last_commit_time = change.commit_time
        try:
            actions = cache_actions(change, self.keyspace)
        except DecodeError as exc:
            raise PoisonMessage(str(exc)) from None
        for action in actions:
            await self._queue(action, item)
        return None

    async def _handle_control(self, item: _Pending) -> str | None:
        msg = item.msg
        try:
            if msg.subject == SLOT_CREATED_SUBJECT:
                created = decode_slot_created(msg.data)
                if needs_rewarm_for_slot(self.snapshot_lsn, created.consistent_point):
                    return f"publisher created slot {created.slot} at {created.consistent_point}, after snapshot point {self.snapshot_lsn}"
            elif msg.subject == MARK_SUBJECT:
                item.lsn = decode_mark(msg.data)
        except DecodeError as exc:
            raise PoisonMessage(str(exc)) from None
        return None

    async def _queue(self, action: CacheAction, item: _Pending) -> None:
        if isinstance(action, KeyDelete):
            version_key = self.keyspace.version_key_of(action.value_key)
            self._add(ScriptCall(Script.APPLY_DELETE, (action.value_key, version_key), (action.position.pack(), self._floor(action.namespace))), item)
        elif isinstance(action, KeyWrite) and not action.unchanged:
            version_key = self.keyspace.version_key_of(action.value_key)
            call = ScriptCall(Script.APPLY_WRITE, (action.value_key, version_key), (action.position.pack(), dumps(action.row), self._floor(action.namespace)))
            self._add(call, item)
        elif isinstance(action, KeyWrite):
            await self._flush()
            await self._merge(action)
        elif isinstance(action, NamespaceTruncate):
            await self._flush()
            await self._truncate(action)

    def _add(self, call: ScriptCall, item: _Pending) -> None:
        self._calls.append(call)
        self._owners.append(item)

    def _floor(self, namespace: str) -> str:
        floor = self.floors.get(namespace)
        return floor.pack() if floor is not None else ""

    async def _flush(self) -> None:
        calls, self._calls, self._owners = self._calls, [], []
        results = await self.store.scripts.run(calls)
        self._count([call.script for call in calls], results)

    def _count(self, scripts: list[Script], results: list[int]) -> None:
        """Add script results to the counters, one update per counter: each update takes a lock."""
        applied = tombstones = stale = 0
        for script, result in zip(scripts, results):
            if result == APPLIED:
                applied += 1
                tombstones += script is Script.APPLY_DELETE
            elif result in (STALE, BELOW_FLOOR):
                stale += 1
        if applied:
            self.metrics.applied.inc(applied)
        if tombstones:
            self.metrics.tombstones.inc(tombstones)
        if stale:
            self.metrics.stale.inc(stale)

    async def _merge(self, action: KeyWrite) -> None:
        # Read the cached row and its version, fill the unchanged columns, and write only if
        # that version is still stored. Another writer in between (the warm) makes it retry.
        version_key = self.keyspace.version_key_of(action.value_key)
        for _ in range(MERGE_ATTEMPTS):
            cached_value, base = await self.store.client.mget([action.value_key, version_key])
            cached = loads(cached_value) if cached_value is not None else None
            row = merge_unchanged(cached, action.row, action.unchanged)
            args = (action.position.pack(), dumps(row), self._floor(action.namespace), base.decode() if base else "")
            [result] = await self.store.scripts.run([ScriptCall(Script.APPLY_MERGE, (action.value_key, version_key), args)])
            if result != CHANGED_SINCE_READ:
                self._count([Script.APPLY_MERGE], [result])
                return
        raise DependencyError(f"key {action.value_key} kept changing while merging unchanged columns")

    async def _truncate(self, action: NamespaceTruncate) -> None:
        floor = raise_floor(self.floors.get(action.namespace), action.position)
        self.floors[action.namespace] = floor
        await self.store.write_meta({f"floor:{action.namespace}": floor.pack()})
        removed = await self.store.sweep(action.namespace, action.position)
        log.info("truncated namespace %s", fields(namespace=action.namespace, position=action.position, removed=removed))

    async def _settle(self, items: list[_Pending], stopping: bool) -> str | None:
        """Acknowledge, retry or terminate each message; return a re-warm reason when a failing message was terminated."""
        terminated = None
        for item in items:
            msg, seq = item.msg, item.stream_seq
            if item.poison is not None:
                self.metrics.terminated.inc()
                log.error("terminated poison message %s", fields(subject=msg.subject, stream_seq=seq, error=item.poison))
                await msg.term()
                self.tracker.handled(seq, None)
            elif item.failed is not None:
                if await self._retry_or_terminate(item) and terminated is None:
                    terminated = f"message at stream seq {seq} ({msg.subject}) failed {item.delivered} times and was terminated, so its change is missing"
            elif stopping and item.lsn is None and not msg.subject.startswith(CONTROL_PREFIX + "."):
                await msg.nak()  # not reached before the re-warm; the new consumer starts over anyway
            else:
                await msg.ack()
                self.tracker.handled(seq, item.lsn)
        return terminated

    async def _retry_or_terminate(self, item: _Pending) -> bool:
        """Ask for a redelivery, or terminate after the last one; return True when terminated."""
        msg, seq = item.msg, item.stream_seq
        delivered = item.delivered
        if delivered >= self.max_deliver:
            self.metrics.terminated.inc()
            log.error("terminated message after %d deliveries %s", delivered, fields(subject=msg.subject, stream_seq=seq, error=item.failed))
            await msg.term()
            self.tracker.handled(seq, None)
            return True
        log.warning("handling message failed, asking for redelivery %s", fields(subject=msg.subject, stream_seq=seq, delivered=delivered, error=item.failed))
        await msg.nak(delay=self.retry_delay_s * delivered)
        return False

    async def _record_progress(self) -> None:
        values: dict[str, str | int | float] = {"stream_seq": self.tracker.contiguous, "last_applied_at": f"{time.time():.3f}"}
        if self.tracker.applied_lsn is not None:
            values["applied_lsn"] = str(self.tracker.applied_lsn)
            if self.newest_seen_lsn is not None:
                self.metrics.lag_bytes.set(max(0, self.newest_seen_lsn - self.tracker.applied_lsn))
        await self.store.write_meta(values)
        self.metrics.stream_seq.set(self.tracker.contiguous)
        lag = commit_lag_seconds(self.last_commit_time)
        if lag is not None:
            self.metrics.lag_seconds.set(lag)


def check_columns(change: Change, table: TableInfo) -> None:
    """Raise PoisonMessage when a change names columns or a key the table does not have."""
    if change.op is Op.TRUNCATE:
        return
    if set(change.key) != set(table.key_columns):
        raise PoisonMessage(f"key columns {list(change.key)} of {table.qualified_name} differ from its key {list(table.key_columns)}")
    if change.data is not None:
        if not isinstance(change.data, dict):
            raise PoisonMessage(f"data of {table.qualified_name} is not an object")
        unknown = change.data.keys() - column_name_set(table)
        if unknown:
            raise PoisonMessage(f"unknown columns {sorted(unknown)} for {table.qualified_name}")


def in_key_order(change: Change, table: TableInfo) -> Change:
    """Return `change` with its key objects in the table's key-column order.

    The message body is canonical JSON with sorted object keys, so a composite key arrives in
    alphabetical order, while the key text joins the parts in key-column order.
    """
    def ordered(key):
        return None if key is None else {column: key[column] for column in table.key_columns if column in key}

    if change.op is Op.TRUNCATE:
        return change
    if tuple(change.key) == table.key_columns and change.old_key is None:
        return change  # a one-column key, or columns already in key order
    return replace(change, key=ordered(change.key), old_key=ordered(change.old_key))


def commit_lag_seconds(commit_time: str | None) -> float | None:
    """Return seconds since a wal2json commit timestamp (`2024-03-15 17:30:00.12+00`)."""
    if not commit_time:
        return None
    text = commit_time.replace(" ", "T", 1)
    if len(text) > 3 and text[-3] in "+-" and text[-3:].lstrip("+-").isdigit():
        text += ":00"
    try:
        return max(0.0, time.time() - datetime.fromisoformat(text).timestamp())
    except ValueError:
        return None
