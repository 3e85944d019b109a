"""Warm: copy every followed table from an exported snapshot into Redis at version (S, 0).

A worker thread reads the snapshot (`ssmd.pg.snapshot`) and encodes rows; the event loop writes
them in pipelined batches through the versioned write script, so a change the consumer already
applied (version above (S, 0)) is never overwritten by the older snapshot row, and a tombstone
left by a delete stops the snapshot row from coming back. The consumer runs at the same time.
After the last row, a sweep removes every entry of the followed namespaces older than (S, 0):
rows deleted while the cache was down, and tombstones no longer needed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ssmd.cache.metrics import CacheMetrics
from ssmd.core.keys import KeySpace
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position, warm_version
from ssmd.core.tables import TableInfo
from ssmd.logs import fields
from ssmd.pg.snapshot import SnapshotReader
from ssmd.store.cache_store import CacheStore
from ssmd.store.scripts import APPLIED, Script, ScriptCall

log = logging.getLogger(__name__)

BATCH_ROWS = 1000
QUEUE_BATCHES = 4
PROGRESS_INTERVAL_S = 5.0

AfterSnapshotHook = Callable[[Lsn], None]


@dataclass
class WarmResult:
    snapshot_lsn: Lsn
    rows: int
    written: int
    swept: int
    seconds: float


@dataclass
class _Batch:
    namespace: str
    rows: list[tuple[str, bytes]]


class _Done:
    pass


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Warmer:
    """One warm: snapshot, pipelined versioned writes, then the sweep."""

    def __init__(
        self,
        dsn: str,
        store: CacheStore,
        table_names: list[str],
        floors: Mapping[str, Position],
        metrics: CacheMetrics,
        *,
        delay_ms: int = 0,
        after_snapshot: AfterSnapshotHook | None = None,
    ) -> None:
        self._dsn = dsn
        self._store = store
        self._table_names = table_names
        self._floors = floors
        self._metrics = metrics
        self._delay_s = delay_ms / 1000
        self._after_snapshot = after_snapshot
        self._cancel = threading.Event()
        self.snapshot_ready: asyncio.Future[tuple[Lsn, list[TableInfo], int]] | None = None  # (S, tables, row estimate)

    @property
    def keyspace(self) -> KeySpace:
        return self._store.keyspace

    async def run(self) -> WarmResult:
        """Warm every followed table; `snapshot_ready` resolves with S as soon as it is known."""
        loop = asyncio.get_running_loop()
        self.snapshot_ready = loop.create_future()
        queue: asyncio.Queue = asyncio.Queue(QUEUE_BATCHES)
        started = time.monotonic()
        reader = asyncio.create_task(asyncio.to_thread(self._read, loop, queue))
        try:
            written, rows = await self._write(queue, started)
        finally:
            self._cancel.set()
            await asyncio.gather(reader, return_exceptions=True)
        snapshot_lsn, _, _ = self.snapshot_ready.result()

        swept = 0
        for table in self._table_names_resolved:
            namespace = self.keyspace.namespace(table.schema, table.name)
            swept += await self._store.sweep(namespace, warm_version(snapshot_lsn))
        seconds = time.monotonic() - started
        self._metrics.warm_swept.set(swept)
        log.info("warm finished %s", fields(snapshot_lsn=snapshot_lsn, rows=rows, written=written, swept=swept, seconds=f"{seconds:.1f}", rows_per_s=f"{rows / seconds if seconds else 0:.0f}"))
        return WarmResult(snapshot_lsn, rows, written, swept, seconds)

    def _read(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        # Runs in a worker thread; hands batches to the loop with back-pressure.
        def put(item) -> None:
            while not self._cancel.is_set():
                future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
                try:
                    future.result(timeout=1.0)
                    return
                except TimeoutError:
                    future.cancel()

        try:
            with SnapshotReader(self._dsn) as reader:
                tables = [reader.table_info(name) for name in self._table_names]
                estimate = sum(reader.estimate_rows(table) for table in tables)
                loop.call_soon_threadsafe(_resolve, self.snapshot_ready, (reader.snapshot_lsn, tables, estimate))
                if self._after_snapshot is not None:
                    self._after_snapshot(reader.snapshot_lsn)
                for table in tables:
                    namespace = self.keyspace.namespace(table.schema, table.name)
                    batch: list[tuple[str, bytes]] = []
                    for row in reader.rows(table):
                        batch.append((row.key, row.value))
                        if len(batch) >= BATCH_ROWS:
                            put(_Batch(namespace, batch))
                            batch = []
                        if self._cancel.is_set():
                            return
                    if batch:
                        put(_Batch(namespace, batch))
            put(_Done())
        except BaseException as exc:
            loop.call_soon_threadsafe(_fail, self.snapshot_ready, exc)
            put(_Failed(exc))

    async def _write(self, queue: asyncio.Queue, started: float) -> tuple[int, int]:
        rows = written = 0
        last_log = started
        while True:
            item = await queue.get()
            if isinstance(item, _Done):
                return written, rows
            if isinstance(item, _Failed):
                raise item.error
            snapshot_lsn, _, estimate = self.snapshot_ready.result()
            version = warm_version(snapshot_lsn).pack()
            floor = self._floors.get(item.namespace)
            floor_text = floor.pack() if floor else ""
            calls = [
                ScriptCall(Script.APPLY_WRITE, (value_key, self.keyspace.version_key_of(value_key)), (version, value, floor_text))
                for value_key, value in ((self.keyspace.value_key(item.namespace, key), value) for key, value in item.rows)
            ]
            results = await self._store.scripts.run(calls)
            rows += len(calls)
            written += sum(1 for result in results if result == APPLIED)
            self._metrics.warm_rows.set(rows)

            now = time.monotonic()
            if now - last_log >= PROGRESS_INTERVAL_S:
                last_log = now
                await self._report(rows, estimate, now - started, snapshot_lsn)
            if self._delay_s:
                await asyncio.sleep(self._delay_s)

    async def _report(self, rows: int, estimate: int, elapsed: float, snapshot_lsn: Lsn) -> None:
        rate = rows / elapsed if elapsed else 0.0
        left = max(estimate - rows, 0) / rate if rate else 0.0
        self._metrics.warm_rows_per_second.set(rate)
        await self._store.write_meta({"warm_rows": rows})
        log.info("warm progress %s", fields(snapshot_lsn=snapshot_lsn, rows=rows, estimated_rows=estimate, rows_per_s=f"{rate:.0f}", estimated_s_left=f"{left:.0f}"))

    @property
    def _table_names_resolved(self) -> list[TableInfo]:
        return self.snapshot_ready.result()[1]


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
