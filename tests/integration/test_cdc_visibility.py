"""A re-read waits until the change's transaction is visible to new snapshots.

PostgreSQL flushes a commit record, so the walsender can decode it, before the committing
backend leaves the process array. A synchronous-replication wait for a standby that never
comes keeps a committed transaction in that state, which makes the gap easy to hold open.
"""

from __future__ import annotations

import threading
import time

import psycopg
import pytest

from ssmd.dev.servers import PostgresServer
from tests.integration.cdc_support import MARKETS_SCHEMA, CdcProcess, changes, read_stream, run_sql, wait_streaming


@pytest.fixture
def own_pg(stack_root):
    # synchronous_standby_names is a server-wide setting, so this test gets a server of its own.
    directory = stack_root / "pg-visibility"
    directory.mkdir(mode=0o755)
    server = PostgresServer.start(directory, die_with_parent=True)
    yield server
    server.stop()


def _commit_in_background(url: str, statement: str) -> tuple[threading.Thread, list[int]]:
    backend: list[int] = []

    def commit() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            backend.append(conn.info.backend_pid)
            try:
                conn.execute(statement)
            except psycopg.Error:
                pass  # the cancel below ends the synchronous-replication wait with a warning

    thread = threading.Thread(target=commit, daemon=True)
    thread.start()
    return thread, backend


def test_nan_reread_waits_for_visibility(own_pg, nats_server, fresh_stream_name, fresh_slot_name, tmp_path):
    url = own_pg.create_database("visibility")
    run_sql(url, MARKETS_SCHEMA, "INSERT INTO markets VALUES ('M1', 'E1', 'open', 1.5, 10, 'n')")
    env = {"DATABASE_URL": url, "NATS_URL": nats_server.url, "NATS_STREAM": fresh_stream_name, "REPLICATION_SLOT": fresh_slot_name}
    cdc = CdcProcess(env, tmp_path / "cdc.log", "--heartbeat-interval", "0")
    try:
        wait_streaming(url, fresh_slot_name, cdc)
        run_sql(url, "ALTER SYSTEM SET synchronous_standby_names = 'absent_standby'", "SELECT pg_reload_conf()")
        time.sleep(0.5)
        thread, backend = _commit_in_background(url, "UPDATE markets SET price = 'NaN' WHERE ticker = 'M1'")
        time.sleep(3)  # the commit record is flushed and decoded, but the transaction is not visible

        early = [m for m in changes(read_stream(nats_server.url, fresh_stream_name)) if m.body["op"] == "update"]
        assert early == [], "published before the transaction was visible"

        run_sql(url, f"SELECT pg_cancel_backend({backend[0]})")
        thread.join(10)
        deadline = time.monotonic() + 20
        updates = []
        while time.monotonic() < deadline and not updates:
            updates = [m for m in changes(read_stream(nats_server.url, fresh_stream_name)) if m.body["op"] == "update"]
            time.sleep(0.2)
        assert len(updates) == 1, cdc.log_text()[-2000:]
        assert updates[0].body["data"]["price"] == "NaN"
    finally:
        run_sql(url, "ALTER SYSTEM RESET synchronous_standby_names", "SELECT pg_reload_conf()")
        cdc.terminate()
