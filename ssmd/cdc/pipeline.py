"""From wal2json rows to published messages: decode, complete columns, publish, track acks.

Changes wait in a buffer of at most `batch_size` so that the columns wal2json did not render
(unchanged TOAST, numeric NaN/Infinity as null) are re-read in one query per table and batch.
The buffer is flushed when it is full, at every commit and after every read, so a huge
transaction is published in slices while it streams in.

ssmd's own logical messages (prefix `ssmd`) become `cdc._ssmd.mark` messages, except the one
that announces this pipeline's slot, which becomes `cdc._ssmd.slot_created`. Both count as a
change of their transaction, so the slot is confirmed past them only after their PubAck.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg

from ssmd.bus.publisher import Publisher
from ssmd.cdc.marks import encode_mark, parse_slot_created
from ssmd.core.changes import Begin, Commit, LogicalMessage
from ssmd.core.confirm import AckTracker
from ssmd.core.encoding import is_float_like
from ssmd.core.envelope import Message, encode_change, encode_slot_created
from ssmd.core.errors import InternalError
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position
from ssmd.core.tables import TableInfo
from ssmd.core.wal2json import DecodedChange, Wal2JsonDecoder, columns_to_fill, fill_columns
from ssmd.observe import CdcMetrics
from ssmd.pg.replication import MESSAGE_PREFIX
from ssmd.pg.resolve import reread_columns

log = logging.getLogger(__name__)

_Pending = tuple[DecodedChange | LogicalMessage, Begin | None]


@dataclass(frozen=True, slots=True)
class SlotAnnouncement:
    """Publisher token of a `cdc._ssmd.slot_created` message at `position` in the slot's stream."""

    position: Position


def columns_to_reread(decoded: DecodedChange) -> list[str]:
    """Return the columns to fill that the old tuple (REPLICA IDENTITY FULL) cannot supply."""
    old_row = decoded.old_row or {}
    needed = []
    for name in columns_to_fill(decoded):
        from_old_tuple = (
            name in decoded.change.unchanged
            and name in old_row
            and (old_row[name] is not None or not is_float_like(decoded.types.get(name, "")))
        )
        if not from_old_tuple:
            needed.append(name)
    return needed


class ChangePipeline:
    def __init__(
        self,
        tables: list[TableInfo],
        resolve_conn: psycopg.AsyncConnection,
        publisher: Publisher,
        tracker: AckTracker,
        metrics: CdcMetrics,
        batch_size: int = 500,
        *,
        slot: str | None = None,
    ) -> None:
        self._tables = {(table.schema, table.name): table for table in tables}
        self._resolve_conn = resolve_conn
        self._publisher = publisher
        self._tracker = tracker
        self._metrics = metrics
        self._batch_size = batch_size
        self._slot = slot  # announcements of other slots are skipped
        self._decoder = Wal2JsonDecoder(tables, only_known_tables=True)
        self._begin: Begin | None = None
        self._pending: list[_Pending] = []
        self._commits: list[Lsn] = []  # commit LSNs of transactions whose C record arrived, not yet closed

    def reset(self) -> None:
        """Start a fresh decoder, for a new peek from the slot's confirmed position."""
        if self._pending or self._commits or self._begin is not None:
            raise InternalError("pipeline reset inside a transaction")
        self._decoder = Wal2JsonDecoder(self._tables.values(), only_known_tables=True)

    async def feed(self, row: bytes) -> None:
        await self.feed_rows((row,))

    async def feed_rows(self, rows: Iterable[bytes]) -> None:
        """Decode rows in order, buffering changes and publishing whenever the buffer is full."""
        decode = self._decoder.decode_row
        pending = self._pending
        changes = 0
        try:
            for row in rows:
                record = decode(row)
                if type(record) is DecodedChange:
                    changes += 1
                    pending.append((record, self._begin))
                    if len(pending) >= self._batch_size:
                        await self.flush()
                        pending = self._pending
                elif type(record) is Begin:
                    self._tracker.open(record.commit_lsn, record.next_lsn)
                    self._begin = record
                elif type(record) is Commit:
                    # The transaction closes at the next flush, after its messages are
                    # published, so one flush serves every transaction of a read: one re-read
                    # per table and one burst of publishes instead of one of each per transaction.
                    self._commits.append(record.commit_lsn)
                    self._begin = None
                    if len(self._commits) >= self._batch_size:
                        await self.flush()
                        pending = self._pending
                elif record is not None:
                    await self._on_message(record)
                    pending = self._pending
        finally:
            # One counter update per read: the counter takes a lock on every call.
            self._metrics.changes_read.inc(changes)

    async def flush(self) -> None:
        """Complete and publish every buffered change and mark, in order, then close their transactions."""
        await self._publish_pending()
        commits, self._commits = self._commits, []
        for commit_lsn in commits:
            self._tracker.close(commit_lsn)
        if commits:
            self._metrics.transactions.inc(len(commits))

    async def _publish_pending(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        rereads = await self._reread(pending)
        publish = self._publisher.publish
        sent = self._tracker.sent
        for index, (record, begin) in enumerate(pending):
            if type(record) is LogicalMessage:
                position = Position(begin.commit_lsn if begin else record.lsn)
                message, token = self._encode_message(record, begin, position)
                sent(position)
            else:
                message = encode_change(fill_columns(record, rereads.get(index)) if index in rereads else record.change)
                token = record.change.position
                sent(token)
            await publish(message, token)

    def _encode_message(self, record: LogicalMessage, begin: Begin | None, position: Position) -> tuple[Message, object]:
        announced = parse_slot_created(record.content)
        if announced is not None:
            slot, point = announced
            return encode_slot_created(slot, point), SlotAnnouncement(position)
        return encode_mark(record, begin.commit_lsn if begin else None), position

    async def _on_message(self, message: LogicalMessage) -> None:
        if message.prefix != MESSAGE_PREFIX:
            return
        announced = parse_slot_created(message.content)
        if announced is not None and announced[0] != self._slot:
            log.debug("skipped the announcement of another slot slot=%s lsn=%s", announced[0], message.lsn)
            return
        if message.transactional and self._begin is not None:
            self._pending.append((message, self._begin))
            return
        # A non-transactional message arrives outside any transaction. Tracking it as a
        # transaction that ends at its LSN keeps the slot behind it until its PubAck.
        self._tracker.open(message.lsn, message.lsn)
        self._pending.append((message, None))
        await self.flush()
        self._tracker.close(message.lsn)

    async def _reread(self, pending: list[_Pending]) -> dict[int, dict[str, str | None] | None]:
        """Re-read the columns to fill, one query per table; map buffer index -> text values."""
        to_reread: dict[tuple[str, str], list[tuple[int, DecodedChange]]] = defaultdict(list)
        columns: dict[tuple[str, str], set[str]] = defaultdict(set)
        results: dict[int, dict[str, str | None] | None] = {}
        for index, (record, _) in enumerate(pending):
            if not isinstance(record, DecodedChange) or not columns_to_fill(record):
                continue
            needed = columns_to_reread(record)
            results[index] = None
            if needed:
                table_key = (record.change.schema, record.change.table)
                to_reread[table_key].append((index, record))
                columns[table_key].update(needed)

        for table_key, entries in to_reread.items():
            table = self._tables[table_key]
            names = sorted(columns[table_key])
            keys = [record.change.key for _, record in entries]
            xids = {record.change.xid for _, record in entries}
            values = await reread_columns(self._resolve_conn, table, keys, names, xids)
            for (index, _), row in zip(entries, values):
                results[index] = row
            self._metrics.reread_rows.inc(len(entries))
            log.debug("re-read columns table=%s rows=%s columns=%s", table.qualified_name, len(entries), ",".join(names))
        return results
