"""Reading wal2json format-version 2 output from a logical replication slot.

Two readers yield the same thing, wal2json rows as bytes, and confirm the slot the same way:

- `ReplicationStream` uses the streaming replication protocol (`START_REPLICATION ... LOGICAL`)
  on a `replication=database` connection, through psycopg 3.3's low-level `pgconn`
  (`get_copy_data`, `put_copy_data`). It waits on the socket with `loop.add_reader`, so the
  reader runs in the daemon's event loop next to the NATS client and needs no thread. Decoding
  and publishing are CPU work under the GIL anyway. With one loop, the slot position, the
  AckTracker and the publisher are only ever touched from one thread.
- `SlotPoller` (`--poll`) peeks with `pg_logical_slot_peek_changes` through a server-side cursor
  and moves the slot with `pg_replication_slot_advance`.

Replication connections reject bind parameters (they speak only the simple query protocol), so
every literal in a replication command is quoted here, and names are validated first.
"""

from __future__ import annotations

import asyncio
import logging
import re
import select
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psycopg
from psycopg import pq

from ssmd.core.errors import ConfigError, DependencyError
from ssmd.core.lsn import Lsn
from ssmd.core.tables import TableInfo
from ssmd.core.wal2json import WAL2JSON_OPTIONS
from ssmd.pg.checks import PLUGIN, SlotInUseError, classify_plugin_error
from ssmd.pg.connect import connect, describe_target

log = logging.getLogger(__name__)

MESSAGE_PREFIX = "ssmd"  # prefix of ssmd's own pg_logical_emit_message records

# PostgreSQL's replication protocol counts time in microseconds since 2000-01-01 UTC.
_POSTGRES_EPOCH_S = 946684800
_XLOG_DATA_HEADER = struct.Struct("!QQq")  # dataStart, walEnd, sendTime
_KEEPALIVE = struct.Struct("!QqB")  # walEnd, sendTime, replyRequested
_SLOT_NAME = re.compile(r"[a-z0-9_]{1,63}")


def validate_slot_name(name: str) -> str:
    """Return `name` if PostgreSQL accepts it as a slot name, else raise ConfigError."""
    if not _SLOT_NAME.fullmatch(name):
        raise ConfigError(f"invalid REPLICATION_SLOT {name!r}: use 1-63 lower-case letters, digits and underscores")
    return name


def quote_literal(value: str) -> str:
    """Quote a string for the replication grammar, where only a doubled quote is special."""
    if "\0" in value:
        raise ConfigError(f"invalid value {value!r}: NUL characters cannot be sent to PostgreSQL")
    return "'" + value.replace("'", "''") + "'"


def escape_table_filter(name: str) -> str:
    """Escape one schema or table name for wal2json's add-tables list.

    The wal2json README (filter-tables, whose rules add-tables shares) requires a backslash
    before space, single quote, comma, period and asterisk. The backslash itself gets one too.
    """
    return re.sub(r"([\\,.* '])", r"\\\1", name)


def create_announced_slot(conn: psycopg.Connection, slot: str, content: Callable[[Lsn], str], *, before_copy: Callable[[], None] | None = None) -> Lsn:
    """Create the logical slot so that its own stream starts with a message announcing it.

    The message is `pg_logical_emit_message(true, 'ssmd', content(S))`, where S is the consistent
    point. Its transaction commits after S, so the slot decodes it like a change. A message
    emitted after creating the slot itself would leave a window in which a crash keeps a slot
    that never announces itself. So a temporary staging slot is created first, the message is
    emitted, and `pg_copy_logical_replication_slot` then makes the permanent slot at the same
    confirmed position S. A crash before the copy leaves no slot, because PostgreSQL drops a
    temporary slot when its session ends. `before_copy` is a test hook. Returns S.
    """
    staging = f"{slot[:54]}_staging"
    try:
        row = conn.execute("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, %s, true)", (staging, PLUGIN)).fetchone()
    except psycopg.Error as exc:
        raise classify_plugin_error(exc, staging) from exc
    point = Lsn.parse(row[0])
    try:
        try:
            conn.execute("SELECT pg_logical_emit_message(true, %s, %s)", (MESSAGE_PREFIX, content(point)))
        except psycopg.Error as exc:
            raise _emit_error(exc, slot) from exc
        if before_copy is not None:
            before_copy()
        try:
            conn.execute("SELECT pg_copy_logical_replication_slot(%s, %s, false)", (staging, slot))
        except psycopg.Error as exc:
            raise classify_plugin_error(exc, slot) from exc
    finally:
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (staging,))
        except psycopg.Error as exc:
            log.warning("dropping the staging slot failed; PostgreSQL drops it when the session ends slot=%s error=%s", staging, exc)
    return point


def _emit_error(exc: psycopg.Error, slot: str) -> Exception:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, psycopg.OperationalError):
        return DependencyError(f"writing the announcement of replication slot {slot} failed: {text}")
    return ConfigError(f"cannot write the announcement of replication slot {slot} with pg_logical_emit_message: {text}")


def wal2json_options(tables: Iterable[TableInfo]) -> dict[str, str]:
    """Return the plugin options: format-version 2 with the ids ssmd needs, and the filters."""
    options = dict(WAL2JSON_OPTIONS)
    options["add-tables"] = ",".join(f"{escape_table_filter(t.schema)}.{escape_table_filter(t.name)}" for t in tables)
    options["add-msg-prefixes"] = MESSAGE_PREFIX
    return options


def start_replication_command(slot: str, start: Lsn, options: dict[str, str]) -> str:
    rendered = ", ".join(f'"{name}" {quote_literal(value)}' for name, value in options.items())
    return f"START_REPLICATION SLOT {validate_slot_name(slot)} LOGICAL {start} ({rendered})"


def standby_status(flush: Lsn, *, reply: bool = False, now: float | None = None) -> bytes:
    """Build a Standby Status Update that reports `flush` as written, flushed and applied."""
    micros = int(((time.time() if now is None else now) - _POSTGRES_EPOCH_S) * 1_000_000)
    return b"r" + struct.pack("!QQQqB", flush.value, flush.value, flush.value, micros, 1 if reply else 0)


@dataclass(slots=True)
class ReadBatch:
    """wal2json rows received in one read, and the newest server WAL end seen in keepalives."""

    rows: list[bytes]
    wal_end: Lsn | None
    bytes: int = 0


class ReplicationStream:
    """A streaming logical replication session on one slot.

    Call `start` once, then `read` in a loop and `confirm` whenever the AckTracker allows it.
    The caller must confirm at least every `wal_sender_timeout / 2` (default 60 s) while it
    stops reading; `confirm(..., force=True)` from a periodic task does that.
    """

    def __init__(self, dsn: str, slot: str, tables: list[TableInfo], *, application_name: str = "ssmd-cdc", max_read_bytes: int = 1 << 20) -> None:
        self._dsn = dsn
        self._slot = validate_slot_name(slot)
        self._tables = tables
        self._application_name = application_name
        self._conn: psycopg.Connection | None = None
        self._confirmed: Lsn | None = None
        self._reply_requested = False
        self._max_read_bytes = max_read_bytes

    @property
    def confirmed(self) -> Lsn | None:
        return self._confirmed

    def start(self, start: Lsn = Lsn(0), *, confirmed: Lsn | None = None) -> None:
        """Connect and start streaming; 0/0 starts at the slot's confirmed flush position.

        `confirmed` is the slot's confirmed position, sent in status updates until a newer one.
        """
        self._confirmed = confirmed
        self._conn = connect(self._dsn, replication=True, application_name=self._application_name)
        command = start_replication_command(self._slot, start, wal2json_options(self._tables))
        try:
            cursor = self._conn.execute(command)
        except psycopg.Error as exc:
            self.close()
            raise _replication_error(exc, self._slot, self._dsn) from exc
        status = cursor.pgresult.status if cursor.pgresult is not None else None
        if status != pq.ExecStatus.COPY_BOTH:
            self.close()
            raise DependencyError(f"START_REPLICATION on slot {self._slot} returned status {status}, expected COPY_BOTH")
        log.info("streaming started slot=%s start=%s tables=%s", self._slot, start, ",".join(t.qualified_name for t in self._tables))

    async def read(self, timeout: float) -> ReadBatch:
        """Wait up to `timeout` seconds for data; return every row already buffered.

        Keepalives are consumed here. When one requests a reply, the last confirmed position is
        sent at once, because the walsender drops a client that stays silent past
        wal_sender_timeout.
        """
        pgconn = self._pgconn()
        batch = ReadBatch([], None)
        if not self._drain(pgconn, batch):
            await self._wait_readable(pgconn.socket, timeout)
            self._consume(pgconn)
            self._drain(pgconn, batch)
        # One socket read brings about 16 KiB, a few small transactions. Reading on while more
        # is already there lets one flush (re-reads, publish burst) serve a whole backlog slice.
        while batch.bytes < self._max_read_bytes and self._readable_now(pgconn.socket):
            self._consume(pgconn)
            if not self._drain(pgconn, batch):
                break
        if self._reply_requested:
            self._reply_requested = False
            self._send(standby_status(self._confirmed or Lsn(0)))
        return batch

    def confirm(self, flush: Lsn, *, force: bool = False) -> bool:
        """Report `flush` as the slot's confirmed position; return whether a message was sent.

        Never moves backwards: a lower `flush` than the one already confirmed resends the old one.
        """
        if self._confirmed is not None and flush <= self._confirmed:
            if not force:
                return False
            flush = self._confirmed
        self._send(standby_status(flush))
        self._confirmed = flush
        return True

    def close(self) -> None:
        """End the COPY if possible and close the connection; never raises."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if pq.ConnStatus(conn.pgconn.status) == pq.ConnStatus.OK:
                conn.pgconn.put_copy_end()
                _flush_blocking(conn.pgconn, 2.0)
        except (psycopg.Error, OSError) as exc:
            log.debug("ending the replication COPY failed: %s", exc)
        try:
            conn.close()
        except (psycopg.Error, OSError) as exc:
            log.debug("closing the replication connection failed: %s", exc)

    def _pgconn(self) -> pq.abc.PGconn:
        if self._conn is None:
            raise DependencyError("replication stream is not started")
        return self._conn.pgconn

    def _drain(self, pgconn, batch: ReadBatch) -> bool:
        """Move every complete CopyData message into `batch`; True when at least one was there."""
        got = False
        while True:
            try:
                size, data = pgconn.get_copy_data(1)
            except psycopg.Error as exc:
                raise self._lost(exc) from exc
            if size == 0:
                return got
            if size < 0:
                raise self._lost(None)
            got = True
            kind = data[0:1]
            if kind == b"w":
                # The header's positions are not needed: a logical XLogData's walEnd equals its
                # dataStart, and wal2json rows carry their own LSNs.
                row = bytes(data[1 + _XLOG_DATA_HEADER.size:])
                batch.rows.append(row)
                batch.bytes += len(row)
            elif kind == b"k":
                wal_end, _, reply = _KEEPALIVE.unpack_from(data, 1)
                batch.wal_end = Lsn(wal_end)
                self._reply_requested = self._reply_requested or bool(reply)
            else:
                log.warning("ignored unknown replication message kind=%r slot=%s", kind, self._slot)

    @staticmethod
    def _readable_now(fd: int) -> bool:
        readable, _, _ = select.select([fd], [], [], 0)
        return bool(readable)

    def _consume(self, pgconn) -> None:
        try:
            pgconn.consume_input()
        except psycopg.Error as exc:
            raise self._lost(exc) from exc

    async def _wait_readable(self, fd: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, timeout)
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(fd)

    def _send(self, message: bytes) -> None:
        pgconn = self._pgconn()
        try:
            if pgconn.put_copy_data(message) != 1:
                raise self._lost(None)
            _flush_blocking(pgconn, 10.0)
        except psycopg.Error as exc:
            raise self._lost(exc) from exc

    def _lost(self, exc: Exception | None) -> DependencyError:
        detail = str(exc) if exc else ""
        if not detail and self._conn is not None:
            detail = self._conn.pgconn.error_message.decode(errors="replace").strip()
        return DependencyError(f"replication stream of slot {self._slot} at {describe_target(self._dsn)} ended: {detail or 'connection closed'}")


def _flush_blocking(pgconn, timeout: float) -> None:
    """Push libpq's output buffer to the socket; the connection is non-blocking."""
    deadline = time.monotonic() + timeout
    while pgconn.flush() == 1:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DependencyError("timed out sending a standby status update to PostgreSQL")
        select.select([], [pgconn.socket], [], remaining)


def _replication_error(exc: psycopg.Error, slot: str, dsn: str) -> Exception:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate == "55006" or "is active for pid" in text:
        return SlotInUseError(f"replication slot {slot} is in use by another process ({text}): stop the other ssmd cdc, or set REPLICATION_SLOT to another name")
    if "could not access file" in text and "wal2json" in text:
        return ConfigError(f"the wal2json output plugin is not installed on the PostgreSQL server ({text}): install it, e.g. apt-get install postgresql-15-wal2json")
    if sqlstate == "42704" or "does not exist" in text:
        return DependencyError(f"replication slot {slot} disappeared before streaming started ({text})")
    if isinstance(exc, psycopg.OperationalError):
        return DependencyError(f"START_REPLICATION on slot {slot} at {describe_target(dsn)} failed: {text}")
    return ConfigError(f"START_REPLICATION on slot {slot} failed: {text}")


class SlotPoller:
    """Polling fallback: peek changes through a server-side cursor, advance after PubAcks.

    A peek decodes from the slot's confirmed position every time, so a round re-reads what the
    previous round did not advance past. The stream's duplicate window drops those repeats.
    """

    FETCH_ROWS = 2000

    def __init__(self, dsn: str, slot: str, tables: list[TableInfo], *, max_changes: int = 10000) -> None:
        self._dsn = dsn
        self._slot = validate_slot_name(slot)
        self._options = wal2json_options(tables)
        self._max_changes = max_changes
        self._conn: psycopg.Connection | None = None

    def open(self) -> None:
        self._conn = connect(self._dsn, autocommit=False, application_name="ssmd-cdc-poll")

    def peek(self) -> Iterable[list[bytes]]:
        """Yield lists of wal2json rows of whole transactions, decoded after the confirmed position.

        PostgreSQL stops decoding only after the transaction during which `max_changes` rows
        were reached, so one huge transaction comes whole. The server keeps the result in a
        tuplestore (spilled to disk), and the cursor fetches it in bounded batches.
        """
        conn = self._connection()
        arguments = [item for pair in self._options.items() for item in pair]
        placeholders = ", ".join(["%s"] * len(arguments))
        query = f"SELECT data FROM pg_logical_slot_peek_changes(%s, NULL, %s, {placeholders})"
        try:
            with conn.transaction():
                with conn.cursor(name="ssmd_peek") as cursor:
                    cursor.itersize = self.FETCH_ROWS
                    cursor.execute(query, [self._slot, self._max_changes, *arguments])
                    while rows := cursor.fetchmany(self.FETCH_ROWS):
                        yield [row[0].encode() for row in rows]
        except psycopg.Error as exc:
            raise _poll_error(exc, self._slot, self._dsn) from exc

    def advance(self, position: Lsn) -> None:
        """Move the slot's confirmed position to `position` (never backwards: PostgreSQL ignores that)."""
        conn = self._connection()
        try:
            with conn.transaction():
                conn.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)", (self._slot, str(position)))
        except psycopg.Error as exc:
            raise _poll_error(exc, self._slot, self._dsn) from exc

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error as exc:
                log.debug("closing the polling connection failed: %s", exc)

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            raise DependencyError("polling connection is not open")
        return self._conn


def _poll_error(exc: psycopg.Error, slot: str, dsn: str) -> Exception:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if getattr(exc, "sqlstate", None) == "55006" or "is active for pid" in text:
        return SlotInUseError(f"replication slot {slot} is in use by another process ({text}): stop the other ssmd cdc, or set REPLICATION_SLOT to another name")
    return DependencyError(f"polling slot {slot} at {describe_target(dsn)} failed: {text}")
