"""The cache daemon: warm when continuity is in doubt, otherwise apply the stream.

One session has a Redis client and a NATS connection. It first decides whether the cache can
resume (meta hash present and ready, same stream, no discarded messages, consumer present);
otherwise it warms. A warm re-creates the durable consumer at L0 + 1 (L0 = the stream's last
sequence read before the snapshot) and consumes while the warm writes, because changes after
the snapshot point must not wait for a long warm. Any dependency failure ends the session, and
a new one starts after a jittered backoff; a stop event ends the current batch and the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.js import JetStreamContext

from ssmd.bus.connect import NatsAuth, connect_nats
from ssmd.bus.consumer import ConsumerSettings, PullConsumer, read_consumer_position, recreate_consumer
from ssmd.bus.stream import StreamState, read_stream_state
from ssmd.cache.apply import Applier, BeforeApplyHook, RewarmNeeded
from ssmd.cache.continuity import SequenceTracker, format_created, rewarm_reason, stream_gap_reason
from ssmd.cache.metrics import CacheMetrics
from ssmd.cache.warm import AfterSnapshotHook, Warmer, WarmResult
from ssmd.core.errors import DependencyError
from ssmd.core.keys import KeySpace
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position
from ssmd.core.tables import TableInfo
from ssmd.logs import fields
from ssmd.observe import Readiness, start_health_server
from ssmd.pg.catalog import check_readable, load_tables
from ssmd.pg.checks import check_replication_privilege, check_wal_level
from ssmd.pg.connect import connect
from ssmd.store.cache_store import CacheStore, connect_redis, ping

log = logging.getLogger(__name__)

BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 30.0


@dataclass
class CacheSettings:
    database_url: str
    nats_url: str
    redis_url: str
    tables: list[str]
    stream: str
    consumer: str
    namespaces: dict[str, str] = field(default_factory=dict)
    nats_auth: NatsAuth = field(default_factory=NatsAuth)
    metrics_port: int = 0
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    fetch_batch: int = 500
    fetch_timeout_s: float = 1.0
    check_interval_s: float = 5.0
    warm_delay_ms: int = 0
    stream_wait_s: float = 2.0


@dataclass
class CacheHooks:
    """Test hooks: run after the warm snapshot is taken, and before each change is applied."""

    after_snapshot: AfterSnapshotHook | None = None
    before_apply: BeforeApplyHook | None = None


class CacheDaemon:
    def __init__(
        self,
        settings: CacheSettings,
        *,
        metrics: CacheMetrics | None = None,
        hooks: CacheHooks | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or CacheMetrics()
        self.hooks = hooks or CacheHooks()
        self.readiness = Readiness()
        self.warms_done = 0
        self.warms_started = 0
        self.last_warm: WarmResult | None = None
        self._rng = rng or random.Random()
        self._clock = clock
        self._keyspace = KeySpace(namespaces=settings.namespaces)
        self._connected_once = False
        self._consumer_settings = ConsumerSettings(settings.stream, settings.consumer, settings.ack_wait_s, settings.max_deliver)

    async def run(self, stop: asyncio.Event) -> None:
        """Run sessions until `stop` is set, restarting after failures with jittered backoff."""
        health = start_health_server(self.settings.metrics_port, self.metrics.registry, self.readiness)
        backoff = BACKOFF_START_S
        try:
            while not stop.is_set():
                started = self._clock()
                try:
                    await self._session(stop)
                except DependencyError as exc:
                    if not self._connected_once:
                        # At start-up an unreachable server is most often a wrong URL: exit
                        # with one error line and leave restarts to the service manager.
                        raise
                    self.readiness.set_not_ready(f"dependency failed: {exc}")
                    if self._clock() - started > BACKOFF_MAX_S:
                        backoff = BACKOFF_START_S
                    delay = backoff * (0.5 + self._rng.random())
                    log.warning("cache session failed, retrying %s", fields(delay_s=f"{delay:.1f}", error=exc))
                    await _sleep_or_stop(stop, delay)
                    backoff = min(backoff * 2, BACKOFF_MAX_S)
        finally:
            if health is not None:
                health.stop()
        log.info("cache daemon stopped")

    async def _session(self, stop: asyncio.Event) -> None:
        tables = await asyncio.to_thread(self._load_tables)
        client = connect_redis(self.settings.redis_url, name="ssmd-cache")
        nc: Client | None = None
        try:
            await ping(client, self.settings.redis_url)
            store = CacheStore(client, self._keyspace)
            await store.scripts.load()
            nc = await connect_nats(self.settings.nats_url, name="ssmd-cache", auth=self.settings.nats_auth)
            self._connected_once = True
            js = nc.jetstream()
            await self._follow(stop, store, js, tables)
        finally:
            if nc is not None:
                await _close_nats(nc)
            await client.aclose()

    async def _follow(self, stop: asyncio.Event, store: CacheStore, js: JetStreamContext, tables: list[TableInfo]) -> None:
        meta = await store.read_meta()
        stream = await read_stream_state(js, self.settings.stream)
        position = await read_consumer_position(js, self._consumer_settings)
        reason = rewarm_reason(meta, stream, position is not None)
        while not stop.is_set():
            try:
                if reason is not None:
                    await self._warm_and_consume(stop, store, js, tables, reason)
                else:
                    applier = self._resume(store, tables, meta, position)
                    log.info("resuming from the stream %s", fields(snapshot_lsn=applier.snapshot_lsn, stream_seq=applier.tracker.contiguous))
                    self.readiness.set_ready()
                    await self._consume(stop, store, js, applier)
                return
            except RewarmNeeded as exc:
                reason = exc.reason

    def _load_tables(self) -> list[TableInfo]:
        with connect(self.settings.database_url, application_name="ssmd-cache") as conn:
            # The warm's exported snapshot needs logical decoding (wal_level, REPLICATION).
            check_wal_level(conn)
            check_replication_privilege(conn)
            tables = load_tables(conn, self.settings.tables)
            check_readable(conn, tables)
            return tables

    def _resume(self, store: CacheStore, tables: list[TableInfo], meta: dict[str, str], position) -> Applier:
        contiguous = max(int(meta.get("stream_seq", "0")), position.ack_floor_stream_seq)
        tracker = SequenceTracker(contiguous=contiguous, last_first_delivery=max(position.delivered_stream_seq, contiguous))
        if meta.get("applied_lsn"):
            tracker.applied_lsn = Lsn.parse(meta["applied_lsn"])
        return self._applier(store, tables, Lsn.parse(meta["snapshot_lsn"]), read_floors(meta), tracker)

    def _applier(self, store, tables, snapshot_lsn: Lsn, floors: dict[str, Position], tracker: SequenceTracker) -> Applier:
        return Applier(
            store=store,
            tables={(table.schema, table.name): table for table in tables},
            snapshot_lsn=snapshot_lsn,
            floors=floors,
            tracker=tracker,
            metrics=self.metrics,
            max_deliver=self.settings.max_deliver,
            before_apply=self.hooks.before_apply,
        )

    async def _warm_and_consume(self, stop, store: CacheStore, js: JetStreamContext, tables: list[TableInfo], reason: str) -> None:
        log.warning("warming the cache %s", fields(reason=repr(reason)))
        self.metrics.warms.inc()
        self.readiness.set_not_ready(f"warming: {reason}")
        await store.write_meta({"state": "warming", "warm_rows": 0})

        stream = await self._wait_for_stream(stop, js)
        if stream is None:
            return
        await recreate_consumer(js, self._consumer_settings, stream.last_seq + 1)
        meta = await store.read_meta()
        floors = read_floors(meta)
        warmer = Warmer(
            self.settings.database_url, self.settings.redis_url, store, self.settings.tables, floors, self.metrics,
            delay_ms=self.settings.warm_delay_ms, after_snapshot=self.hooks.after_snapshot,
            skip_sweep_when_empty=self.warms_started == 0,
        )
        self.warms_started += 1
        warm_task = asyncio.create_task(warmer.run())
        consume_task: asyncio.Task | None = None
        try:
            await _first_of(asyncio.wait([warmer.snapshot_ready]), warm_task)
            snapshot_lsn, _, _ = warmer.snapshot_ready.result()
            await store.write_meta({"stream_seq": stream.last_seq, "stream_created": format_created(stream.created)})
            tracker = SequenceTracker(contiguous=stream.last_seq, last_first_delivery=stream.last_seq)
            applier = self._applier(store, tables, snapshot_lsn, floors, tracker)
            consume_task = asyncio.create_task(self._consume(stop, store, js, applier, check_meta=False))

            await _first_of(warm_task, consume_task)
            if warm_task.done() and not warm_task.cancelled():
                result = warm_task.result()
                await store.write_meta({"state": "ready", "snapshot_lsn": str(result.snapshot_lsn), "warm_rows": result.rows})
                self.warms_done += 1
                self.last_warm = result
                self.readiness.set_ready()
                log.info("cache ready %s", fields(snapshot_lsn=result.snapshot_lsn, rows=result.rows, swept=result.swept))
                applier.check_meta = True
            await consume_task
        finally:
            for task in (warm_task, consume_task):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    async def _wait_for_stream(self, stop: asyncio.Event, js: JetStreamContext) -> StreamState | None:
        while not stop.is_set():
            stream = await read_stream_state(js, self.settings.stream)
            if stream is not None:
                return stream
            log.warning("stream not found, waiting for ssmd cdc to create it %s", fields(stream=self.settings.stream))
            await _sleep_or_stop(stop, self.settings.stream_wait_s)
        return None

    async def _consume(self, stop: asyncio.Event, store: CacheStore, js: JetStreamContext, applier: Applier, *, check_meta: bool = True) -> None:
        applier.check_meta = check_meta
        consumer = PullConsumer(js, self._consumer_settings)
        await consumer.open()
        last_check = self._clock()
        try:
            while not stop.is_set():
                msgs = await consumer.fetch(self.settings.fetch_batch, self.settings.fetch_timeout_s)
                if msgs:
                    await applier.apply_batch(msgs)
                if self._clock() - last_check >= self.settings.check_interval_s:
                    last_check = self._clock()
                    await self._check_continuity(store, js, applier)
        finally:
            await consumer.close()

    async def _check_continuity(self, store: CacheStore, js: JetStreamContext, applier: Applier) -> None:
        stream = await read_stream_state(js, self.settings.stream)
        if stream is None:
            raise RewarmNeeded("stream missing")
        meta = await store.read_meta()
        if applier.check_meta and meta.get("state") != "ready":
            raise RewarmNeeded("meta hash missing or not ready (Redis lost its data?)")
        if meta.get("stream_created") and meta["stream_created"] != format_created(stream.created):
            raise RewarmNeeded(f"stream recreated at {format_created(stream.created)}")
        position = await read_consumer_position(js, self._consumer_settings)
        if position is not None:
            applier.tracker.acknowledged_through(position.ack_floor_stream_seq)
        gap = stream_gap_reason(applier.tracker.contiguous, stream)
        if gap is not None:
            raise RewarmNeeded(gap)


def read_floors(meta: dict[str, str]) -> dict[str, Position]:
    return {name[len("floor:") :]: Position.unpack(value) for name, value in meta.items() if name.startswith("floor:")}


async def _first_of(*awaitables) -> None:
    """Wait until one finishes; re-raise its error, if any."""
    tasks = [asyncio.ensure_future(item) for item in awaitables]
    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except asyncio.TimeoutError:
        pass


async def _close_nats(nc: Client) -> None:
    try:
        await nc.close()
    except Exception as exc:  # closing a broken connection must not hide the session's error
        log.debug("closing NATS connection failed: %s", exc)
