"""The cache's consumer on a real NATS stream fed with envelope messages by the test.

Covers redelivery out of order (an earlier change redelivered after a later one is applied),
messages that always fail (terminated after bounded deliveries, then a re-warm), and poison
messages (terminated at once).
"""

from __future__ import annotations

import asyncio
from collections import Counter

import nats
import pytest

from ssmd.bus.stream import StreamLimits, ensure_stream
from ssmd.cache.daemon import CacheDaemon, CacheHooks, CacheSettings
from ssmd.core.changes import Change, Op
from ssmd.core.envelope import encode_change, encode_slot_created
from ssmd.core.jsontext import JsonNumber, loads
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position
from tests.integration.cache_stack import apply_schema, cached, execute, meta, wait_until_async

# Far above any consistent point a fresh test cluster reaches, so the warm never contains these.
BASE_LSN = 0x10_0000_0000


def market_change(ticker: str, status: str, lsn_offset: int, op: Op = Op.UPDATE) -> Change:
    data = {"ticker": ticker, "event_ticker": "E", "title": "t", "status": status, "volume": JsonNumber("1")}
    return Change(
        op=op, schema="public", table="markets", position=Position(Lsn(BASE_LSN + lsn_offset), 0), xid=1000 + lsn_offset,
        key={"ticker": ticker}, data=None if op is Op.DELETE else data, commit_time="2026-01-01 00:00:00+00",
    )


async def publish(js, change: Change) -> None:
    message = encode_change(change)
    await js.publish(message.subject, message.body, headers={"Nats-Msg-Id": message.msg_id})


def settings(fresh_database, nats_server, redis_db, stream) -> CacheSettings:
    return CacheSettings(
        database_url=fresh_database, nats_url=nats_server.url, redis_url=redis_db,
        tables=["events", "markets", "series_fees"], stream=stream, consumer="ssmd-cache",
        ack_wait_s=2.0, max_deliver=3, fetch_batch=100, fetch_timeout_s=0.5, check_interval_s=1.0,
    )


def sample(daemon: CacheDaemon, name: str) -> float:
    return daemon.metrics.registry.get_sample_value(name) or 0.0


@pytest.fixture
async def stream_stack(fresh_database, nats_server, redis_db, fresh_stream_name):
    apply_schema(fresh_database)
    execute(fresh_database, "INSERT INTO markets (ticker, event_ticker, title, status) VALUES ('TEST-1', 'E', 't', 'initialized')")
    client = await nats.connect(nats_server.url)
    js = client.jetstream()
    await ensure_stream(js, fresh_stream_name, StreamLimits())
    yield js, settings(fresh_database, nats_server, redis_db, fresh_stream_name)
    await client.close()


async def run_daemon(config: CacheSettings, hooks: CacheHooks):
    daemon = CacheDaemon(config, hooks=hooks)
    stop = asyncio.Event()
    task = asyncio.create_task(daemon.run(stop))
    await wait_until_async(lambda: meta(config.redis_url).get("state") == "ready", 30, "first warm")
    return daemon, stop, task


async def test_redelivered_older_change_is_stale(stream_stack):
    js, config = stream_stack
    e1, e2 = market_change("TEST-1", "open", 0), market_change("TEST-1", "halted", 0x100)
    deliveries: Counter[str] = Counter()

    async def stall_on_e1(msg) -> None:
        body = loads(msg.data)
        deliveries[body["lsn"]] += 1
        if body["lsn"] == str(e1.position.commit_lsn) and msg.metadata.num_delivered == 1:
            await asyncio.sleep(3)  # past ack_wait (2 s): JetStream redelivers e1
            raise RuntimeError("handler stalled")

    # Both changes wait in the stream before the consumer resumes, so one batch contains both:
    # e2 is applied while e1 stalls, and e1's redelivery comes after it.
    _, stop, task = await run_daemon(config, CacheHooks())
    stop.set()
    await asyncio.wait_for(task, 30)
    await publish(js, e1)
    await publish(js, e2)
    daemon, stop, task = await run_daemon(config, CacheHooks(before_apply=stall_on_e1))
    try:
        await wait_until_async(lambda: deliveries[str(e1.position.commit_lsn)] >= 2, 20, "e1 redelivered")
        # e2 is acknowledged only after the batch, past ack_wait, so JetStream may deliver it
        # again as well. Every delivery after the first must be found stale.
        redeliveries = sum(count - 1 for count in deliveries.values())
        await wait_until_async(lambda: sample(daemon, "ssmd_cache_changes_stale_total") >= redeliveries, 10, "every redelivery found stale")

        row = loads(cached(config.redis_url, "secmaster:market:TEST-1"))
        assert row["status"] == "halted"
        assert cached(config.redis_url, "{secmaster:market:TEST-1}:v").decode() == e2.position.pack()
        assert deliveries[str(e2.position.commit_lsn)] >= 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_failing_and_poison_messages_terminated(stream_stack):
    js, config = stream_stack
    always_failing = market_change("TEST-5", "open", 0x10)
    after = market_change("TEST-6", "open", 0x20)
    attempts: Counter[str] = Counter()

    async def fail_test_5(msg) -> None:
        body = loads(msg.data)
        attempts[body["key"]["ticker"]] += 1
        if body["key"]["ticker"] == "TEST-5":
            raise RuntimeError("always fails")

    daemon, stop, task = await run_daemon(config, CacheHooks(before_apply=fail_test_5))
    try:
        await publish(js, always_failing)
        await js.publish("cdc.markets.insert", b"{not json")
        unknown = Change(op=Op.INSERT, schema="public", table="nosuch", position=Position(Lsn(BASE_LSN + 0x18), 0), xid=7, key={"id": JsonNumber("1")}, data={"id": JsonNumber("1")})
        await publish(js, unknown)
        wrong_key = encode_change(market_change("TEST-7", "open", 0x19))
        await js.publish(wrong_key.subject, wrong_key.body.replace(b'"key":{"ticker"', b'"key":{"event_ticker"'))
        await publish(js, after)

        await wait_until_async(lambda: cached(config.redis_url, "secmaster:market:TEST-6"), 30, "message after the failing one applied")
        await wait_until_async(lambda: sample(daemon, "ssmd_cache_messages_terminated_total") >= 4, 30, "four terminations")

        assert attempts["TEST-5"] == config.max_deliver
        assert cached(config.redis_url, "secmaster:market:TEST-5") is None
        # The terminated change is never applied, so the cache warms again. The three poison
        # messages add no warm.
        await wait_until_async(lambda: sample(daemon, "ssmd_cache_warms_total") == 2, 30, "a re-warm after the termination")
        await wait_until_async(lambda: meta(config.redis_url).get("state") == "ready", 30, "the re-warm to finish")
        assert sample(daemon, "ssmd_cache_warms_total") == 2
        assert cached(config.redis_url, "secmaster:market:TEST-7") is None
        assert sample(daemon, "ssmd_cache_messages_terminated_total") == 4
        stream_seq = int(meta(config.redis_url)["stream_seq"])
        info = await js.stream_info(config.stream)
        await wait_until_async(lambda: int(meta(config.redis_url)["stream_seq"]) == info.state.last_seq, 10, "stream_seq to reach the last message")
        assert stream_seq <= info.state.last_seq
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_slot_created_after_snapshot_rewarms(stream_stack):
    js, config = stream_stack
    daemon, stop, task = await run_daemon(config, CacheHooks())
    try:
        assert daemon.warms_done == 1
        message = encode_slot_created("ssmd_cdc", Lsn(BASE_LSN))
        await js.publish(message.subject, message.body, headers={"Nats-Msg-Id": message.msg_id})
        await wait_until_async(lambda: daemon.warms_done == 2, 30, "a second warm")
        assert sample(daemon, "ssmd_cache_warms_total") == 2
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
