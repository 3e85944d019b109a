"""Read followed tables from one exported snapshot whose boundary is an exact LSN.

`CREATE_REPLICATION_SLOT <name> TEMPORARY LOGICAL wal2json (SNAPSHOT 'export')` on a replication
connection returns the slot's consistent point S and the name of a snapshot exported at S.
PostgreSQL builds that snapshot to show exactly the transactions whose commit record lies
before S. The slot decodes every later transaction instead. A second, normal
connection imports it (`SET TRANSACTION SNAPSHOT`) inside a REPEATABLE READ READ ONLY
transaction and reads every table there, so all tables show the same moment and a stream change
is "already in the warm data" exactly when its commit LSN is below S. An LSN read beside the
snapshot (`pg_current_wal_lsn()`) cannot give that split: a transaction can commit before that
LSN and still be invisible to a snapshot taken earlier.

The export stays valid only while the replication connection stays idle and open, so it stays
open until reading ends; closing it drops the temporary slot. Reading runs on blocking psycopg connections in a worker thread (COPY text rows and
encoding are CPU work that would stall the event loop).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from ssmd.core.encoding import TextRowEncoder, text_converter
from ssmd.core.errors import DecodeError, DependencyError
from ssmd.core.keys import escape_part, key_text
from ssmd.core.lsn import Lsn
from ssmd.core.tables import TableInfo
from ssmd.pg.catalog import load_table
from ssmd.pg.connect import connect

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EncodedRow:
    """One row read from the snapshot: its key text and canonical JSON."""

    key: str
    value: bytes


class SnapshotReader:
    """One snapshot over the followed tables; use as a context manager (blocking)."""

    def __init__(self, dsn: str, *, export: bool = True, application_name: str = "ssmd-warm") -> None:
        self._dsn = dsn
        self._export = export
        self._application_name = application_name
        self._replication: psycopg.Connection | None = None
        self._reader: psycopg.Connection | None = None
        self.slot_name: str | None = None
        self.snapshot_lsn: Lsn | None = None
        self.snapshot_name: str | None = None

    def __enter__(self) -> SnapshotReader:
        try:
            if self._export:
                self._create_slot()
            self._begin()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _create_slot(self) -> None:
        self._replication = connect(self._dsn, replication=True, application_name=self._application_name)
        self.slot_name = f"ssmd_warm_{os.getpid()}_{secrets.token_hex(4)}"
        # Replication commands take no parameters; the name is generated from safe characters.
        try:
            row = self._replication.execute(
                f"CREATE_REPLICATION_SLOT {self.slot_name} TEMPORARY LOGICAL wal2json (SNAPSHOT 'export')"
            ).fetchone()
        except psycopg.Error as exc:
            raise DependencyError(f"creating temporary slot {self.slot_name} for the warm snapshot failed: {exc}") from exc
        _, consistent_point, snapshot_name, _ = row
        self.snapshot_lsn = Lsn.parse(consistent_point)
        self.snapshot_name = snapshot_name
        log.info("created warm snapshot slot=%s snapshot_lsn=%s snapshot=%s", self.slot_name, self.snapshot_lsn, snapshot_name)

    def _begin(self) -> None:
        self._reader = connect(self._dsn, application_name=self._application_name)
        try:
            self._reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            if self.snapshot_name is not None:
                self._reader.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(self.snapshot_name)))
        except psycopg.Error as exc:
            raise DependencyError(f"importing snapshot {self.snapshot_name} failed: {exc}") from exc

    def table_info(self, name: str) -> TableInfo:
        """Return the table as the snapshot's catalog shows it."""
        return load_table(self._require_reader(), name)

    def estimate_rows(self, table: TableInfo) -> int:
        """Return the planner's row estimate of `table` (pg_class.reltuples; 0 when never analysed)."""
        query = "SELECT greatest(reltuples, 0)::bigint FROM pg_class WHERE oid = %s::regclass"
        row = self._require_reader().execute(query, (f'"{table.schema}"."{table.name}"',)).fetchone()
        return int(row[0]) if row else 0

    def rows(self, table: TableInfo) -> Iterator[EncodedRow]:
        """Yield every row of `table` as key text and canonical JSON, read by COPY in text form."""
        encode = TextRowEncoder([(column.name, column.type_name) for column in table.columns]).encode
        key_of = _key_builder(table)
        for values in self.text_rows(table):
            yield EncodedRow(key_of(values), encode(values))

    def text_rows(self, table: TableInfo) -> Iterator[tuple[str | None, ...]]:
        """Yield every row of `table` as COPY prints it: one text value or None per column."""
        try:
            with self._require_reader().cursor().copy(_copy_query(table)) as copy:
                yield from copy.rows()
        except psycopg.Error as exc:
            raise DependencyError(f"reading {table.qualified_name} from the snapshot failed: {exc}") from exc

    def batches(self, table: TableInfo, key_prefix: bytes, size: int) -> Iterator[list[tuple[bytes, bytes]]]:
        """Yield the rows of `table` in lists of at most `size` (Redis value key, canonical JSON).

        The value key is `key_prefix` followed by the key text, so the caller builds no string
        per row. The warm's hot loop: converters and key builders are looked up once per table.
        """
        encode = TextRowEncoder([(column.name, column.type_name) for column in table.columns]).encode
        key_of = _key_builder(table)
        batch: list[tuple[bytes, bytes]] = []
        append = batch.append
        for values in self.text_rows(table):
            append((key_prefix + key_of(values).encode(), encode(values)))
            if len(batch) >= size:
                yield batch
                batch = []
                append = batch.append
        if batch:
            yield batch

    def close(self) -> None:
        for conn in (self._reader, self._replication):
            if conn is not None and not conn.closed:
                try:
                    conn.close()
                except psycopg.Error as exc:
                    log.warning("closing a snapshot connection failed: %s", exc)
        self._reader = self._replication = None

    def _require_reader(self) -> psycopg.Connection:
        if self._reader is None:
            raise DependencyError("snapshot reader is not open")
        return self._reader


# Converters whose canonical value is a str equal to the text output (a JsonNumber is a str), so
# `part_text` of it is that text: text types, integers, and numeric with its exact digits.
_TEXT_KEY_CONVERTERS = frozenset({text_converter("text"), text_converter("bigint"), text_converter("numeric")})
_NEEDS_ESCAPE = re.compile(r"[%:{}]")


def _copy_query(table: TableInfo) -> sql.Composed:
    return sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(
        sql.SQL(", ").join(sql.Identifier(name) for name in table.column_names()),
        sql.Identifier(table.schema, table.name),
    )


def _key_builder(table: TableInfo) -> Callable[[Sequence[str | None]], str]:
    """Return the function from a COPY text row to the row's key text (`ssmd.core.keys.key_text`).

    A key column whose canonical value is its text output (text types, integers, and numeric,
    whose canonical value keeps the exact digits) needs no converter. Its text is escaped only when
    it contains one of the characters `escape_part` replaces.
    """
    names = table.column_names()
    parts = []
    for name in table.key_columns:
        column = table.columns[names.index(name)]
        convert = text_converter(column.type_name)
        parts.append((names.index(name), None if convert in _TEXT_KEY_CONVERTERS else convert))
    if not parts:
        raise DecodeError(f"table {table.qualified_name} has no key columns")

    if len(parts) == 1 and parts[0][1] is None:
        position = parts[0][0]

        def single_text_key(values: Sequence[str | None]) -> str:
            text = values[position]
            if text is None:
                raise DecodeError(f"key column {names[position]} of {table.qualified_name} is null: a key column must have a value")
            if _NEEDS_ESCAPE.search(text) is None:
                return text
            return escape_part(text)

        return single_text_key

    def composite_key(values: Sequence[str | None]) -> str:
        canonical = []
        for position, convert in parts:
            text = values[position]
            canonical.append(text if convert is None or text is None else convert(text))
        return key_text(canonical)

    return composite_key

