"""`ssmd cdc` under faults: crashes around PubAcks, lost PubAcks, restarts and server outages.

The crash tests use the test-only hook SSMD_FAULT_EXIT_AFTER_ACKS=N (the daemon sends itself
SIGKILL right after its N-th PubAck of a change, before it can confirm the slot),
SSMD_FAULT_EXIT_AT (the same SIGKILL at a step of creating the slot), or a SIGKILL from the
test while NATS is down.
"""

from __future__ import annotations

import asyncio

import nats
import psycopg
import pytest

from ssmd.core.lsn import Lsn
from ssmd.dev.servers import free_port
from ssmd.cdc.daemon import FAULT_EXIT_CODE
from tests.integration.cdc_support import (
    MARKETS_SCHEMA, CdcProcess, announcements, changes, read_metric, read_stream, run_sql, slot_state, stream_count,
    wait_announced, wait_streaming, wait_until,
)

THREE_CHANGES = (
    "BEGIN; INSERT INTO markets VALUES ('TEST-1', 'EV-1', 'open', 1, 1, NULL), ('TEST-2', 'EV-1', 'open', 2, 2, NULL); "
    "UPDATE markets SET status = 'halted' WHERE ticker = 'TEST-1'; COMMIT"
)


@pytest.fixture
def env(ssmd_env):
    run_sql(ssmd_env["DATABASE_URL"], MARKETS_SCHEMA)
    return ssmd_env


def _start(env, tmp_path, *args, **extra_env) -> CdcProcess:
    process = CdcProcess(env, tmp_path / "cdc.log", *args, extra_env=extra_env)
    if "--poll" in args:
        # A polling daemon is the slot's active process only during a peek. The slot_created
        # message is published once the slot and the stream exist.
        wait_until(lambda: stream_count(env["NATS_URL"], env["NATS_STREAM"]) > 0, 30, "the slot_created message", process, interval=0.2)
    else:
        wait_streaming(env["DATABASE_URL"], env["REPLICATION_SLOT"], process)
    return process


def _changes(env):
    return changes(read_stream(env["NATS_URL"], env["NATS_STREAM"]))


def _wait_changes(env, count, process):
    return wait_until(lambda: (found := _changes(env)) and len(found) >= count and found, 30, f"{count} changes", process, interval=0.3)


def _confirmed(env) -> Lsn:
    return slot_state(env["DATABASE_URL"], env["REPLICATION_SLOT"])[0]


def _assert_one_copy_each(messages):
    ids = [message.msg_id for message in messages]
    assert len(ids) == len(set(ids)), f"duplicate message ids in the stream: {ids}"


@pytest.mark.parametrize("mode", [(), ("--poll", "--poll-interval-ms", "100")], ids=["stream", "poll"])
def test_crash_after_two_of_three_acks(env, tmp_path, mode):
    process = _start(env, tmp_path, *mode, SSMD_FAULT_EXIT_AFTER_ACKS="2")
    run_sql(env["DATABASE_URL"], THREE_CHANGES)
    assert process.wait(30) == FAULT_EXIT_CODE, process.log_text()[-3000:]

    stored = _changes(env)
    assert 2 <= len(stored) <= 3  # the third publish may have reached the stream before the exit
    commit_lsn = Lsn.parse(stored[0].body["lsn"])
    assert _confirmed(env) <= commit_lsn

    process = _start(env, tmp_path, *mode)
    messages = _wait_changes(env, 3, process)
    wait_until(lambda: _confirmed(env) > commit_lsn, 30, "slot confirmed past the transaction", process)
    assert process.terminate() == 0

    assert len(messages) == 3
    _assert_one_copy_each(messages)
    assert [m.msg_id for m in messages] == [f"{commit_lsn}:0", f"{commit_lsn}:1", f"{commit_lsn}:2"]


def test_crash_before_any_ack(env, tmp_path, nats_server):
    process = _start(env, tmp_path)
    nats_server.stop()
    try:
        run_sql(env["DATABASE_URL"], THREE_CHANGES)
        wait_until(lambda: "publish failed, retrying" in process.log_text(), 30, "a failed publish", process)
        process.kill()
        confirmed_at_kill = _confirmed(env)
    finally:
        nats_server.restart()

    process = _start(env, tmp_path)
    messages = _wait_changes(env, 3, process)
    assert process.terminate() == 0
    # Idle keepalives may have moved the slot before the transaction, never past its commit.
    assert confirmed_at_kill <= Lsn.parse(messages[0].body["lsn"])
    assert [int(m.body["seq"]) for m in messages] == [0, 1, 2]
    _assert_one_copy_each(messages)
    assert _confirmed(env) > Lsn.parse(messages[0].body["lsn"])


def test_restart_replays_and_stream_dedupes(env, tmp_path):
    # Exiting right after the last PubAck leaves the slot unconfirmed, so the restart replays all.
    process = _start(env, tmp_path, SSMD_FAULT_EXIT_AFTER_ACKS="3")
    run_sql(env["DATABASE_URL"], THREE_CHANGES)
    assert process.wait(30) == FAULT_EXIT_CODE
    first = _changes(env)
    assert len(first) == 3
    commit_lsn = Lsn.parse(first[0].body["lsn"])
    assert _confirmed(env) <= commit_lsn

    process = _start(env, tmp_path)
    wait_until(lambda: _confirmed(env) > commit_lsn, 30, "slot confirmed after the replay", process)
    assert process.terminate() == 0

    again = _changes(env)
    assert [(m.seq, m.msg_id, m.data) for m in again] == [(m.seq, m.msg_id, m.data) for m in first]


def test_lost_pub_ack_is_retried_once_stored(env, tmp_path):
    port = free_port()
    process = _start(env, tmp_path, "--metrics-port", str(port), SSMD_FAULT_DROP_ACKS="2")
    run_sql(env["DATABASE_URL"], THREE_CHANGES)
    messages = _wait_changes(env, 3, process)
    commit_lsn = Lsn.parse(messages[0].body["lsn"])
    wait_until(lambda: _confirmed(env) > commit_lsn, 30, "slot confirmed after the retries", process)
    # The dropped PubAcks were for stored messages, so each retry is acknowledged as a duplicate.
    wait_until(lambda: read_metric(port, "ssmd_cdc_publish_duplicates_total") >= 1, 10, "the duplicate counter", process)
    assert process.terminate() == 0

    assert len(_changes(env)) == 3
    _assert_one_copy_each(_changes(env))
    # Two dropped PubAcks are two failed attempts, either of two messages (two warnings) or of
    # one message twice (one warning, because later attempts of a message log at DEBUG).
    assert 1 <= process.log_text().count("retrying with the same id") <= 2


def test_replay_from_older_position_is_identical(env, tmp_path, pg_server):
    # A copy of the slot taken before any change replays the same transactions later.
    url = env["DATABASE_URL"]
    process = _start(env, tmp_path)
    copy_slot = env["REPLICATION_SLOT"][:40] + "_copy"
    run_sql(url, f"SELECT pg_copy_logical_replication_slot('{env['REPLICATION_SLOT']}', '{copy_slot}')")
    run_sql(url, THREE_CHANGES, "DELETE FROM markets WHERE ticker = 'TEST-2'")
    first = _wait_changes(env, 4, process)
    assert process.terminate() == 0
    asyncio.run(_delete_stream(env["NATS_URL"], env["NATS_STREAM"]))

    process = _start({**env, "REPLICATION_SLOT": copy_slot}, tmp_path)
    replayed = _wait_changes(env, 4, process)
    assert process.terminate() == 0

    assert [(m.msg_id, m.subject, m.data) for m in replayed] == [(m.msg_id, m.subject, m.data) for m in first]


def test_sigterm_confirms_what_is_acknowledged(env, tmp_path):
    process = _start(env, tmp_path, "--status-interval", "600")
    run_sql(env["DATABASE_URL"], THREE_CHANGES)
    messages = _wait_changes(env, 3, process)
    assert process.terminate() == 0

    assert _confirmed(env) > Lsn.parse(messages[0].body["lsn"])
    log = process.log_text()
    assert "stopping after confirming what is acknowledged" in log
    assert "ssmd cdc stopped" in log


def test_sigterm_while_nats_is_down(env, tmp_path, nats_server):
    process = _start(env, tmp_path, "--max-in-flight", "2")
    nats_server.stop()
    try:
        run_sql(env["DATABASE_URL"], THREE_CHANGES)
        wait_until(lambda: "publish failed, retrying" in process.log_text(), 30, "a failed publish", process)
        assert process.terminate(timeout=40) == 0, process.log_text()[-3000:]
        confirmed_at_stop = _confirmed(env)
    finally:
        nats_server.restart()

    process = _start(env, tmp_path)
    messages = _wait_changes(env, 3, process)
    assert process.terminate() == 0
    assert confirmed_at_stop <= Lsn.parse(messages[0].body["lsn"])
    assert len(messages) == 3
    _assert_one_copy_each(messages)


def test_reconnects_after_postgres_restart(env, tmp_path, pg_server):
    process = _start(env, tmp_path)
    run_sql(env["DATABASE_URL"], "INSERT INTO markets VALUES ('TEST-1', 'EV-1', 'open', 1, 1, NULL)")
    _wait_changes(env, 1, process)
    pg_server.restart()
    run_sql(env["DATABASE_URL"], "INSERT INTO markets VALUES ('TEST-2', 'EV-1', 'open', 1, 1, NULL)")
    messages = _wait_changes(env, 2, process)
    assert process.terminate() == 0

    assert [m.body["key"]["ticker"] for m in messages] == ["TEST-1", "TEST-2"]
    assert "session failed, reconnecting" in process.log_text()


def test_reconnects_after_nats_restart(env, tmp_path, nats_server):
    process = _start(env, tmp_path)
    run_sql(env["DATABASE_URL"], "INSERT INTO markets VALUES ('TEST-1', 'EV-1', 'open', 1, 1, NULL)")
    _wait_changes(env, 1, process)
    nats_server.restart()
    run_sql(env["DATABASE_URL"], "INSERT INTO markets VALUES ('TEST-2', 'EV-1', 'open', 1, 1, NULL)")
    messages = _wait_changes(env, 2, process)
    assert process.terminate() == 0

    assert [m.body["key"]["ticker"] for m in messages] == ["TEST-1", "TEST-2"]


async def _delete_stream(url: str, name: str) -> None:
    client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        await client.jetstream().delete_stream(name)
    finally:
        await client.close()


def _slot_names(env) -> list[str]:
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        return [row[0] for row in conn.execute("SELECT slot_name FROM pg_replication_slots ORDER BY slot_name")]


def test_crash_before_slot_announced(env, tmp_path):
    # An announcement of an earlier slot with the same name is in the stream, as after an
    # operator dropped the slot. The new slot must still be announced, at its own point.
    process = _start(env, tmp_path)
    wait_announced(env, process)
    assert process.terminate() == 0
    run_sql(env["DATABASE_URL"], f"SELECT pg_drop_replication_slot('{env['REPLICATION_SLOT']}')")
    old_point = Lsn.parse(announcements(env["NATS_URL"], env["NATS_STREAM"])[0].body["consistent_point"])

    crashed = CdcProcess(env, tmp_path / "cdc.log", extra_env={"SSMD_FAULT_EXIT_AT": "slot-created"})
    assert crashed.wait(30) == FAULT_EXIT_CODE, crashed.log_text()[-3000:]
    new_point = _confirmed(env)
    assert new_point > old_point
    assert len(announcements(env["NATS_URL"], env["NATS_STREAM"])) == 1
    run_sql(env["DATABASE_URL"], THREE_CHANGES)

    process = _start(env, tmp_path)
    announced = wait_announced(env, process, count=2)
    messages = _wait_changes(env, 3, process)
    assert process.terminate() == 0

    assert len(announced) == 2
    assert announced[1].body == {"slot": env["REPLICATION_SLOT"], "consistent_point": str(new_point)}
    assert announced[1].seq < messages[0].seq  # announced before the slot's first change
    assert [int(m.body["seq"]) for m in messages] == [0, 1, 2]


def test_crash_before_slot_exists(env, tmp_path):
    # The announcement is written, but the process dies before the permanent slot exists: the
    # temporary staging slot dies with the session, and the next start creates the slot anew.
    crashed = CdcProcess(env, tmp_path / "cdc.log", extra_env={"SSMD_FAULT_EXIT_AT": "slot-staged"})
    assert crashed.wait(30) == FAULT_EXIT_CODE, crashed.log_text()[-3000:]
    wait_until(lambda: _slot_names(env) == [], 30, "the staging slot to disappear")

    process = _start(env, tmp_path)
    announced = wait_announced(env, process)
    run_sql(env["DATABASE_URL"], THREE_CHANGES)
    _wait_changes(env, 3, process)
    assert process.terminate() == 0

    assert _slot_names(env) == [env["REPLICATION_SLOT"]]
    assert len(announced) == 1
    assert announced[0].body["slot"] == env["REPLICATION_SLOT"]

