"""Both paths encode identically on a real PostgreSQL 15 with wal2json 2.5.

The database's default DateStyle and TimeZone are set to non-ISO, non-UTC values, so an
unpinned session would render dates differently. The slot-reading and warm sessions pin their
settings the way the daemons do (`ssmd.pg.connect`).
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg import sql

from ssmd.core.changes import Change, Op
from ssmd.core.encoding import TextRowEncoder, encode_row
from ssmd.core.errors import DecodeError
from ssmd.core.tables import TableInfo
from ssmd.core.wal2json import WAL2JSON_OPTIONS, DecodedChange, Wal2JsonDecoder, columns_to_fill, fill_columns
from ssmd.pg.catalog import load_table
from ssmd.pg.connect import connect

SCHEMA = """
CREATE TYPE mood AS ENUM ('ok', 'sad', 'it''s');
CREATE DOMAIN price AS numeric(12,4);
CREATE TABLE everything (
    id integer PRIMARY KEY,
    i2 smallint, i4 integer, i8 bigint,
    n numeric, n_huge numeric(40,18), n_scaled numeric(10,4),
    f4 real, f8 double precision,
    b boolean,
    t text, vc varchar(20), ch char(5),
    u uuid,
    d date, ts timestamp, tstz timestamptz(3), tm time, tmtz timetz, iv interval,
    by bytea,
    js json, jb jsonb,
    ta text[], ia integer[], na numeric[], ia2 integer[][], qa varchar(10)[], tsa timestamptz[], ba bytea[], jba jsonb[],
    e mood, dp price
)
"""

ROWS = [
    # Special numbers: wal2json prints numeric/float NaN and Infinity as null.
    """(1, -32768, -2147483648, 9223372036854775807,
        'NaN', 12345678901234567890.123456789012345678, 0.0700,
        'Infinity', '-Infinity',
        true, 'plain', 'v', 'ab',
        'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
        '2024-03-15', '2024-03-15 17:30:00.123456', '2024-03-15 17:30:00.12+00', '10:00:01.5', '10:00:00+02', '1 year 2 mons -3 days 04:05:06.789',
        '\\x00ff10',
        '{"z": 1.50, "a": [1, 2.0e3], "a": "dup"}', '{"x": 1.50, "s": "q", "n": null}',
        '{a,"b c",NULL,""}', '{1,NULL,3}', '{1.50,NaN,-Infinity}', '{{1,2},{3,NULL}}', ARRAY['q"uote', 'back\\slash', 'NULL', ' sp ', '{}', NULL],
        '{"2024-03-15 17:30:00+00",infinity}', '{"\\\\x00ff"}', ARRAY['{"a": 1}'::jsonb, '"s"'],
        'it''s', 1.5)""",
    # Every column NULL except the key.
    "(2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
    # Ordinary values, infinities of dates, BC dates, float extremes, a jsonb string scalar.
    """(3, 0, 0, -9223372036854775808,
        '-0.000000000000000000001', -1, 12.3400,
        3.4e38, 1e-300,
        false, E'tab\\tnew\\nline', 'ünïcødé', 'abcde',
        '00000000-0000-0000-0000-000000000000',
        'infinity', '-infinity', '-infinity', '23:59:59.999999', '00:00:00-05:30', '-1 days',
        '\\x',
        '[]', '"s"',
        '{}', '{}', '{0.1}', '{{-1},{2}}', '{"a,b"}', '{}', '{}', '{}',
        'sad', -0.5)""",
    """(4, 1, 2, 3,
        '-Infinity', 0, 0,
        'NaN', 0.1,
        true, '', '', '',
        'ffffffff-ffff-ffff-ffff-ffffffffffff',
        '0044-03-15 BC', '0044-03-15 12:00:00 BC', '0044-03-15 12:00:00+00 BC', '00:00', '12:00:00+00', '0',
        '\\xdeadbeef',
        '{"nested": {"deep": [true, false, null]}}', '12345678901234567890.12345678901234567890',
        '{NULL}', '{NULL,NULL}', '{NULL}', '{{NULL}}', '{NULL}', '{NULL}', '{NULL}', '{NULL}',
        'ok', 0)""",
]


@pytest.fixture
def database(fresh_database):
    """The test database with non-ISO, non-UTC defaults that pinned sessions must override."""
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        name = conn.execute("SELECT current_database()").fetchone()[0]
        conn.execute(sql.SQL("ALTER DATABASE {} SET DateStyle = 'SQL, DMY'").format(sql.Identifier(name)))
        conn.execute(sql.SQL("ALTER DATABASE {} SET TimeZone = 'America/New_York'").format(sql.Identifier(name)))
        conn.execute(sql.SQL("ALTER DATABASE {} SET extra_float_digits = 0").format(sql.Identifier(name)))
        conn.execute(sql.SQL("ALTER DATABASE {} SET bytea_output = 'escape'").format(sql.Identifier(name)))
    return fresh_database


def create_and_fill(dsn: str, slot: str) -> TableInfo:
    with connect(dsn) as conn:
        conn.execute(SCHEMA)
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))
        for row in ROWS:
            conn.execute(f"INSERT INTO everything VALUES {row}")
        return load_table(conn, "everything")


def slot_rows(conn: psycopg.Connection, slot: str, *, consume: bool) -> list[str]:
    function = "pg_logical_slot_get_changes" if consume else "pg_logical_slot_peek_changes"
    options = [item for pair in WAL2JSON_OPTIONS.items() for item in pair]
    placeholders = ", ".join(["%s"] * len(options))
    query = f"SELECT data FROM {function}(%s, NULL, NULL, {placeholders})"
    return [data for (data,) in conn.execute(query, (slot, *options))]


def decode_inserts(rows: list[str], table: TableInfo) -> dict[int, DecodedChange]:
    decoder = Wal2JsonDecoder([table], only_known_tables=True)
    inserts = {}
    for row in rows:
        decoded = decoder.decode_row(row.encode())
        if isinstance(decoded, DecodedChange) and decoded.change.op is Op.INSERT:
            inserts[int(decoded.change.key["id"])] = decoded
    return inserts


def warm_rows(dsn: str, table: TableInfo) -> dict[int, tuple[str | None, ...]]:
    """Read the table the way warm does: COPY text output of every column in a pinned session."""
    with connect(dsn) as conn:
        with conn.cursor().copy(sql.SQL("COPY (SELECT {} FROM everything) TO STDOUT").format(column_list(table))) as copy:
            return {int(values[0]): tuple(values) for values in copy.rows()}


def column_list(table: TableInfo) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(name) for name in table.column_names())


def test_type_names_match_format_type(database, fresh_slot_name):
    table = create_and_fill(database, fresh_slot_name)
    with connect(database) as conn:
        rows = slot_rows(conn, fresh_slot_name, consume=True)

    decoded = decode_inserts(rows, table)[1]
    assert decoded.types == {column.name: column.type_name for column in table.columns}


def test_change_and_warm_bytes_identical(database, fresh_slot_name):
    table = create_and_fill(database, fresh_slot_name)
    with connect(database) as conn:
        inserts = decode_inserts(slot_rows(conn, fresh_slot_name, consume=True), table)
    warm = warm_rows(database, table)
    encoder = TextRowEncoder([(column.name, column.type_name) for column in table.columns])

    assert sorted(inserts) == sorted(warm) == [1, 2, 3, 4]
    for row_id, decoded in inserts.items():
        warm_values = dict(zip(table.column_names(), warm[row_id]))
        special = {name for name, text in warm_values.items() if text in ("NaN", "Infinity", "-Infinity") and name in ("n", "f4", "f8")}
        needs_fill = set(columns_to_fill(decoded))
        # Only the NaN/Infinity columns and the SQL NULL numerics are ambiguous in wal2json output.
        null_numerics = {name for name in ("n", "n_huge", "n_scaled", "f4", "f8") if warm_values[name] is None}
        assert needs_fill == special | null_numerics, row_id

        completed = fill_columns(decoded, {name: warm_values[name] for name in needs_fill})
        assert completed.unchanged == ()
        assert encode_row(completed.data) == encoder.encode(warm[row_id]), row_id
        if not needs_fill:
            assert encode_row(decoded.change.data) == encoder.encode(warm[row_id]), row_id


def test_expected_canonical_values(database, fresh_slot_name):
    table = create_and_fill(database, fresh_slot_name)
    warm = warm_rows(database, table)
    encoder = TextRowEncoder([(column.name, column.type_name) for column in table.columns])
    first = encoder.encode(warm[1])
    third = encoder.encode(warm[3])

    assert b'"n":"NaN"' in first
    assert b'"n_huge":12345678901234567890.123456789012345678' in first
    assert b'"n_scaled":0.0700' in first
    assert b'"i8":9223372036854775807' in first
    assert b'"f4":"Infinity"' in first
    assert b'"f8":"-Infinity"' in first
    assert b'"tstz":"2024-03-15T17:30:00.12+00:00"' in first
    assert b'"ts":"2024-03-15T17:30:00.123456"' in first
    assert b'"by":"\\\\x00ff10"' in first
    assert b'"jb":{"n":null,"s":"q","x":1.50}' in first
    assert b'"js":{"a":"dup","z":1.50}' in first
    assert b'"qa":["q\\"uote","back\\\\slash","NULL"," sp ","{}",null]' in first
    assert b'"ia2":[[1,2],[3,null]]' in first
    assert b'"na":[1.50,"NaN","-Infinity"]' in first
    assert b'"jba":[{"a":1},"s"]' in first
    assert b'"dp":"1.5000"' in first
    assert b'"jb":"s"' in third
    assert b'"d":"infinity"' in third
    assert b'"tstz":"-infinity"' in third
    assert b'"f8":1e-300' in third


def test_unpinned_session_output_rejected(database, fresh_slot_name):
    table = create_and_fill(database, fresh_slot_name)
    with psycopg.connect(database, autocommit=True) as conn:
        assert conn.execute("SHOW DateStyle").fetchone()[0] == "SQL, DMY"
        rows = slot_rows(conn, fresh_slot_name, consume=False)

    decoder = Wal2JsonDecoder([table])
    with pytest.raises(DecodeError, match="DateStyle=ISO"):
        for row in rows:
            decoder.decode(row.encode())


def test_update_nan_and_key_change(database, fresh_slot_name):
    table = create_and_fill(database, fresh_slot_name)
    with connect(database) as conn:
        slot_rows(conn, fresh_slot_name, consume=True)
        conn.execute("UPDATE everything SET n = 'NaN', id = 10 WHERE id = 3")
        conn.execute("DELETE FROM everything WHERE id = 4")
        rows = slot_rows(conn, fresh_slot_name, consume=True)

    decoder = Wal2JsonDecoder([table])
    changes = [record for record in (decoder.decode(row.encode()) for row in rows) if isinstance(record, Change)]
    update, delete = changes
    assert update.key == {"id": "10"}
    assert update.old_key == {"id": "3"}
    assert update.data["n"] is None
    assert delete.key == {"id": "4"}
    assert delete.position > update.position


def test_text_cast_differs_from_output_function(database, fresh_slot_name):
    # Warm must read COPY text (the output function, as wal2json uses); a ::text cast differs.
    table = create_and_fill(database, fresh_slot_name)
    with connect(database) as conn:
        cast = conn.execute("SELECT b::text, ch::text FROM everything WHERE id = 1").fetchone()
    copied = dict(zip(table.column_names(), warm_rows(database, table)[1]))

    assert cast == ("true", "ab")
    assert (copied["b"], copied["ch"]) == ("t", "ab   ")
    with pytest.raises(DecodeError):
        TextRowEncoder([("b", "boolean")]).encode([cast[0]])


TOAST_SCHEMA = """
CREATE TABLE markets (ticker text PRIMARY KEY, status text, price numeric, notes text);
ALTER TABLE markets ALTER COLUMN notes SET STORAGE EXTERNAL;
"""
# 10 KB of md5 hex: incompressible enough, and EXTERNAL storage keeps it out of line anyway.
LONG_NOTES = "(SELECT string_agg(md5(i::text), '') FROM generate_series(1, 320) AS i)"


@pytest.mark.parametrize("replica_identity", ["DEFAULT", "FULL"])
def test_toast_omitted_column_filled(database, fresh_slot_name, replica_identity):
    with connect(database) as conn:
        conn.execute(TOAST_SCHEMA)
        conn.execute(f"ALTER TABLE markets REPLICA IDENTITY {replica_identity}")
        conn.execute(f"INSERT INTO markets VALUES ('TEST-1', 'open', 'NaN', {LONG_NOTES})")
        table = load_table(conn, "markets")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (fresh_slot_name,))
        conn.execute("UPDATE markets SET status = 'closed'")
        conn.execute("DELETE FROM markets")
        rows = slot_rows(conn, fresh_slot_name, consume=True)
        notes = conn.execute(f"SELECT {LONG_NOTES}").fetchone()[0]

    decoder = Wal2JsonDecoder([table])
    update, delete = [decoded for decoded in (decoder.decode_row(row.encode()) for row in rows) if isinstance(decoded, DecodedChange)]
    assert len(notes) == 10240
    assert update.change.unchanged == ("notes",)
    assert columns_to_fill(update) == ("notes", "price")
    assert delete.change.key == {"ticker": "TEST-1"}

    from_old_tuple = fill_columns(update, None)
    if replica_identity == "FULL":
        assert from_old_tuple.data["notes"] == notes
        assert from_old_tuple.unchanged == ("price",)
    else:
        assert from_old_tuple.unchanged == ("notes", "price")
    reread = fill_columns(update, {"notes": notes, "price": "NaN"})
    assert reread.data["notes"] == notes
    assert reread.data["price"] == "NaN"
    assert reread.data["status"] == "closed"
    assert reread.unchanged == ()
