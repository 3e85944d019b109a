"""Typed records decoded from wal2json format-version 2 and carried on the stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from ssmd.core.jsontext import JsonValue
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position


class Op(str, Enum):
    """Row operation; the value is the last part of the NATS subject `cdc.<table>.<op>`."""

    INSERT = "insert"
    UPDATE = "update"
    DELETE = "delete"
    TRUNCATE = "truncate"


Row = dict[str, JsonValue]  # column name -> canonical value


@dataclass(frozen=True, slots=True)
class Begin:
    """Start of a transaction; wal2json v2 gives the commit record's LSN already here."""

    xid: int
    commit_lsn: Lsn
    next_lsn: Lsn
    commit_time: str | None = None


@dataclass(frozen=True, slots=True)
class Commit:
    """End of a transaction; the slot may be confirmed up to `next_lsn` once it is durable."""

    xid: int
    commit_lsn: Lsn
    next_lsn: Lsn
    commit_time: str | None = None


@dataclass(frozen=True, slots=True)
class Change:
    """One row change (or a table truncate) at its commit position.

    `key` holds the primary-key (or replica identity) columns of the new row, or of the removed
    row for a delete. `old_key` is set only when an update changed the key. `data` is the full
    canonical row, absent for delete and truncate. `unchanged` names TOASTed columns that the
    update left untouched, so wal2json omitted them from `data`.
    """

    op: Op
    schema: str
    table: str
    position: Position
    xid: int
    key: Row = field(default_factory=dict)
    old_key: Row | None = None
    data: Row | None = None
    unchanged: tuple[str, ...] = ()
    commit_time: str | None = None
    change_lsn: Lsn | None = None  # the change record's own LSN: informational, never an order


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    """A `pg_logical_emit_message` record (the publisher's heartbeat uses one)."""

    prefix: str
    content: str
    transactional: bool
    lsn: Lsn
    xid: int | None = None


Record = Begin | Commit | Change | LogicalMessage
