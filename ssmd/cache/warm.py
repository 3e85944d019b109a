"""Warm: copy every followed table from an exported snapshot into Redis at the warm version.

The warm version of a snapshot at S is `warm_version(S)`, just below (S, 0). A worker thread
reads the snapshot (`ssmd.pg.snapshot`), encodes rows and writes them in pipelined batches
through the versioned write script on a blocking Redis client, with one batch in flight while
it reads and encodes the next. The consumer runs at the same
time on the event loop, and the scripts make the order of their writes irrelevant. A change the
consumer already applied has a version at or above (S, 0), so the older snapshot row does not
replace it. A tombstone left by a delete stops the snapshot row from coming back. After the last
row, a sweep removes every entry of the followed namespaces older than the warm version: rows
deleted while the cache was down, and tombstones no longer needed. The first warm of a process
skips the sweep when the namespaces held no entry before the consumer started, because every
later write is at the warm version or above. A later warm always sweeps: a batch of a cancelled
earlier warm may still land.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import redis

from ssmd.cache.metrics import CacheMetrics
from ssmd.core.keys import KeySpace
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position, warm_version
from ssmd.core.tables import TableInfo
from ssmd.logs import fields
from ssmd.pg.snapshot import SnapshotReader
from ssmd.store.cache_store import CacheStore, connect_redis_blocking, has_entries_blocking, sweep_blocking
from ssmd.store.scripts import APPLIED, BlockingScriptRunner, WarmWriteStream

log = logging.getLogger(__name__)

BATCH_ROWS = 1000
PROGRESS_INTERVAL_S = 5.0

AfterSnapshotHook = Callable[[Lsn], None]


@dataclass
class WarmResult:
    snapshot_lsn: Lsn
    rows: int
    written: int
    swept: int
    seconds: float
    sweep_seconds: float = 0.0


class WarmCancelled(Exception):
    """The daemon stopped the warm (stop signal or a re-warm)."""


class Warmer:
    """One warm: snapshot, pipelined versioned writes, then the sweep."""

    def __init__(
        self,
        dsn: str,
        redis_url: str,
        store: CacheStore,
        table_names: list[str],
        floors: Mapping[str, Position],
        metrics: CacheMetrics,
        *,
        delay_ms: int = 0,
        after_snapshot: AfterSnapshotHook | None = None,
        skip_sweep_when_empty: bool = False,
    ) -> None:
        self._dsn = dsn
        self._redis_url = redis_url
        self._store = store
        self._table_names = table_names
        self._floors = floors
        self._metrics = metrics
        self._delay_s = delay_ms / 1000
        self._after_snapshot = after_snapshot
        self._skip_sweep_when_empty = skip_sweep_when_empty
        self._cancel = threading.Event()
        # Resolves with (S, the tables as the snapshot shows them, estimated rows) once the slot exists.
        self.snapshot_ready: asyncio.Future[tuple[Lsn, list[TableInfo], int]] = asyncio.get_running_loop().create_future()

    @property
    def keyspace(self) -> KeySpace:
        return self._store.keyspace

    async def run(self) -> WarmResult:
        """Warm every followed table; `snapshot_ready` resolves with S as soon as it is known."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        try:
            rows, written, swept, sweep_seconds = await asyncio.to_thread(self._copy, loop, started)
        finally:
            self._cancel.set()
        snapshot_lsn, _, _ = self.snapshot_ready.result()

        seconds = time.monotonic() - started
        self._metrics.warm_swept.set(swept)
        self._metrics.warm_rows_per_second.set(rows / seconds if seconds else 0.0)
        log.info("warm finished %s", fields(snapshot_lsn=snapshot_lsn, rows=rows, written=written, swept=swept, seconds=f"{seconds:.1f}", rows_per_s=f"{rows / seconds if seconds else 0:.0f}"))
        return WarmResult(snapshot_lsn, rows, written, swept, seconds, sweep_seconds)

    def cancel(self) -> None:
        """Make the worker thread stop after its current batch."""
        self._cancel.set()

    def _copy(self, loop: asyncio.AbstractEventLoop, started: float) -> tuple[int, int, int, float]:
        # Runs in a worker thread: snapshot, encode, write and sweep; returns (rows, written, swept, sweep seconds).
        client = connect_redis_blocking(self._redis_url, name="ssmd-cache-warm")
        try:
            scripts = BlockingScriptRunner(client)
            scripts.load()
            with SnapshotReader(self._dsn) as reader:
                tables = [reader.table_info(name) for name in self._table_names]
                namespaces = [self.keyspace.namespace(table.schema, table.name) for table in tables]
                # Checked before the consumer starts: from then on every write is at the warm
                # version or above, so namespaces empty now have nothing for the sweep to remove.
                sweep = has_entries_blocking(client, self.keyspace, namespaces) if self._skip_sweep_when_empty else True
                estimate = sum(reader.estimate_rows(table) for table in tables)
                loop.call_soon_threadsafe(_resolve, self.snapshot_ready, (reader.snapshot_lsn, tables, estimate))
                if self._after_snapshot is not None:
                    self._after_snapshot(reader.snapshot_lsn)
                progress = _Progress(started, estimate, reader.snapshot_lsn, self._metrics)
                for table in tables:
                    self._copy_table(reader, table, client, progress)
            sweep_started = time.monotonic()
            if self._cancel.is_set():
                raise WarmCancelled("warm cancelled")
            if not sweep:
                log.info("sweep skipped: the namespaces were empty when the warm started %s", fields(namespaces=",".join(namespaces)))
                return progress.rows, progress.written, 0, 0.0
            swept = sweep_blocking(client, self.keyspace, namespaces, warm_version(progress.snapshot_lsn))
            return progress.rows, progress.written, swept, time.monotonic() - sweep_started
        except BaseException as exc:
            loop.call_soon_threadsafe(_fail, self.snapshot_ready, exc)
            raise
        finally:
            client.close()

    def _copy_table(self, reader: SnapshotReader, table: TableInfo, client: redis.Redis, progress: _Progress) -> None:
        namespace = self.keyspace.namespace(table.schema, table.name)
        version = warm_version(reader.snapshot_lsn).pack()
        key_prefix = self.keyspace.value_key(namespace, "").encode()
        for results in write_batches(client, reader.batches(table, key_prefix, BATCH_ROWS), version, lambda: self._floor(namespace)):
            progress.add(len(results), sum(1 for result in results if result == APPLIED))
            if self._cancel.is_set():
                raise WarmCancelled("warm cancelled")
            if self._delay_s:
                time.sleep(self._delay_s)

    def _floor(self, namespace: str) -> str:
        # The consumer may raise a floor (TRUNCATE) while the warm runs; dict reads are atomic.
        floor = self._floors.get(namespace)
        return floor.pack() if floor is not None else ""


def write_batches(client: redis.Redis, batches: Iterable[list[tuple[bytes, bytes]]], version: str, floor: Callable[[], str]) -> Iterator[list[int]]:
    """Write batches of (value key, row JSON) through `apply_write` at `version`; yield each batch's results.

    One batch is in flight while the next is read and encoded, and `floor` is read again for
    every batch because the consumer may raise a namespace's floor (TRUNCATE) during the warm.
    A yielded list can hold the results of more than one batch, or none.
    """
    packed_version = version.encode()
    with WarmWriteStream(client) as stream:
        for batch in batches:
            yield stream.send(batch, packed_version, floor().encode())
            # Give the event loop's thread the GIL between batches (the consumer runs there).
            time.sleep(0)
        yield stream.finish()


class _Progress:
    """Row counts of one warm, logged every PROGRESS_INTERVAL_S."""

    def __init__(self, started: float, estimate: int, snapshot_lsn: Lsn, metrics: CacheMetrics) -> None:
        self.rows = self.written = 0
        self._started = started
        self._last_log = started
        self._estimate = estimate
        self.snapshot_lsn = snapshot_lsn
        self._metrics = metrics

    def add(self, rows: int, written: int) -> None:
        self.rows += rows
        self.written += written
        self._metrics.warm_rows.set(self.rows)
        now = time.monotonic()
        if now - self._last_log < PROGRESS_INTERVAL_S:
            return
        self._last_log = now
        elapsed = now - self._started
        rate = self.rows / elapsed if elapsed else 0.0
        left = max(self._estimate - self.rows, 0) / rate if rate else 0.0
        self._metrics.warm_rows_per_second.set(rate)
        log.info(
            "warm progress %s",
            fields(snapshot_lsn=self.snapshot_lsn, rows=self.rows, estimated_rows=self._estimate, rows_per_s=f"{rate:.0f}", estimated_s_left=f"{left:.0f}"),
        )


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
