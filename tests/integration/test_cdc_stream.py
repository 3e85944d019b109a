"""`ssmd cdc` on real servers: what reaches the stream for inserts, updates, deletes and marks."""

from __future__ import annotations

import asyncio
import os
import urllib.request

import nats
import psycopg
import pytest

from ssmd.bus.stream import StreamLimits, ensure_stream, read_stream_state
from ssmd.core.jsontext import JsonNumber
from ssmd.core.lsn import Lsn
from ssmd.dev.servers import free_port
from tests.integration.cdc_support import (
    MARKETS_SCHEMA, CdcProcess, changes, current_wal_lsn, read_metric, read_stream, run_sql, slot_state, wait_announced,
    wait_streaming, wait_until,
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


def test_cdc_key_change_carries_old_key(ssmd_env, cdc):
    process = cdc()
    url = ssmd_env["DATABASE_URL"]
    run_sql(url, "INSERT INTO markets VALUES ('TEST-1', 'EV-1', 'open', 1.5, 10, 'n')",
            "UPDATE markets SET ticker = 'TEST-1B' WHERE ticker = 'TEST-1'")
    _wait_changes(ssmd_env, 2, process)

    update = changes(read_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"]))[1].body
    assert update["op"] == "update"
    assert update["key"] == {"ticker": "TEST-1B"}
    assert update["old_key"] == {"ticker": "TEST-1"}
    assert update["data"]["status"] == "open"
    assert update["data"]["price"] == JsonNumber("1.5")


def test_cdc_full_identity_delete_uses_pk(ssmd_env, cdc):
    url = ssmd_env["DATABASE_URL"]
    process = cdc()
    run_sql(url, "ALTER TABLE series_fees REPLICA IDENTITY FULL",
            "INSERT INTO series_fees VALUES ('S1', '2024-01-01', 0.5), ('S1', '2024-02-01', 0.6)",
            "DELETE FROM series_fees WHERE effective_from = '2024-02-01'")
    _wait_changes(ssmd_env, 3, process)

    delete = changes(read_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"]))[2]
    assert delete.subject == "cdc.series_fees.delete"
    assert delete.body["key"] == {"series_ticker": "S1", "effective_from": "2024-02-01"}


def test_cdc_interleaved_transactions_use_commit_order(ssmd_env, cdc):
    process = cdc()
    url = ssmd_env["DATABASE_URL"]
    run_sql(url, "INSERT INTO markets VALUES ('TEST-1', 'EV-1', 'open', 1, 1, NULL), ('TEST-2', 'EV-1', 'open', 1, 1, NULL)")
    with psycopg.connect(url) as session_a, psycopg.connect(url, autocommit=True) as session_b:
        session_a.execute("UPDATE markets SET status = 'a' WHERE ticker = 'TEST-1'")
        session_b.execute("UPDATE markets SET status = 'b' WHERE ticker = 'TEST-2'")
        session_a.commit()
    _wait_changes(ssmd_env, 4, process)

    messages = changes(read_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"]))
    update_b, update_a = messages[2].body, messages[3].body
    assert update_b["key"] == {"ticker": "TEST-2"}
    assert update_a["key"] == {"ticker": "TEST-1"}
    assert Lsn.parse(update_a["lsn"]) > Lsn.parse(update_b["lsn"])
    assert update_a["data"]["status"] == "a"


def test_cdc_fills_unchanged_toast(ssmd_env, cdc):
    process = cdc()
    url = ssmd_env["DATABASE_URL"]
    notes = os.urandom(6000).hex()  # 12 KB of hex digits: compresses poorly, stored out of line
    run_sql(url, "ALTER TABLE markets ALTER COLUMN notes SET STORAGE EXTERNAL",
            f"INSERT INTO markets VALUES ('TEST-1', 'EV-1', 'open', 1, 1, '{notes}')",
            "UPDATE markets SET status = 'closed' WHERE ticker = 'TEST-1'")
    _wait_changes(ssmd_env, 2, process)
    run_sql(url, "UPDATE markets SET notes = NULL WHERE ticker = 'TEST-1'")
    _wait_changes(ssmd_env, 3, process)

    insert, update, cleared = (m.body for m in changes(read_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"])))
    assert insert["data"]["notes"] == notes
    assert update["data"]["status"] == "closed"
    assert update["data"]["notes"] == notes
    assert "unchanged" not in update
    assert cleared["data"]["notes"] is None
    assert "unchanged" not in cleared


def test_cdc_lists_unfillable_toast(ssmd_env, cdc):
    process = cdc()
    url = ssmd_env["DATABASE_URL"]
    notes = os.urandom(6000).hex()
    # wal2json sends a transaction only after its commit, so the row is gone before the
    # publisher can re-read it and `notes` cannot be filled in.
    with psycopg.connect(url) as conn:
        conn.execute("ALTER TABLE markets ALTER COLUMN notes SET STORAGE EXTERNAL")
        conn.execute(f"INSERT INTO markets VALUES ('TEST-1', 'EV-1', 'open', 1, 1, '{notes}')")
        conn.commit()
        conn.execute("UPDATE markets SET status = 'closed' WHERE ticker = 'TEST-1'")
        conn.execute("DELETE FROM markets WHERE ticker = 'TEST-1'")
        conn.commit()
    _wait_changes(ssmd_env, 3, process)

    update = changes(read_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"]))[1].body
    assert update["unchanged"] == ["notes"]
    assert "notes" not in update["data"]
    assert update["data"]["status"] == "closed"


def test_cdc_fills_toast_from_full_identity(ssmd_env, cdc):
    process = cdc()
    url = ssmd_env["DATABASE_URL"]
    notes = os.urandom(6000).hex()
    run_sql(url, "ALTER TABLE markets ALTER COLUMN notes SET STORAGE EXTERNAL", "ALTER TABLE markets REPLICA IDENTITY FULL",
            f"INSERT INTO markets VALUES ('TEST-1', 'EV-1', 'open', 1, 1, '{notes}')",
            "UPDATE markets SET status = 'closed' WHERE ticker = 'TEST-1'",
            "DELETE FROM markets WHERE ticker = 'TEST-1'")
    _wait_changes(ssmd_env, 3, process)

    update = changes(read_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"]))[1].body
    assert update["data"]["notes"] == notes
    assert "unchanged" not in update


def test_cdc_resolves_nan_and_null(ssmd_env, cdc):
    process = cdc()
    url = ssmd_env["DATABASE_URL"]
    run_sql(url, "INSERT INTO series_fees VALUES ('S1', '2024-01-01', 'NaN'), ('S2', '2024-01-01', NULL), ('S3', '2024-01-01', 'Infinity')")
    _wait_changes(ssmd_env, 3, process)

    fees = {m.body["key"]["series_ticker"]: m.body["data"]["fee"] for m in changes(read_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"]))}
    assert fees == {"S1": "NaN", "S2": None, "S3": "Infinity"}


def test_cdc_forwards_marks(ssmd_env, cdc):
    process = cdc("--heartbeat-interval", "1")
    url = ssmd_env["DATABASE_URL"]
    run_sql(url, "SELECT pg_logical_emit_message(true, 'ssmd', 'fence-1')",
            "SELECT pg_logical_emit_message(true, 'other', 'ignored')")

    def read_marks():
        marks = read_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"], "cdc._ssmd.mark")
        return marks if any(m.body["content"] == "heartbeat" for m in marks) else None

    marks = wait_until(read_marks, 30, "a fence mark and a heartbeat mark", process, interval=0.3)

    fence = marks[0].body
    assert fence["content"] == "fence-1"
    assert fence["prefix"] == "ssmd"
    assert fence["transactional"] is True
    assert all(m.body["prefix"] == "ssmd" for m in marks)
    heartbeat = next(m.body for m in marks if m.body["content"] == "heartbeat")
    # The heartbeat's commit moved the slot: confirmed position passes the mark's commit LSN.
    wait_until(lambda: (slot_state(url, ssmd_env["REPLICATION_SLOT"])[0] or Lsn(0)) > Lsn.parse(heartbeat["lsn"]),
               30, "slot confirmed past the heartbeat", process)


def test_cdc_announces_slot_creation(ssmd_env, cdc):
    process = cdc()
    announced = wait_announced(ssmd_env, process)
    run_sql(ssmd_env["DATABASE_URL"], "INSERT INTO markets VALUES ('TEST-1', 'EV-1', 'open', 1, 1, NULL)")
    _wait_changes(ssmd_env, 1, process)
    messages = read_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"])

    assert len(announced) == 1
    assert announced[0].body["slot"] == ssmd_env["REPLICATION_SLOT"]
    assert announced[0].msg_id == f"slot_created:{ssmd_env['REPLICATION_SLOT']}:{announced[0].body['consistent_point']}"
    point = Lsn.parse(announced[0].body["consistent_point"])
    assert point <= slot_state(ssmd_env["DATABASE_URL"], ssmd_env["REPLICATION_SLOT"])[0]
    assert [m.subject for m in messages] == ["cdc._ssmd.slot_created", "cdc.markets.insert"]
    assert "created replication slot" in process.log_text()
    # The staging slot that carried the announcement is gone.
    with psycopg.connect(ssmd_env["DATABASE_URL"], autocommit=True) as conn:
        slots = [row[0] for row in conn.execute("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s", (ssmd_env["REPLICATION_SLOT"][:54] + "%",))]
    assert slots == [ssmd_env["REPLICATION_SLOT"]]


def test_cdc_polling_mode(ssmd_env, cdc):
    process = cdc("--poll", "--poll-interval-ms", "100")
    url = ssmd_env["DATABASE_URL"]
    wait_until(lambda: slot_state(url, ssmd_env["REPLICATION_SLOT"])[0] is not None, 30, "slot creation", process)
    run_sql(url, "INSERT INTO markets VALUES ('TEST-1', 'EV-1', 'open', 1, 1, NULL)",
            "UPDATE markets SET status = 'halted' WHERE ticker = 'TEST-1'")
    _wait_changes(ssmd_env, 2, process)
    end = current_wal_lsn(url)

    messages = changes(read_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"]))
    assert [m.subject for m in messages] == ["cdc.markets.insert", "cdc.markets.update"]
    wait_until(lambda: slot_state(url, ssmd_env["REPLICATION_SLOT"])[0] >= Lsn.parse(messages[1].body["lsn"]),
               30, "slot advanced past the update", process)
    assert slot_state(url, ssmd_env["REPLICATION_SLOT"])[0] <= end


def test_cdc_metrics_and_readiness(ssmd_env, cdc):
    port = free_port()
    process = cdc("--metrics-port", str(port))
    run_sql(ssmd_env["DATABASE_URL"], "INSERT INTO markets VALUES ('TEST-1', 'EV-1', 'open', 1, 1, NULL)")
    _wait_changes(ssmd_env, 1, process)

    base = f"http://127.0.0.1:{port}"
    assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
    assert urllib.request.urlopen(base + "/readyz", timeout=5).status == 200

    wait_until(lambda: read_metric(port, "ssmd_cdc_changes_published_total") >= 1, 10, "the published counter", process)
    assert read_metric(port, "ssmd_cdc_changes_read_total") >= 1
    assert read_metric(port, "ssmd_cdc_transactions_total") >= 1
    assert read_metric(port, "ssmd_cdc_publish_latency_seconds_count") >= 1
    wait_until(lambda: read_metric(port, "ssmd_cdc_confirmed_lsn") > 0, 10, "the confirmed LSN gauge", process)


def test_cdc_publishes_truncate(ssmd_env, cdc):
    process = cdc()
    run_sql(ssmd_env["DATABASE_URL"], "INSERT INTO events VALUES ('EV-1', 'first')", "TRUNCATE events, markets")
    _wait_changes(ssmd_env, 3, process)

    messages = changes(read_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"]))
    truncates = [m for m in messages if m.body["op"] == "truncate"]
    assert sorted(m.subject for m in truncates) == ["cdc.events.truncate", "cdc.markets.truncate"]
    assert all("data" not in m.body for m in truncates)
    assert len({m.body["lsn"] for m in truncates}) == 1


def test_cdc_reannounces_slot_to_new_stream(ssmd_env, cdc):
    first = cdc()
    wait_announced(ssmd_env, first)  # the slot is then confirmed past its own announcement
    assert first.terminate() == 0
    confirmed = slot_state(ssmd_env["DATABASE_URL"], ssmd_env["REPLICATION_SLOT"])[0]
    asyncio.run(_delete_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"]))

    second = cdc()
    announced = wait_announced(ssmd_env, second)
    assert len(announced) == 1
    assert Lsn.parse(announced[0].body["consistent_point"]) == confirmed


async def _delete_stream(url: str, name: str) -> None:
    client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        await client.jetstream().delete_stream(name)
    finally:
        await client.close()


def test_cdc_never_logs_password(ssmd_env, tmp_path):
    # The throwaway server trusts 127.0.0.1, so it accepts and ignores these passwords.
    url = ssmd_env["DATABASE_URL"].replace("postgres@", "postgres:pg-secret-1@", 1)
    run_sql(url, MARKETS_SCHEMA)
    env = {**ssmd_env, "DATABASE_URL": url}
    process = CdcProcess(env, tmp_path / "cdc.log", extra_env={"LOG_LEVEL": "DEBUG", "NATS_PASSWORD": "nats-secret-2", "NATS_USER": "someone"})
    try:
        wait_until(lambda: "ssmd cdc starting" in process.log_text() or None, 30, "the start log line", process)
    finally:
        process.terminate()

    log = process.log_text()
    assert "pg-secret-1" not in log
    assert "nats-secret-2" not in log
    assert "postgres:***@" in log


async def test_stream_created_then_updated(nats_server, fresh_stream_name):
    client = await nats.connect(nats_server.url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = client.jetstream()
        created = await ensure_stream(js, fresh_stream_name, StreamLimits(max_messages=100, duplicate_window_s=60))
        await js.publish("cdc.markets.insert", b"{}", headers={"Nats-Msg-Id": "0/1:0"})
        await js.publish("cdc.markets.insert", b"{}", headers={"Nats-Msg-Id": "0/1:0"})
        updated = await ensure_stream(js, fresh_stream_name, StreamLimits(max_messages=50, max_age_s=3600, duplicate_window_s=30))
        config = (await js.stream_info(fresh_stream_name)).config
        state = await read_stream_state(js, fresh_stream_name)
        missing = await read_stream_state(js, fresh_stream_name + "_NONE")
    finally:
        await client.close()

    assert created.last_seq == 0
    assert config.subjects == ["cdc.>"]
    assert config.max_msgs == 50
    assert config.max_age == 3600
    assert config.duplicate_window == 30
    assert config.discard == "old"
    assert config.storage == "file"
    assert updated.created == created.created
    assert state.first_seq == 1
    assert state.last_seq == 1
    assert state.messages == 1
    assert state.created is not None
    assert missing is None
