"""Re-reading columns that wal2json did not render: unchanged TOAST values and numeric NaN/Infinity.

wal2json 2.5 leaves an unchanged out-of-line TOAST column out of an UPDATE and prints numeric
NaN and Infinity as null, like SQL NULL. The publisher fills those columns with the row's
current values, read by key in one query per table and batch. The values can be newer than the
change, but every later change of the column carries its own value, so the cache still
converges. Values come back as each type's text output on a pinned session, the
same form the warm path encodes.

A re-read must not run before the change's transaction is visible. PostgreSQL flushes the
commit record (so the walsender can decode it) before the committing backend leaves the
process array, so a query in that gap still sees the row as it was before the transaction,
and a synchronous-replication wait can make the gap last indefinitely. The re-read therefore
first waits until a new snapshot sees every transaction it serves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence

import psycopg
from psycopg import sql

from ssmd.core.changes import Row
from ssmd.core.errors import DependencyError
from ssmd.core.jsontext import JsonNumber, dumps
from ssmd.core.tables import TableInfo

log = logging.getLogger(__name__)

# Parameter arrays grow with the batch; PostgreSQL takes far more, this bounds one query's size.
MAX_KEYS_PER_QUERY = 1000


def key_parameter(value) -> str:
    """Return a canonical key value as the text input of its PostgreSQL type."""
    if value is True:
        return "t"
    if value is False:
        return "f"
    if isinstance(value, (str, JsonNumber)):
        return str(value)
    # NOTE: a key column of array type would need the array literal, not JSON; none is supported.
    return dumps(value).decode()


def build_reread_query(table: TableInfo, columns: Sequence[str]) -> sql.Composed:
    key_aliases = [sql.Identifier(f"k{i}") for i in range(len(table.key_columns))]
    unnest_arguments = sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in table.key_columns)
    join_condition = sql.SQL(" AND ").join(
        sql.SQL("t.{} = k.{}::{}").format(sql.Identifier(column), alias, sql.SQL(table.type_of(column)))
        for column, alias in zip(table.key_columns, key_aliases)
    )
    # Selected without a cast: `boolean::text` gives 'true', while the type's output is 't'.
    selected = sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(column)) for column in columns)
    return sql.SQL(
        "SELECT k.ord, {selected} FROM unnest({arguments}) WITH ORDINALITY AS k({aliases}, ord) "
        "JOIN {schema}.{table} t ON {condition}"
    ).format(
        selected=selected, arguments=unnest_arguments, aliases=sql.SQL(", ").join(key_aliases),
        schema=sql.Identifier(table.schema), table=sql.Identifier(table.name), condition=join_condition,
    )


# Lists the 32-bit xids (from wal2json) that a snapshot taken now does not see yet. The full
# 64-bit xid takes the epoch of the snapshot's xmax, or the previous epoch for an xid above it.
_INVISIBLE_QUERY = """
WITH s AS (
    SELECT pg_current_snapshot() AS snap,
           pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax
)
SELECT x FROM s, unnest(%s::bigint[]) AS x
WHERE NOT pg_visible_in_snapshot(
    (CASE WHEN ((s.xmax >> 32) << 32) + x > s.xmax
          THEN ((s.xmax >> 32) << 32) + x - 4294967296
          ELSE ((s.xmax >> 32) << 32) + x END)::text::xid8,
    s.snap)
"""

VISIBILITY_POLL_S = 0.005
VISIBILITY_WARN_S = 5.0


async def wait_until_visible(conn: psycopg.AsyncConnection, xids: Iterable[int]) -> None:
    """Wait until new snapshots see every committed transaction in `xids`."""
    pending = sorted(set(xids))
    started = time.monotonic()
    warned = False
    delay = VISIBILITY_POLL_S
    while pending:
        try:
            cursor = await conn.execute(_INVISIBLE_QUERY, (pending,))
        except psycopg.OperationalError as exc:
            raise DependencyError(f"checking visibility of transactions {pending[:5]} failed: {exc}") from exc
        pending = [xid for (xid,) in await cursor.fetchall()]
        if not pending:
            return
        waited = time.monotonic() - started
        if waited > VISIBILITY_WARN_S and not warned:
            log.warning("waiting for committed transactions to become visible before a re-read xids=%s waited_s=%.1f", pending[:5], waited)
            warned = True
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.2)


async def reread_columns(
    conn: psycopg.AsyncConnection, table: TableInfo, keys: Sequence[Row], columns: Sequence[str], xids: Iterable[int] = ()
) -> list[dict[str, str | None] | None]:
    """Return, for each key in order, the text output of `columns` (None where the row is gone).

    `xids` are the transactions of the changes being completed: the re-read waits until they
    are visible.
    """
    results: list[dict[str, str | None] | None] = [None] * len(keys)
    if not keys or not columns:
        return results
    await wait_until_visible(conn, xids)
    query = build_reread_query(table, columns)
    for start in range(0, len(keys), MAX_KEYS_PER_QUERY):
        chunk = keys[start:start + MAX_KEYS_PER_QUERY]
        arrays = [[key_parameter(key[column]) for key in chunk] for column in table.key_columns]
        try:
            cursor = await conn.execute(query, arrays)
        except psycopg.OperationalError as exc:
            raise DependencyError(f"re-reading {len(chunk)} row(s) of {table.qualified_name} failed: {exc}") from exc
        for ordinal, values in _text_rows(cursor.pgresult):
            results[start + ordinal - 1] = dict(zip(columns, values))
    return results


def _text_rows(result) -> list[tuple[int, list[str | None]]]:
    """Return (ordinal, text outputs) per row, straight from the text-format result."""
    rows = []
    for row in range(result.ntuples):
        raw = [result.get_value(row, column) for column in range(result.nfields)]
        values = [None if value is None else bytes(value).decode() for value in raw[1:]]
        rows.append((int(raw[0]), values))
    return rows
