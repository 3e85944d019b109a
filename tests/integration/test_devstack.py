"""The throwaway servers, the per-test fixtures, `ssmd dev up/down`, sample data and workload."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nats
import psycopg
import pytest
import redis

from ssmd.dev.sample import load_sample
from ssmd.dev.servers import PostgresServer, RedisServer, pid_alive
from ssmd.dev.workload import Workload, run_workload


def test_postgres_creates_wal2json_slot(fresh_database, fresh_slot_name):
    with psycopg.connect(fresh_database, autocommit=True) as connection:
        assert connection.execute("SHOW wal_level").fetchone()[0] == "logical"
        connection.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        connection.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (fresh_slot_name,))
        connection.execute("INSERT INTO t VALUES (1, 'a')")
        rows = connection.execute(
            "SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, 'format-version', '2')",
            (fresh_slot_name,),
        ).fetchall()

    actions = [row[0] for row in rows]
    assert any('"action":"I"' in action and '"table":"t"' in action for action in actions), actions


def test_postgres_listens_on_loopback_only(pg_server):
    with psycopg.connect(pg_server.dsn) as connection:
        assert connection.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
        assert connection.execute("SHOW max_replication_slots").fetchone()[0] == "16"
        assert connection.execute("SHOW fsync").fetchone()[0] == "off"


def test_fresh_database_dropped_with_its_slot(pg_server, request):
    name = "t_drop_check"
    url = pg_server.create_database(name)
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SELECT pg_create_logical_replication_slot('drop_check_slot', 'wal2json')")

    pg_server.drop_database(name)

    with psycopg.connect(pg_server.dsn) as connection:
        assert connection.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone()[0] == 0
        assert connection.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'drop_check_slot'").fetchone()[0] == 0


async def test_nats_has_jetstream(nats_server, fresh_stream_name):
    client = await nats.connect(nats_server.url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        jetstream = client.jetstream()
        info = await jetstream.account_info()
        await jetstream.add_stream(name=fresh_stream_name, subjects=["cdc.>"])
        ack = await jetstream.publish("cdc.t.insert", b"{}", headers={"Nats-Msg-Id": "0/1:0"})
    finally:
        await client.close()

    assert info.limits is not None
    assert ack.stream == fresh_stream_name
    assert ack.seq == 1


async def test_fresh_stream_deleted_after_test(nats_server, fresh_stream_name):
    # The previous test created a stream on `cdc.>`; JetStream rejects overlapping subjects, so
    # this add succeeds only if the fixture deleted that stream.
    client = await nats.connect(nats_server.url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        jetstream = client.jetstream()
        info = await jetstream.add_stream(name=fresh_stream_name, subjects=["cdc.>"])
        streams = await jetstream.streams_info()
    finally:
        await client.close()

    assert info.config.name == fresh_stream_name
    assert [stream.config.name for stream in streams] == [fresh_stream_name]


def test_redis_answers_ping(redis_db):
    with redis.Redis.from_url(redis_db) as client:
        assert client.ping() is True
        assert client.dbsize() == 0
        client.set("secmaster:market:X", "{}")
        assert client.get("secmaster:market:X") == b"{}"


def test_redis_restart_keeps_or_drops_data(stack_root):
    root = stack_root / "redis-restart"
    server = RedisServer.start(root, die_with_parent=True)
    try:
        with redis.Redis.from_url(server.url) as client:
            client.set("k", "v")
        server.restart(keep_data=True)
        with redis.Redis.from_url(server.url) as client:
            assert client.get("k") == b"v"
        server.restart(keep_data=False)
        with redis.Redis.from_url(server.url) as client:
            assert client.get("k") is None
    finally:
        server.stop()
    assert not server.alive()


def test_postgres_restart_keeps_data(pg_server, fresh_database):
    with psycopg.connect(fresh_database, autocommit=True) as connection:
        connection.execute("CREATE TABLE kept (id int PRIMARY KEY)")
        connection.execute("INSERT INTO kept VALUES (7)")
    old_pid = pg_server.pid

    pg_server.restart()

    assert pg_server.pid != old_pid
    assert PostgresServer.attach(pg_server.root).pid == pg_server.pid
    with psycopg.connect(fresh_database) as connection:
        assert connection.execute("SELECT id FROM kept").fetchall() == [(7,)]


@pytest.mark.parametrize("missing", ["/nonexistent/postgres"])
def test_missing_binary_names_package(missing):
    from ssmd.dev.servers import MissingBinaryError, require_binary

    with pytest.raises(MissingBinaryError, match="apt-get install postgresql-15"):
        require_binary(missing, "postgresql-15")


def _ssmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssmd", *args], capture_output=True, text=True, timeout=120)


def _read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        assert line.startswith("export "), line
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = value
    return env


def test_dev_up_down_idempotent(stack_root):
    root = stack_root / "dev"

    first = _ssmd("dev", "up", "--dir", str(root))
    assert first.returncode == 0, first.stderr
    second = _ssmd("dev", "up", "--dir", str(root))
    assert second.returncode == 0, second.stderr
    pids = {name: json.loads((root / f"{name}.json").read_text())["pid"] for name in ("postgres", "nats", "redis")}
    try:
        assert second.stdout == first.stdout
        assert second.stderr.count("reused") == 3
        env = _read_env(root / "env")
        assert first.stdout == (root / "env").read_text()
        assert sorted(env) == ["DATABASE_URL", "NATS_URL", "REDIS_URL"]
        assert re.fullmatch(r"postgresql://postgres@127\.0\.0\.1:\d+/secmaster", env["DATABASE_URL"])
        assert re.fullmatch(r"nats://127\.0\.0\.1:\d+", env["NATS_URL"])
        assert re.fullmatch(r"redis://127\.0\.0\.1:\d+", env["REDIS_URL"])

        with psycopg.connect(env["DATABASE_URL"]) as connection:
            tables = connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").fetchall()
        assert tables == [("events",), ("markets",), ("series_fees",)]
        with redis.Redis.from_url(env["REDIS_URL"]) as client:
            assert client.ping() is True
        assert asyncio.run(_jetstream_enabled(env["NATS_URL"]))
    finally:
        down = _ssmd("dev", "down", "--dir", str(root))

    assert down.returncode == 0, down.stderr
    assert down.stderr.count("stopped") == 3
    for name, pid in pids.items():
        assert not pid_alive(pid), name
    assert not (root / "env").exists()
    again = _ssmd("dev", "down", "--dir", str(root))
    assert again.returncode == 0, again.stderr
    assert "no running servers" in again.stderr


async def _jetstream_enabled(url: str) -> bool:
    client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        info = await client.jetstream().account_info()
    finally:
        await client.close()
    return info.limits is not None


def test_dev_up_missing_binary_one_line(stack_root):
    environment = {**os.environ, "SSMD_PG_BINDIR": "/nonexistent"}
    result = subprocess.run(
        [sys.executable, "-m", "ssmd", "dev", "up", "--dir", str(stack_root / "missing")],
        capture_output=True, text=True, timeout=60, env=environment,
    )

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ssmd dev: error: /nonexistent/initdb not found: install the Debian package postgresql-15 (apt-get install postgresql-15)"
    ]


def test_sample_load_counts(fresh_database):
    counts = load_sample(fresh_database, markets=200, seed=5)
    again = load_sample(fresh_database, markets=200, seed=5)

    assert counts.as_dict() == {"events": 50, "markets": 200, "series_fees": 30}
    assert again.as_dict() == {"events": 0, "markets": 0, "series_fees": 0}
    with psycopg.connect(fresh_database) as connection:
        markets, nan, toasted = connection.execute(
            "SELECT count(*), count(*) FILTER (WHERE last_price = 'NaN'), count(*) FILTER (WHERE length(notes) > 2048) FROM markets"
        ).fetchone()
    assert markets == 200
    assert nan >= 1
    assert toasted >= 1


def test_workload_counts_match_rows(fresh_database):
    load_sample(fresh_database, markets=400, seed=2)
    before = _row_count(fresh_database)

    counts = run_workload(fresh_database, seconds=2, rate=100, seed=9)

    assert counts.transactions > 50
    assert counts.rolled_back > 0
    assert counts.key_changes > 0
    assert counts.deletes > 0
    assert _row_count(fresh_database) == before + counts.inserts - counts.deletes


def test_workload_same_seed_same_counts(pg_server):
    # The pace depends on the clock, so compare runs of an equal number of steps.
    results = []
    for attempt in range(2):
        url = pg_server.create_database(f"t_seed_{attempt}")
        try:
            load_sample(url, markets=100, seed=1)
            with Workload(url, seed=4) as workload:
                for _ in range(150):
                    workload.step()
                results.append(workload.counts.as_dict())
        finally:
            pg_server.drop_database(f"t_seed_{attempt}")

    assert results[0] == results[1]


def _row_count(url: str) -> int:
    with psycopg.connect(url) as connection:
        return connection.execute(
            "SELECT (SELECT count(*) FROM markets) + (SELECT count(*) FROM events) + (SELECT count(*) FROM series_fees)"
        ).fetchone()[0]


def _status(ssmd_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, **ssmd_env, "CONSUMER_NAME": "status-test"}
    return subprocess.run([sys.executable, "-m", "ssmd", "status", *args], capture_output=True, text=True, timeout=60, env=environment)


def test_status_reports_missing_parts(ssmd_env):
    result = _status(ssmd_env, "--json")

    assert result.returncode == 1, result.stderr
    status = json.loads(result.stdout)
    assert status["slot"]["found"] is False
    assert status["stream"]["found"] is False
    assert status["consumer"]["found"] is False
    assert status["cache"]["found"] is False


async def test_status_reads_every_part(ssmd_env):
    with psycopg.connect(ssmd_env["DATABASE_URL"], autocommit=True) as connection:
        connection.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (ssmd_env["REPLICATION_SLOT"],))
        connection.execute("CREATE TABLE filler (id int)")
    client = await nats.connect(ssmd_env["NATS_URL"], connect_timeout=5, max_reconnect_attempts=0)
    try:
        jetstream = client.jetstream()
        await jetstream.add_stream(name=ssmd_env["NATS_STREAM"], subjects=["cdc.>"])
        for index in range(3):
            await jetstream.publish("cdc.markets.insert", b"{}", headers={"Nats-Msg-Id": f"0/1:{index}"})
        await jetstream.add_consumer(ssmd_env["NATS_STREAM"], durable_name="status-test", ack_policy="explicit")
    finally:
        await client.close()
    with redis.Redis.from_url(ssmd_env["REDIS_URL"]) as redis_client:
        redis_client.hset("secmaster:meta", mapping={
            "state": "ready", "snapshot_lsn": "0/10", "applied_lsn": "0/20", "stream_seq": "3", "last_applied_at": str(time.time() - 5),
        })

    result = await asyncio.to_thread(_status, ssmd_env, "--json")

    assert result.returncode == 0, result.stdout + result.stderr
    status = json.loads(result.stdout)
    assert status["slot"]["found"] is True
    assert status["slot"]["active"] is False
    assert status["slot"]["retained_wal_bytes"] > 0
    assert status["stream"]["messages"] == 3
    assert (status["stream"]["first_seq"], status["stream"]["last_seq"]) == (1, 3)
    assert status["consumer"]["pending"] == 3
    assert status["consumer"]["redelivered"] == 0
    assert status["cache"]["state"] == "ready"
    assert status["cache"]["applied_lsn"] == "0/20"
    assert 4 < status["cache"]["seconds_since_last_change"] < 60


def test_status_text_hides_password(ssmd_env):
    with_password = ssmd_env["DATABASE_URL"].replace("postgres@", "postgres:hunter2@")
    result = _status({**ssmd_env, "DATABASE_URL": with_password})

    assert "hunter2" not in result.stdout + result.stderr
    assert "postgres:***@" in result.stdout
    assert result.stdout.splitlines()[0].startswith("slot ")


def test_start_retries_taken_port(stack_root, monkeypatch):
    import socket

    from ssmd.dev import servers

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        ports = iter([taken_port, servers.free_port()])
        monkeypatch.setattr(servers, "free_port", lambda: next(ports))

        server = RedisServer.start(stack_root / "retry", die_with_parent=True)
        try:
            assert server.port != taken_port
            assert "Address already in use" in server.log_path.read_text()
            with redis.Redis.from_url(server.url) as client:
                assert client.ping() is True
        finally:
            server.stop()
