"""The cache's durable pull consumer on the change stream.

The consumer is created (or re-created) at every warm to start at L0 + 1, where L0 is the
stream's last sequence read before the warm snapshot, so the stream covers everything the
snapshot may miss. Acks are explicit and sent only after Redis accepted the message's writes;
`ack_wait` bounds how long a stalled handler holds a message, and `max_deliver` bounds how often
the server redelivers one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, ReplayPolicy
from nats.js.errors import APIError, NotFoundError

from ssmd.core.errors import DependencyError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsumerSettings:
    """Durable consumer settings; `max_deliver` includes the first delivery."""

    stream: str
    durable: str
    ack_wait_s: float = 30.0
    max_deliver: int = 5
    max_ack_pending: int = 20000


@dataclass(frozen=True)
class ConsumerPosition:
    """Position of the durable consumer: last delivered and acknowledged stream sequences."""

    delivered_stream_seq: int
    ack_floor_stream_seq: int
    num_pending: int


async def recreate_consumer(js: JetStreamContext, settings: ConsumerSettings, start_seq: int) -> None:
    """Delete the durable consumer if it exists and create it to deliver from `start_seq` on."""
    try:
        await js.delete_consumer(settings.stream, settings.durable)
    except NotFoundError:
        pass
    except APIError as exc:
        raise DependencyError(f"deleting consumer {settings.durable} on stream {settings.stream} failed: {exc}") from exc

    config = ConsumerConfig(
        durable_name=settings.durable,
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(start_seq, 1),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=settings.ack_wait_s,
        max_deliver=settings.max_deliver,
        max_ack_pending=settings.max_ack_pending,
        replay_policy=ReplayPolicy.INSTANT,
    )
    try:
        await js.add_consumer(settings.stream, config)
    except APIError as exc:
        raise DependencyError(f"creating consumer {settings.durable} on stream {settings.stream} failed: {exc}") from exc
    log.info("created consumer consumer=%s stream=%s start_seq=%d", settings.durable, settings.stream, max(start_seq, 1))


async def read_consumer_position(js: JetStreamContext, settings: ConsumerSettings) -> ConsumerPosition | None:
    """Return the consumer's position, or None when the consumer (or its stream) does not exist."""
    try:
        info = await js.consumer_info(settings.stream, settings.durable)
    except NotFoundError:
        return None
    except APIError as exc:
        raise DependencyError(f"reading consumer {settings.durable} on stream {settings.stream} failed: {exc}") from exc
    return ConsumerPosition(info.delivered.stream_seq or 0, info.ack_floor.stream_seq or 0, info.num_pending or 0)


class PullConsumer:
    """Fetches batches from the durable consumer."""

    def __init__(self, js: JetStreamContext, settings: ConsumerSettings) -> None:
        self._js = js
        self._settings = settings
        self._subscription: JetStreamContext.PullSubscription | None = None

    async def open(self) -> None:
        try:
            self._subscription = await self._js.pull_subscribe_bind(durable=self._settings.durable, stream=self._settings.stream)
        except APIError as exc:
            raise DependencyError(f"binding to consumer {self._settings.durable} failed: {exc}") from exc

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Return up to `batch` messages, or an empty list when none arrived within `timeout`."""
        if self._subscription is None:
            await self.open()
        try:
            return await self._subscription.fetch(batch, timeout=timeout)
        except (NatsTimeoutError, asyncio.TimeoutError):
            return []
        except APIError as exc:
            raise DependencyError(f"fetch from consumer {self._settings.durable} failed: {exc}") from exc

    async def close(self) -> None:
        if self._subscription is not None:
            try:
                await self._subscription.unsubscribe()
            except Exception as exc:  # the connection may already be gone; nothing to keep
                log.debug("unsubscribe failed: %s", exc)
            self._subscription = None
