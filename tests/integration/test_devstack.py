"""The throwaway servers and the per-test fixtures, on real servers."""

from __future__ import annotations

import nats
import psycopg
import pytest
import redis

from ssmd.dev.servers import PostgresServer, RedisServer


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
