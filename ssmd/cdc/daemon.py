"""The publisher daemon: wal2json rows from the slot to JetStream, confirming only what is stored.

One session is: start-up checks, the stream, the slot (created when missing), then a loop that
reads wal2json rows, decodes them, completes TOAST-omitted and NaN-ambiguous columns, publishes
one message per change and confirms the slot through the AckTracker. Any dependency failure ends
the session, and the daemon reconnects after a jittered backoff. PostgreSQL then resends
everything after the confirmed position, and JetStream drops the repeats by message id.

Rules the loop keeps:
- the slot is confirmed to a transaction's `nextlsn` only when every message of it and of all
  earlier transactions has its PubAck (`AckTracker`), and to a keepalive's WAL end only when
  nothing is in flight;
- memory is bounded by the publisher's window plus one batch of changes awaiting a re-read, so
  a transaction of any size streams through without being held whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
import psycopg

from ssmd.bus.connect import NatsAuth, connect_nats
from ssmd.bus.publisher import Publisher, PublishSettings, backoff_delay
from ssmd.bus.stream import StreamLimits, ensure_stream
from ssmd.cdc.marks import slot_created_content
from ssmd.cdc.pipeline import ChangePipeline, SlotAnnouncement
from ssmd.config import redact_url
from ssmd.core.confirm import AckTracker
from ssmd.core.envelope import SLOT_CREATED_SUBJECT, encode_slot_created
from ssmd.core.errors import DependencyError, SsmdError
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position
from ssmd.logs import fields
from ssmd.observe import CdcMetrics, Readiness, start_health_server
from ssmd.pg.checks import SlotInUseError, read_slot, run_startup_checks
from ssmd.pg.connect import connect, connect_async
from ssmd.pg.replication import MESSAGE_PREFIX, ReplicationStream, SlotPoller, create_announced_slot

log = logging.getLogger(__name__)

# Test-only fault hooks, read from the environment; never set them in production.
# SSMD_FAULT_EXIT_AFTER_ACKS=N makes the process send itself SIGKILL right after the N-th PubAck
# of a change or mark (the slot announcement is not counted): a real crash between
# acknowledgements, at a point no outside timing can hit. SSMD_FAULT_DROP_ACKS=N treats the first
# N PubAcks as lost, so those publishes are retried with the same message id.
# SSMD_FAULT_EXIT_AT=slot-staged kills the process the same way after the announcement is
# written but before the slot exists; slot-created kills it after the slot is created, before
# anything is published.
FAULT_EXIT_AFTER_ACKS = "SSMD_FAULT_EXIT_AFTER_ACKS"
FAULT_DROP_ACKS = "SSMD_FAULT_DROP_ACKS"
FAULT_EXIT_AT = "SSMD_FAULT_EXIT_AT"
FAULT_EXIT_CODE = -signal.SIGKILL  # the return code subprocess reports for a SIGKILLed child
CONFIRM_MIN_INTERVAL_S = 0.1


@dataclass(frozen=True)
class CdcSettings:
    database_url: str
    nats_url: str
    slot: str
    tables: list[str]
    stream: str
    nats_auth: NatsAuth = NatsAuth()
    limits: StreamLimits = StreamLimits()
    publish: PublishSettings = PublishSettings()
    poll: bool = False
    poll_interval_s: float = 0.5
    heartbeat_s: float = 0.0
    status_interval_s: float = 10.0
    batch_size: int = 500
    metrics_port: int = 0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    shutdown_timeout_s: float = 10.0  # max wait for outstanding PubAcks at shutdown
    stop_grace_s: float = 2.0  # max wait for the read loop to notice a stop signal


@dataclass
class _Session:
    """Connections and state of one session, closed in reverse order of opening."""

    conn: psycopg.Connection | None = None
    nats: object | None = None
    resolve_conn: psycopg.AsyncConnection | None = None
    reader: ReplicationStream | SlotPoller | None = None
    publisher: Publisher | None = None
    tracker: AckTracker = field(default_factory=AckTracker)


class CdcDaemon:
    def __init__(self, settings: CdcSettings, *, rng: random.Random | None = None, metrics: CdcMetrics | None = None) -> None:
        self.settings = settings
        self.rng = rng or random.Random()
        self.metrics = metrics or CdcMetrics()
        self.readiness = Readiness()
        self.stop = asyncio.Event()
        self._acks = 0
        self._last_confirm_at = 0.0
        self._started = False  # True once a session streamed: a held slot is then our own old walsender
        self._exit_after_acks = int(os.environ.get(FAULT_EXIT_AFTER_ACKS, "0") or 0)
        self._drop_acks = int(os.environ.get(FAULT_DROP_ACKS, "0") or 0)
        self._exit_at = os.environ.get(FAULT_EXIT_AT, "")

    async def run(self) -> int:
        """Run sessions until a stop signal; raise ConfigError for problems a restart cannot fix."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        server = start_health_server(self.settings.metrics_port, self.metrics.registry, self.readiness)
        log.info("ssmd cdc starting %s", fields(
            slot=self.settings.slot, stream=self.settings.stream, tables=",".join(self.settings.tables),
            database=redact_url(self.settings.database_url), nats=redact_url(self.settings.nats_url),
            mode="poll" if self.settings.poll else "stream"))
        try:
            await self._run_sessions()
        finally:
            if server is not None:
                server.stop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        log.info("ssmd cdc stopped slot=%s", self.settings.slot)
        return 0

    def _on_signal(self, signum: int) -> None:
        log.info("received %s, stopping after confirming what is acknowledged", signal.Signals(signum).name)
        self.stop.set()

    async def _run_sessions(self) -> None:
        failures = 0
        while not self.stop.is_set():
            session = _Session()
            try:
                await self._run_until_stopped(self._session(session))
                failures = 0
            except SlotInUseError as exc:
                if not self._started:
                    raise
                failures += 1
                delay = backoff_delay(failures, self.rng, self.settings.reconnect_initial_s, self.settings.reconnect_max_s)
                self.metrics.reconnects.inc()
                log.warning("slot still in use after a lost connection, retrying %s error=%s", fields(attempt=failures, delay_s=f"{delay:.2f}"), exc)
                await self._close(session, graceful=False)
                await self._sleep(delay)
                continue
            except (DependencyError, psycopg.OperationalError, nats.errors.Error, OSError, TimeoutError) as exc:
                if not self._started:
                    # At start-up an unreachable server is most often a wrong URL: exit with
                    # one error line and leave restarts to the service manager.
                    await self._close(session, graceful=False)
                    raise as_dependency_error(exc) from exc
                failures += 1
                self.readiness.set_not_ready(f"reconnecting: {exc}")
                self.metrics.reconnects.inc()
                delay = backoff_delay(failures, self.rng, self.settings.reconnect_initial_s, self.settings.reconnect_max_s)
                log.warning("session failed, reconnecting %s error=%s", fields(attempt=failures, delay_s=f"{delay:.2f}"), exc)
                await self._close(session, graceful=False)
                await self._sleep(delay)
                continue
            except Exception:
                # A ConfigError, bad input or a bug: no retry can help, so the daemon exits
                # without confirming anything new.
                await self._close(session, graceful=False)
                raise
            await self._close(session, graceful=True)

    async def _run_until_stopped(self, work) -> None:
        """Run `work` until it ends or, after a stop signal, until the stop grace period ends.

        The loop checks the stop event between reads, but it can be blocked longer, e.g. waiting
        for room in the publish window while NATS is down; it is cancelled then, and the caller
        still confirms what was acknowledged.
        """
        task = asyncio.create_task(work)
        stopped = asyncio.create_task(self.stop.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                done, _ = await asyncio.wait({task}, timeout=self.settings.stop_grace_s)
                if not done:
                    log.warning("session did not stop within %s s, cancelling it", self.settings.stop_grace_s)
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    return
            task.result()
        finally:
            stopped.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _session(self, session: _Session) -> None:
        settings = self.settings
        session.conn = connect(settings.database_url, application_name="ssmd-cdc")
        tables, slot_state = run_startup_checks(session.conn, settings.slot, settings.tables)

        session.nats = await connect_nats(settings.nats_url, name="ssmd-cdc", auth=settings.nats_auth)
        js = session.nats.jetstream()
        await ensure_stream(js, settings.stream, settings.limits)
        confirmed = await self._ensure_slot(session, js, slot_state)

        session.resolve_conn = await connect_async(settings.database_url, application_name="ssmd-cdc-resolve")
        session.publisher = Publisher(
            session.nats, settings.stream, lambda token: self._on_ack(session.tracker, token), self.metrics,
            settings=settings.publish, rng=self.rng, drop_first_acks=self._drop_acks,
        )
        pipeline = ChangePipeline(
            tables, session.resolve_conn, session.publisher, session.tracker, self.metrics, settings.batch_size, slot=settings.slot,
        )
        if settings.poll:
            await self._poll(session, tables, pipeline)
        else:
            await self._stream(session, tables, pipeline, confirmed)

    async def _ensure_slot(self, session: _Session, js, slot_state) -> Lsn:
        """Create the slot when missing; return the slot's confirmed position.

        A new slot announces itself through its own stream (see `create_announced_slot`): the
        pipeline turns that logical message into `cdc._ssmd.slot_created`, and the slot is not
        confirmed past it before its PubAck, so a crash at any point replays it.
        """
        slot = self.settings.slot
        if slot_state is None:
            point = create_announced_slot(
                session.conn, slot, lambda point: slot_created_content(slot, point), before_copy=lambda: self._fault_exit_at("slot-staged"),
            )
            log.info("created replication slot %s", fields(slot=slot, plugin="wal2json", consistent_point=point))
            self._fault_exit_at("slot-created")
            return point
        if not await self._slot_announced(js):
            # The stream contains no announcement of this slot, e.g. it was recreated. The
            # confirmed position is later than the consistent point, which is the safe side:
            # a cache whose snapshot lies below it re-warms.
            await self._announce_slot(js, slot_state.confirmed_flush)
        return slot_state.confirmed_flush

    def _fault_exit_at(self, stage: str) -> None:
        if self._exit_at == stage:
            log.error("killing the process at %s because %s is set (test-only fault hook)", stage, FAULT_EXIT_AT)
            _kill_self()

    async def _slot_announced(self, js) -> bool:
        try:
            message = await js.get_last_msg(self.settings.stream, SLOT_CREATED_SUBJECT)
        except nats.js.errors.NotFoundError:
            return False
        return b'"slot":"' + self.settings.slot.encode() + b'"' in (message.data or b"")

    async def _announce_slot(self, js, point: Lsn) -> None:
        message = encode_slot_created(self.settings.slot, point)
        await js.publish(message.subject, message.body, stream=self.settings.stream, headers={"Nats-Msg-Id": message.msg_id})
        log.info("published %s", fields(subject=message.subject, slot=self.settings.slot, consistent_point=point))

    async def _stream(self, session: _Session, tables, pipeline: ChangePipeline, confirmed: Lsn) -> None:
        reader = ReplicationStream(self.settings.database_url, self.settings.slot, tables)
        session.reader = reader
        reader.start(Lsn(0), confirmed=confirmed)
        self._started = True
        self.metrics.confirmed_lsn.set(confirmed.value)
        self.readiness.set_ready()

        status_task = asyncio.create_task(self._keep_status(session, reader))
        last_data = time.monotonic()
        try:
            while not self.stop.is_set():
                batch = await reader.read(timeout=0.5)
                self.metrics.bytes_read.inc(batch.bytes)
                await pipeline.feed_rows(batch.rows)
                if batch.rows:
                    last_data = time.monotonic()
                    await pipeline.flush()
                self._confirm(reader, session.tracker, batch.wal_end)
                if status_task.done():
                    status_task.result()
                if self.settings.heartbeat_s and time.monotonic() - last_data >= self.settings.heartbeat_s:
                    self._emit_heartbeat(session)
                    last_data = time.monotonic()
        finally:
            status_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await status_task

    def _confirm(self, reader: ReplicationStream, tracker: AckTracker, wal_end: Lsn | None) -> None:
        # A status update after every read cost one message per ~16 changes under load. A
        # position a few milliseconds old is just as safe to confirm, so updates are spaced out.
        now = time.monotonic()
        if now - self._last_confirm_at < CONFIRM_MIN_INTERVAL_S:
            return
        self._last_confirm_at = now
        position = tracker.confirmable()
        if wal_end is not None and tracker.in_flight() == 0:
            idle = tracker.idle_confirmable(wal_end)
            if idle is not None and (position is None or idle > position):
                position = idle
        if position is not None and reader.confirm(position):
            self.metrics.confirmed_lsn.set(position.value)
            log.debug("confirmed slot=%s lsn=%s", self.settings.slot, position)

    async def _keep_status(self, session: _Session, reader: ReplicationStream) -> None:
        """Send a status update every interval, also while publishing blocks the reader, and measure lag."""
        while True:
            await asyncio.sleep(self.settings.status_interval_s)
            position = session.tracker.confirmable()
            reader.confirm(position or reader.confirmed or Lsn(0), force=True)
            if reader.confirmed is not None:
                self.metrics.confirmed_lsn.set(reader.confirmed.value)
            self._measure_lag(session)

    def _measure_lag(self, session: _Session) -> None:
        row = session.conn.execute(
            "SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s",
            (self.settings.slot,),
        ).fetchone()
        if row is not None and row[0] is not None:
            self.metrics.slot_lag_bytes.set(float(row[0]))

    def _emit_heartbeat(self, session: _Session) -> None:
        # A transactional message gets a commit record, so the slot moves even when the followed
        # tables are idle. The mark reaches the stream like any change.
        session.conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", (MESSAGE_PREFIX, "heartbeat"))
        log.debug("emitted heartbeat slot=%s", self.settings.slot)

    async def _poll(self, session: _Session, tables, pipeline: ChangePipeline) -> None:
        poller = SlotPoller(self.settings.database_url, self.settings.slot, tables)
        session.reader = poller
        poller.open()
        self._started = True
        self.readiness.set_ready()
        advanced: Lsn | None = None
        last_data = time.monotonic()
        while not self.stop.is_set():
            pipeline.reset()
            rows_read = 0
            for rows in poller.peek():
                await pipeline.feed_rows(rows)
                rows_read += len(rows)
                self.metrics.bytes_read.inc(sum(len(row) for row in rows))
            await pipeline.flush()
            await session.publisher.drain()

            position = session.tracker.confirmable()
            if position is not None and (advanced is None or position > advanced):
                poller.advance(position)
                advanced = position
                self.metrics.confirmed_lsn.set(position.value)
            if rows_read:
                last_data = time.monotonic()
                continue
            if self.settings.heartbeat_s and time.monotonic() - last_data >= self.settings.heartbeat_s:
                self._emit_heartbeat(session)
                last_data = time.monotonic()
            self._measure_lag(session)
            await self._sleep(self.settings.poll_interval_s)

    def _on_ack(self, tracker: AckTracker, token: object) -> None:
        if isinstance(token, SlotAnnouncement):
            tracker.acked(token.position)
            log.info("published %s", fields(subject=SLOT_CREATED_SUBJECT, slot=self.settings.slot, lsn=token.position.commit_lsn))
            return
        if isinstance(token, Position):
            tracker.acked(token)
        self._acks += 1
        if self._exit_after_acks and self._acks >= self._exit_after_acks:
            log.error("killing the process after %s PubAcks because %s is set (test-only fault hook)", self._acks, FAULT_EXIT_AFTER_ACKS)
            _kill_self()

    async def _close(self, session: _Session, *, graceful: bool) -> None:
        """Close in reverse order; when graceful, wait for PubAcks and confirm them first."""
        self.readiness.set_not_ready("stopping" if graceful else "reconnecting")
        if session.publisher is not None:
            if graceful:
                try:
                    if not await session.publisher.drain(self.settings.shutdown_timeout_s):
                        log.warning("%s message(s) still without PubAck after %s s; they are sent again after restart",
                                    session.publisher.in_flight, self.settings.shutdown_timeout_s)
                except SsmdError as exc:
                    log.warning("messages left unacknowledged at shutdown; they are sent again after restart error=%s", exc)
            await session.publisher.cancel()
        if graceful and isinstance(session.reader, ReplicationStream):
            position = session.tracker.confirmable()
            try:
                if position is not None and session.reader.confirm(position):
                    log.info("final confirmation slot=%s lsn=%s", self.settings.slot, position)
            except DependencyError as exc:
                log.warning("final confirmation failed slot=%s error=%s", self.settings.slot, exc)
        if session.reader is not None:
            session.reader.close()
        if session.resolve_conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await session.resolve_conn.close()
        if session.nats is not None:
            with contextlib.suppress(nats.errors.Error, OSError, asyncio.TimeoutError):
                await asyncio.wait_for(session.nats.close(), 5)
        if session.conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                session.conn.close()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)


def read_slot_position(dsn: str, slot: str) -> Lsn | None:
    """Return the slot's confirmed flush position (for tests and `ssmd status`)."""
    with connect(dsn) as conn:
        state = read_slot(conn, slot)
    return state.confirmed_flush if state else None


def as_dependency_error(exc: BaseException) -> DependencyError:
    """Return `exc` as a DependencyError whose message is one line."""
    if isinstance(exc, DependencyError):
        return exc
    text = " ".join(str(exc).split()) or type(exc).__name__
    return DependencyError(f"start-up failed: {text}")


def _kill_self() -> None:
    """Flush the log, then SIGKILL this process: no cleanup, no further PubAck or confirmation."""
    logging.shutdown()
    os.kill(os.getpid(), signal.SIGKILL)
