"""The cache's pull consumer against a real nats-server: order, waiting, hand-back and errors."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from nats.aio.msg import Msg

from ssmd.bus.consumer import ConsumerSettings, PullConsumer, delivery_of, recreate_consumer
from ssmd.bus.stream import StreamLimits, ensure_stream
from ssmd.core.errors import DependencyError


@pytest.fixture
async def stream(nats_server, fresh_stream_name):
    client = await nats.connect(nats_server.url)
    js = client.jetstream()
    await ensure_stream(js, fresh_stream_name, StreamLimits())
    settings = ConsumerSettings(stream=fresh_stream_name, durable="pull-test", ack_wait_s=30.0)
    await recreate_consumer(js, settings, 1)
    yield js, settings
    await client.close()


async def publish(js, count: int, start: int = 0) -> None:
    for number in range(start, start + count):
        await js.publish("cdc.markets.update", f"{number}".encode(), headers={"Nats-Msg-Id": f"m{number}"})


def numbers(msgs) -> list[int]:
    return [int(msg.data) for msg in msgs]


async def waiting_fetch(consumer: PullConsumer) -> asyncio.Task:
    """Start a fetch on an empty stream and give it time to hold its request on the server."""
    fetch = asyncio.create_task(consumer.fetch(10, timeout=5.0))
    await asyncio.sleep(0.3)
    return fetch


async def test_fetch_returns_stream_order_in_batches(stream):
    js, settings = stream
    await publish(js, 7)
    consumer = PullConsumer(js, settings)
    try:
        first = await consumer.fetch(5, timeout=1.0)
        second = await consumer.fetch(5, timeout=1.0)
    finally:
        await consumer.close()
    assert numbers(first) == [0, 1, 2, 3, 4]
    assert numbers(second) == [5, 6]


async def test_empty_stream_fetch_times_out(stream):
    js, settings = stream
    consumer = PullConsumer(js, settings)
    started = time.monotonic()
    try:
        msgs = await consumer.fetch(10, timeout=0.5)
    finally:
        await consumer.close()
    elapsed = time.monotonic() - started
    assert msgs == []
    assert 0.4 <= elapsed < 2.5


async def test_message_published_during_wait_returns_early(stream):
    js, settings = stream
    consumer = PullConsumer(js, settings)
    try:
        fetch = await waiting_fetch(consumer)
        published_at = time.monotonic()
        await publish(js, 1)
        msgs = await fetch
        waited = time.monotonic() - published_at
    finally:
        await consumer.close()
    assert numbers(msgs) == [0]
    assert waited < 1.0


async def test_close_hands_back_buffered_messages(stream):
    js, settings = stream
    await publish(js, 3)
    consumer = PullConsumer(js, settings)
    await consumer.open()
    await consumer._request(3, wait_s=None)  # delivered to the buffer, never handed out
    deadline = time.monotonic() + 5
    while len(consumer._buffer) < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await consumer.close()

    # The server applies naks asynchronously, so they may come back over several fetches, but
    # far sooner than ack_wait (30 s).
    again = PullConsumer(js, settings)
    msgs = []
    try:
        deadline = time.monotonic() + 5
        while len(msgs) < 3 and time.monotonic() < deadline:
            msgs += await again.fetch(10, timeout=0.5)
    finally:
        await again.close()
    assert numbers(msgs) == [0, 1, 2]
    assert [msg.metadata.num_delivered for msg in msgs] == [2, 2, 2]
    assert [delivery_of(msg) for msg in msgs] == [(1, 2), (2, 2), (3, 2)]


async def test_deleted_consumer_fails_the_waiting_fetch(stream):
    js, settings = stream
    consumer = PullConsumer(js, settings)
    try:
        fetch = await waiting_fetch(consumer)
        await js.delete_consumer(settings.stream, settings.durable)
        with pytest.raises(DependencyError, match="fetch from consumer pull-test on stream .* failed: status 409"):
            await fetch
    finally:
        await consumer.close()


@pytest.mark.parametrize("reply", [
    "$JS.ACK.SECMASTER_CDC.ssmd-cache.3.1042.977.1796423719959890597.12",
    "$JS.ACK.hub.ACCOUNTHASH.SECMASTER_CDC.ssmd-cache.3.1042.977.1796423719959890597.12.token",
])
def test_delivery_of_matches_nats_py_metadata(reply):
    msg = Msg(_client=None, subject="cdc.markets.update", reply=reply, data=b"{}")
    assert delivery_of(msg) == (msg.metadata.sequence.stream, msg.metadata.num_delivered)
    assert delivery_of(msg) == (1042, 3)
