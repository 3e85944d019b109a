"""`ssmd cdc` on real servers: what reaches the stream for inserts, updates, deletes and marks."""

from __future__ import annotations

import pytest
import psycopg

from ssmd.core.jsontext import JsonNumber
from tests.integration.cdc_support import (
    MARKETS_SCHEMA, CdcProcess, changes, read_stream, run_sql, slot_state, wait_streaming, wait_until, stream_count,
)


@pytest.fixture
def cdc(ssmd_env, tmp_path):
    """Start `ssmd cdc` on the test's database; stop it with SIGTERM and expect exit 0."""
    run_sql(ssmd_env["DATABASE_URL"], MARKETS_SCHEMA)
    processes: list[CdcProcess] = []

    def start(*args: str, **extra_env: str) -> CdcProcess:
        process = CdcProcess(ssmd_env, tmp_path / "cdc.log", *args, extra_env=extra_env)
        processes.append(process)
        if "--poll" not in args:
            wait_streaming(ssmd_env["DATABASE_URL"], ssmd_env["REPLICATION_SLOT"], process)
        return process

    yield start
    for process in processes:
        if process.process.poll() is None:
            assert process.terminate() == 0, process.log_text()[-3000:]


def _wait_changes(env, count, process):
    return wait_until(lambda: len(changes(read_stream(env["NATS_URL"], env["NATS_STREAM"]))) >= count or None,
                      30, f"{count} change messages", process, interval=0.3)


def test_cdc_publishes_insert_update_delete(ssmd_env, cdc):
    process = cdc()
    url = ssmd_env["DATABASE_URL"]
    run_sql(url,
            "INSERT INTO markets VALUES ('TEST-1', 'EV-1', 'open', 12345678901234567890.123456789012345678, 9223372036854775807, 'n')",
            "UPDATE markets SET price = 0.0700 WHERE ticker = 'TEST-1'",
            "DELETE FROM markets WHERE ticker = 'TEST-1'")
    _wait_changes(ssmd_env, 3, process)

    messages = changes(read_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"]))
    assert [m.subject for m in messages] == ["cdc.markets.insert", "cdc.markets.update", "cdc.markets.delete"]
    insert, update, delete = (m.body for m in messages)
    assert insert["data"]["price"] == JsonNumber("12345678901234567890.123456789012345678")
    assert insert["data"]["volume"] == JsonNumber("9223372036854775807")
    assert b'"price":12345678901234567890.123456789012345678' in messages[0].data
    assert update["data"]["price"] == JsonNumber("0.0700")
    assert delete["key"] == {"ticker": "TEST-1"}
    assert "data" not in delete
    for message in messages:
        assert message.msg_id == f"{message.body['lsn']}:{message.body['seq']}"
