"""`ssmd cdc` start-up checks: one line naming the problem and the fix, non-zero exit, no traceback."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import psycopg
import pytest

from ssmd.pg.checks import classify_plugin_error
from ssmd.core.errors import ConfigError
from ssmd.dev.servers import PostgresServer
from tests.integration.cdc_support import MARKETS_SCHEMA, CdcProcess, run_sql, wait_streaming


@pytest.fixture
def env(ssmd_env):
    run_sql(ssmd_env["DATABASE_URL"], MARKETS_SCHEMA)
    return ssmd_env


def _error_line(env, tmp_path, **overrides) -> str:
    """Run `ssmd cdc` expecting a start-up error; return its only output line."""
    process = CdcProcess({**env, **overrides}, tmp_path / "cdc.log", extra_env={"LOG_LEVEL": "WARNING"})
    code = process.wait(60)
    output = process.log_text()
    assert code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("ssmd cdc: error: ")
    return lines[0]


def test_check_missing_table(env, tmp_path):
    line = _error_line(env, tmp_path, CDC_TABLES="markets,nope")
    assert "public.nope does not exist" in line
    assert "CDC_TABLES" in line


def test_check_table_without_key(env, tmp_path):
    run_sql(env["DATABASE_URL"], "CREATE TABLE no_key (a int, b text)")
    line = _error_line(env, tmp_path, CDC_TABLES="markets,no_key")
    assert "public.no_key has no primary key" in line
    assert "ADD PRIMARY KEY" in line


def test_check_replica_identity_nothing(env, tmp_path):
    run_sql(env["DATABASE_URL"], "ALTER TABLE events REPLICA IDENTITY NOTHING")
    line = _error_line(env, tmp_path)
    assert "public.events" in line


def test_check_slot_of_other_plugin(env, tmp_path):
    run_sql(env["DATABASE_URL"], f"SELECT pg_create_logical_replication_slot('{env['REPLICATION_SLOT']}', 'test_decoding')")
    line = _error_line(env, tmp_path)
    assert "uses plugin test_decoding, not wal2json" in line
    assert "REPLICATION_SLOT" in line


def test_check_slot_in_use(env, tmp_path):
    first = CdcProcess(env, tmp_path / "first.log")
    try:
        wait_streaming(env["DATABASE_URL"], env["REPLICATION_SLOT"], first)
        line = _error_line(env, tmp_path)
    finally:
        assert first.terminate() == 0
    assert "is in use by server process" in line
    assert "stop the other ssmd cdc" in line


def test_check_replication_privilege(env, tmp_path):
    run_sql(env["DATABASE_URL"], "CREATE ROLE plain_user LOGIN NOREPLICATION",
            "GRANT SELECT ON ALL TABLES IN SCHEMA public TO plain_user")
    try:
        url = env["DATABASE_URL"].replace("postgres@", "plain_user@", 1)
        line = _error_line(env, tmp_path, DATABASE_URL=url)
    finally:
        run_sql(env["DATABASE_URL"], "DROP OWNED BY plain_user", "DROP ROLE plain_user")
    assert "user plain_user lacks the REPLICATION privilege" in line
    assert "ALTER ROLE plain_user REPLICATION" in line


def test_check_invalid_slot_name(env, tmp_path):
    line = _error_line(env, tmp_path, REPLICATION_SLOT="Bad-Name")
    assert "invalid REPLICATION_SLOT 'Bad-Name'" in line


def test_check_missing_plugin_message(env):
    # The server's wal2json cannot be removed here, so the classifier gets the real error that
    # PostgreSQL raises for a missing output plugin library of another name containing "wal2json".
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as raised:
            conn.execute("SELECT pg_create_logical_replication_slot('missing_plugin', 'wal2json_not_installed')")
    error = classify_plugin_error(raised.value, "missing_plugin")
    assert isinstance(error, ConfigError)
    assert "output plugin is not installed" in str(error)
    assert "apt-get install postgresql-15-wal2json" in str(error)


def test_check_wal_level(tmp_path):
    root = Path(tempfile.mkdtemp(prefix="ssmd-wal-level-", dir="/tmp"))
    root.chmod(0o755)
    server = PostgresServer.start(root, die_with_parent=True)
    try:
        run_sql(server.url, "ALTER SYSTEM SET wal_level = 'replica'")
        server.restart()
        run_sql(server.url, MARKETS_SCHEMA)
        line = _error_line({"DATABASE_URL": server.url, "NATS_URL": "nats://127.0.0.1:1", "REPLICATION_SLOT": "wal_level_check",
                            "NATS_STREAM": "UNUSED"}, tmp_path)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
    assert "wal_level is 'replica'" in line
    assert "wal_level = logical" in line
