"""The cdc's publisher against a real nats-server: one PubAck per message, and the stream check."""

from __future__ import annotations

import nats
import pytest
from prometheus_client import CollectorRegistry

from ssmd.bus.publisher import Publisher
from ssmd.bus.stream import StreamLimits, ensure_stream
from ssmd.core.envelope import Message
from ssmd.core.errors import DependencyError
from ssmd.observe import CdcMetrics


@pytest.fixture
async def client(nats_server, fresh_stream_name):
    connection = await nats.connect(nats_server.url)
    await ensure_stream(connection.jetstream(), fresh_stream_name, StreamLimits())
    yield connection, fresh_stream_name
    await connection.close()


def message(number: int) -> Message:
    return Message("cdc.markets.update", f'{{"n":{number}}}'.encode(), f"0/{number:X}:0")


async def test_every_message_acknowledged_once(client):
    connection, stream = client
    acked: list[object] = []
    publisher = Publisher(connection, stream, acked.append, CdcMetrics(CollectorRegistry()))
    for number in range(300):
        await publisher.publish(message(number), number)
    assert await publisher.drain(timeout=10)
    await publisher.cancel()
    assert sorted(acked) == list(range(300))
    info = await connection.jetstream().stream_info(stream)
    assert info.state.messages == 300


async def test_pub_ack_from_another_stream_stops_publishing(client):
    connection, stream = client
    acked: list[object] = []
    publisher = Publisher(connection, "SECMASTER_ELSEWHERE", acked.append, CdcMetrics(CollectorRegistry()))
    await publisher.publish(message(1), 1)
    with pytest.raises(DependencyError, match=f"stream '{stream}' stored the message instead of stream 'SECMASTER_ELSEWHERE'"):
        await publisher.drain(timeout=10)
    await publisher.cancel()
    assert acked == []
