"""`ssmd cdc` rows equal the warm path's encoding of the same row, whatever the server's settings."""

from __future__ import annotations

import pytest

from ssmd.core.encoding import TextRowEncoder, encode_row
from ssmd.pg.catalog import load_table
from ssmd.pg.connect import connect
from tests.integration.cdc_support import CdcProcess, changes, read_stream, run_sql, wait_streaming, wait_until

ALL_TYPES_TABLE = """
CREATE TYPE mood AS ENUM ('calm', 'busy');
CREATE TABLE all_types (
    id integer PRIMARY KEY,
    c_smallint smallint, c_bigint bigint, c_numeric numeric(30, 10), c_numeric_free numeric,
    c_real real, c_double double precision, c_bool boolean, c_text text, c_varchar varchar(20),
    c_char char(4), c_json json, c_jsonb jsonb, c_text_array text[], c_int_array integer[],
    c_numeric_array numeric[], c_timestamptz timestamptz, c_timestamp timestamp, c_date date,
    c_time time, c_interval interval, c_bytea bytea, c_uuid uuid, c_mood mood
)
"""

ROWS = [
    """INSERT INTO all_types VALUES (1, -32768, 9223372036854775807, 12345678901234567890.0123456789,
        0.0700, 1.5, 0.1, true, 'quote " and \\ back', 'ünïcödé', 'ab', '{"b": 1.10, "a": [1, 2]}',
        '{"z": 1.10, "a": "s"}', '{a,"b c",NULL,""}', '{{1,2},{3,4}}', '{1.50,NaN}',
        '2024-03-15 13:30:00.74137-04', '2024-03-15 17:30:00', '2024-03-15', '17:30:00.5',
        '1 day 02:03:04', '\\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'busy')""",
    "INSERT INTO all_types (id, c_numeric_free, c_double, c_real, c_jsonb, c_timestamptz, c_date) "
    "VALUES (2, 'NaN', '-Infinity', 'Infinity', '\"just a string\"', 'infinity', '-infinity')",
    "INSERT INTO all_types (id) VALUES (3)",
]


def _warm_rows(url: str) -> dict[int, bytes]:
    """Encode every row from the PostgreSQL text output, as the warm path does."""
    with connect(url) as conn:
        table = load_table(conn, "all_types")
        encoder = TextRowEncoder([(column.name, column.type_name) for column in table.columns])
        with conn.cursor().copy("COPY all_types TO STDOUT") as copy:
            return {int(values[0]): encoder.encode(values) for values in copy.rows()}


@pytest.mark.parametrize("server_style", ["default", "weird"])
def test_cdc_row_equals_warm_encoding(ssmd_env, tmp_path, server_style):
    url = ssmd_env["DATABASE_URL"]
    run_sql(url, ALL_TYPES_TABLE)
    if server_style == "weird":
        # New sessions, the walsender included, start with these unless ssmd pins its own.
        database = url.rsplit("/", 1)[1]
        run_sql(url, f"ALTER DATABASE \"{database}\" SET DateStyle = 'SQL, DMY'",
                f"ALTER DATABASE \"{database}\" SET TimeZone = 'America/New_York'",
                f"ALTER DATABASE \"{database}\" SET extra_float_digits = 0",
                f"ALTER DATABASE \"{database}\" SET bytea_output = 'escape'",
                f"ALTER DATABASE \"{database}\" SET IntervalStyle = 'sql_standard'")
    process = CdcProcess({**ssmd_env, "CDC_TABLES": "all_types"}, tmp_path / "cdc.log")
    try:
        wait_streaming(url, ssmd_env["REPLICATION_SLOT"], process)
        run_sql(url, *ROWS)
        messages = wait_until(lambda: (found := changes(read_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"]))) and len(found) >= 3 and found,
                              30, "three all_types messages", process, interval=0.3)
    finally:
        assert process.terminate() == 0, process.log_text()[-3000:]

    warm = _warm_rows(url)
    published = {int(message.body["key"]["id"]): encode_row(message.body["data"]) for message in messages}
    assert published.keys() == warm.keys()
    for row_id in warm:
        assert published[row_id] == warm[row_id], f"row {row_id} differs"
    first = messages[0].body["data"]
    assert first["c_timestamptz"] == "2024-03-15T17:30:00.74137+00:00"
    assert first["c_date"] == "2024-03-15"
    assert first["c_numeric_array"] == ["1.50", "NaN"] or [str(x) for x in first["c_numeric_array"]] == ["1.50", "NaN"]
    assert messages[1].body["data"]["c_numeric_free"] == "NaN"
    assert messages[1].body["data"]["c_double"] == "-Infinity"
    assert messages[2].body["data"]["c_numeric_free"] is None
