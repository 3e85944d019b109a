"""The packed script runners and the warm's write stream on a real Redis server."""

from __future__ import annotations

import asyncio

import pytest
import redis

from ssmd.cache.warm import write_batches
from ssmd.core.errors import DependencyError
from ssmd.core.keys import KeySpace
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position
from ssmd.store.cache_store import connect_redis, sweep_blocking
from ssmd.store.scripts import APPLIED, BELOW_FLOOR, STALE, BlockingScriptRunner, Script, ScriptCall, ScriptRunner, WarmWriteStream

OLD = Position(Lsn(10), 0).pack()
WARM = Position(Lsn(20), 0).pack()
NEW = Position(Lsn(30), 0).pack()


def rows(count: int, start: int = 0) -> list[tuple[bytes, bytes]]:
    return [(b"secmaster:market:M%d" % index, b'{"ticker":"M%d"}' % index) for index in range(start, start + count)]


@pytest.fixture
def client(redis_db):
    with redis.Redis.from_url(redis_db) as client:
        yield client


def test_write_stream_applies_versioned(client):
    client.set("{secmaster:market:M1}:v", NEW)  # a newer change is stored
    client.set("{secmaster:market:M2}:v", NEW)  # a newer delete left a tombstone
    client.set("secmaster:market:M1", b"newer")
    BlockingScriptRunner(client).load()

    with WarmWriteStream(client) as stream:
        results = stream.send(rows(3), WARM.encode(), b"")
        results += stream.send(rows(3, start=3), WARM.encode(), b"")
        results += stream.finish()

    assert results == [APPLIED, STALE, STALE, APPLIED, APPLIED, APPLIED]
    assert client.get("secmaster:market:M1") == b"newer"
    assert client.get("secmaster:market:M2") is None
    assert client.get("secmaster:market:M0") == b'{"ticker":"M0"}'
    assert client.get("{secmaster:market:M5}:v") == WARM.encode()


def test_write_stream_respects_floor(client):
    BlockingScriptRunner(client).load()

    with WarmWriteStream(client) as stream:
        stream.send(rows(2), WARM.encode(), NEW.encode())
        results = stream.finish()

    assert results == [BELOW_FLOOR, BELOW_FLOOR]
    assert client.dbsize() == 0


def test_write_batches_reloads_flushed_scripts(client):
    BlockingScriptRunner(client).load()
    batches = [rows(500, start=500 * index) for index in range(6)]

    def batches_flushing_scripts():
        for index, batch in enumerate(batches):
            if index in (2, 4):
                client.script_flush()
            yield batch

    results = [result for chunk in write_batches(client, batches_flushing_scripts(), WARM, lambda: "") for result in chunk]

    assert results == [APPLIED] * 3000
    assert client.get("secmaster:market:M2999") == b'{"ticker":"M2999"}'
    assert client.ping()


def test_write_stream_error_reply_raises(client):
    BlockingScriptRunner(client).load()
    client.hset("{secmaster:market:M1}:v", "field", "value")  # GET on a hash fails in the script

    with pytest.raises(DependencyError, match="rejected 1 of 3"):
        with WarmWriteStream(client) as stream:
            stream.send(rows(3), WARM.encode(), b"")
            stream.finish()

    assert client.ping()
    assert client.get("secmaster:market:M2") == b'{"ticker":"M2"}'


def test_async_runner_reruns_after_script_flush(redis_db):
    async def scenario():
        client = connect_redis(redis_db)
        try:
            runner = ScriptRunner(client)
            await runner.load()
            await client.script_flush()
            calls = [
                ScriptCall(Script.APPLY_WRITE, ("secmaster:market:A", "{secmaster:market:A}:v"), (NEW, b"{}", "")),
                ScriptCall(Script.APPLY_DELETE, ("secmaster:market:B", "{secmaster:market:B}:v"), (NEW, "")),
                ScriptCall(Script.APPLY_WRITE, ("secmaster:market:B", "{secmaster:market:B}:v"), (OLD, b"{}", "")),
            ]

            results = await runner.run(calls)

            assert results == [APPLIED, APPLIED, STALE]
            assert await client.get("{secmaster:market:B}:v") == NEW.encode()
            assert await client.exists("secmaster:market:B") == 0
            assert await client.ping()
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_async_runner_error_reply_raises(redis_db):
    async def scenario():
        client = connect_redis(redis_db)
        try:
            runner = ScriptRunner(client)
            await runner.load()
            await client.hset("{secmaster:market:A}:v", "field", "value")
            calls = [ScriptCall(Script.APPLY_WRITE, (f"secmaster:market:{name}", f"{{secmaster:market:{name}}}:v"), (NEW, b"{}", "")) for name in "ABC"]

            with pytest.raises(DependencyError, match="rejected 1 of 3"):
                await runner.run(calls)

            assert await client.get("secmaster:market:C") == b"{}"
            assert await client.ping()
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_async_runner_batch_timeout(redis_db):
    async def scenario():
        client = connect_redis(redis_db + "?socket_timeout=0.5")
        pauser = connect_redis(redis_db)
        try:
            runner = ScriptRunner(client)
            await runner.load()
            calls = [ScriptCall(Script.APPLY_WRITE, (f"secmaster:market:{index}", f"{{secmaster:market:{index}}}:v"), (NEW, b"{}", "")) for index in range(50)]
            # Redis holds every command during the pause, CLIENT UNPAUSE too, so the pause is short.
            await pauser.execute_command("CLIENT", "PAUSE", "2500", "ALL")
            started = asyncio.get_running_loop().time()
            with pytest.raises(DependencyError, match="50 script calls failed"):
                await runner.run(calls)
            assert asyncio.get_running_loop().time() - started < 2.0
            await pauser.ping()

            assert await runner.run(calls) == [APPLIED] * 50
        finally:
            await client.aclose()
            await pauser.aclose()

    asyncio.run(scenario())


def test_sweep_covers_several_namespaces(client):
    old, new = OLD.encode(), NEW.encode()
    for namespace in ("market", "event", "fee"):
        client.set(f"secmaster:{namespace}:OLD", b"{}")
        client.set(f"{{secmaster:{namespace}:OLD}}:v", old)
        client.set(f"secmaster:{namespace}:NEW", b"{}")
        client.set(f"{{secmaster:{namespace}:NEW}}:v", new)
    client.set("{secmaster:market:GONE}:v", old)  # a tombstone
    client.set("secmaster:event:BARE", b"{}")  # a value without version
    client.set("secmaster:meta", b"kept")
    client.set("secmaster:other:OLD", b"{}")  # a namespace not swept

    removed = sweep_blocking(client, KeySpace(), ["market", "event", "fee"], Position(Lsn(20), 0))

    assert removed == 5
    assert sorted(key.decode() for key in client.scan_iter("*")) == [
        "secmaster:event:NEW", "secmaster:fee:NEW", "secmaster:market:NEW", "secmaster:meta", "secmaster:other:OLD",
        "{secmaster:event:NEW}:v", "{secmaster:fee:NEW}:v", "{secmaster:market:NEW}:v",
    ]
