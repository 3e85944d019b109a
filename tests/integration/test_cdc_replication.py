"""The streaming reader on its own: quoting into the replication grammar, and confirmation."""

from __future__ import annotations

import time

from ssmd.core.jsontext import loads
from ssmd.core.lsn import Lsn
from ssmd.core.tables import ColumnInfo, TableInfo
from ssmd.pg.replication import ReplicationStream, escape_table_filter, quote_literal
from tests.integration.cdc_support import run_sql, slot_state

ODD_TABLE = "it's, a.table*"


def test_escape_and_quote_rules():
    assert escape_table_filter("it's, a.table*") == "it\\'s\\,\\ a\\.table\\*"
    assert escape_table_filter("plain_name") == "plain_name"
    assert quote_literal("a'b") == "'a''b'"


async def _read_until(stream: ReplicationStream, predicate, timeout: float = 20) -> list[dict]:
    rows: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = await stream.read(0.5)
        rows.extend(loads(row) for row in batch.rows)
        if predicate(rows):
            return rows
    raise AssertionError(f"timed out; rows so far: {rows}")


def _commit_after_insert(rows: list[dict]) -> dict | None:
    actions = [row.get("action") for row in rows]
    if "I" not in actions or "C" not in actions[actions.index("I"):]:
        return None
    return rows[actions.index("C", actions.index("I"))]


async def test_stream_filters_odd_table_name(fresh_database, fresh_slot_name):
    url = fresh_database
    run_sql(url, f'CREATE TABLE "{ODD_TABLE}" (id int PRIMARY KEY, v text)', "CREATE TABLE other (id int PRIMARY KEY)",
            f"SELECT pg_create_logical_replication_slot('{fresh_slot_name}', 'wal2json')")
    # The catalog lookup splits names on '.', so the table is described by hand.
    table = TableInfo("public", ODD_TABLE, (ColumnInfo("id", "integer"), ColumnInfo("v", "text")), ("id",))
    stream = ReplicationStream(url, fresh_slot_name, [table])
    stream.start()
    try:
        run_sql(url, "INSERT INTO other VALUES (1)", f'INSERT INTO "{ODD_TABLE}" VALUES (7, \'x\')')
        rows = await _read_until(stream, lambda rows: _commit_after_insert(rows) is not None)
        commit = _commit_after_insert(rows)
        stream.confirm(Lsn.parse(commit["nextlsn"]))
        confirmed = None
        for _ in range(50):
            confirmed = slot_state(url, fresh_slot_name)[0]
            if confirmed == Lsn.parse(commit["nextlsn"]):
                break
            await _read_until(stream, lambda rows: True, timeout=0.2)
    finally:
        stream.close()

    changes = [row for row in rows if row.get("action") in ("I", "U", "D")]
    assert [row["table"] for row in changes] == [ODD_TABLE]
    assert confirmed == Lsn.parse(commit["nextlsn"])
