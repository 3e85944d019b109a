"""Look up followed tables in the catalog and reject ones ssmd cannot follow correctly."""

from __future__ import annotations

import psycopg
from psycopg import sql

from ssmd.core.errors import ConfigError
from ssmd.core.tables import ColumnInfo, TableInfo

_TABLE_QUERY = """
SELECT c.oid, n.nspname, c.relname, c.relreplident, c.relkind
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %s AND c.relname = %s
"""

_COLUMNS_QUERY = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""

# Key columns in index order: the primary key, else the replica identity index.
_KEY_QUERY = """
SELECT a.attname
FROM pg_index i
CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, position)
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
WHERE i.indrelid = %s AND (CASE WHEN %s THEN i.indisprimary ELSE i.indisreplident END)
ORDER BY k.position
"""


def split_name(name: str) -> tuple[str, str]:
    """Split `schema.table` (default schema `public`)."""
    schema, _, table = name.rpartition(".")
    return (schema or "public", table)


def load_table(conn: psycopg.Connection, name: str) -> TableInfo:
    """Return the TableInfo of `name`, or raise ConfigError naming the table and the fix."""
    schema, table = split_name(name)
    row = conn.execute(_TABLE_QUERY, (schema, table)).fetchone()
    if row is None:
        raise ConfigError(f"followed table {schema}.{table} does not exist: create it or remove it from CDC_TABLES")
    oid, schema, table, replica_identity, kind = row
    if kind not in ("r", "p"):
        raise ConfigError(f"followed relation {schema}.{table} is not a table (relkind {kind!r}): remove it from CDC_TABLES")

    columns = tuple(ColumnInfo(attname, type_name) for attname, type_name in conn.execute(_COLUMNS_QUERY, (oid,)))
    key_columns = tuple(attname for (attname,) in conn.execute(_KEY_QUERY, (oid, True)))
    if not key_columns and replica_identity == "i":
        key_columns = tuple(attname for (attname,) in conn.execute(_KEY_QUERY, (oid, False)))
    if not key_columns or replica_identity == "n":
        raise ConfigError(
            f"followed table {schema}.{table} has no primary key or replica identity index, so wal2json drops "
            f"its UPDATEs and DELETEs: add a primary key (ALTER TABLE {schema}.{table} ADD PRIMARY KEY (...)) "
            f"or a unique index with REPLICA IDENTITY USING INDEX"
        )
    return TableInfo(schema, table, columns, key_columns, replica_identity)


def load_tables(conn: psycopg.Connection, names: list[str]) -> list[TableInfo]:
    return [load_table(conn, name) for name in names]


def check_readable(conn: psycopg.Connection, tables: list[TableInfo]) -> None:
    """Raise ConfigError naming the first table this user may not SELECT from."""
    for table in tables:
        try:
            conn.execute(sql.SQL("SELECT FROM {}.{} LIMIT 0").format(sql.Identifier(table.schema), sql.Identifier(table.name)))
        except psycopg.errors.InsufficientPrivilege:
            if not conn.autocommit:
                conn.rollback()
            raise ConfigError(
                f"permission denied to read table {table.qualified_name}: run GRANT SELECT ON {table.qualified_name} TO <ssmd user>"
            ) from None
