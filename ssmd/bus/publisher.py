"""Publishing to JetStream with many messages in flight, bounded memory, and retries.

Each message carries `Nats-Msg-Id`, so JetStream drops a repeat inside the stream's duplicate
window and answers with a PubAck marked `duplicate`; that counts as success, because the message
is stored. A publish whose PubAck does not arrive in time is sent again with the same id after a
jittered backoff, until it is acknowledged or the publisher stops: giving up would let the
caller confirm the slot past a message the stream may not hold.

The window bounds both the number and the body bytes of unacknowledged messages. `publish`
waits while the window is full, which stops the caller from reading the replication stream, so
PostgreSQL holds the rest (TCP back-pressure on the walsender) instead of this process.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext

from ssmd.core.envelope import MSG_ID_HEADER, Message
from ssmd.core.errors import ConfigError, DependencyError, SsmdError
from ssmd.observe import CdcMetrics

log = logging.getLogger(__name__)

# Errors after which the same publish may succeed: the server or the connection was busy or away.
_RETRYABLE = (
    TimeoutError,
    nats.errors.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.TooManyStalledMsgsError,
)


@dataclass(frozen=True)
class PublishSettings:
    max_in_flight: int = 2000
    max_in_flight_bytes: int = 64 * 1024 * 1024
    ack_timeout_s: float = 5.0
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 5.0


def backoff_delay(attempt: int, rng: random.Random, initial: float, maximum: float) -> float:
    """Return a full-jitter delay for retry `attempt` (1-based): uniform in [0, min(max, initial*2**n)]."""
    return rng.uniform(0, min(maximum, initial * (2 ** min(attempt - 1, 30))))


class Publisher:
    """Publishes messages concurrently within a window and reports each PubAck to `on_ack`.

    `on_ack(token)` runs in the event loop once per message, with the token given to `publish`.
    A failure that no retry can fix (e.g. a message over the server's max_payload, or a stream
    that rejects the subject) is stored in `failure` and raised by the next `publish`/`drain`.
    """

    def __init__(
        self,
        js: JetStreamContext,
        stream: str,
        on_ack: Callable[[object], None],
        metrics: CdcMetrics,
        *,
        settings: PublishSettings = PublishSettings(),
        rng: random.Random | None = None,
        drop_first_acks: int = 0,
    ) -> None:
        self._js = js
        self._stream = stream
        self._on_ack = on_ack
        self._metrics = metrics
        self._settings = settings
        self._rng = rng or random.Random()
        self._window = asyncio.Condition()
        self._count = 0
        self._bytes = 0
        self._tasks: set[asyncio.Task] = set()
        self.failure: SsmdError | None = None
        # Test-only fault hook: treat the first N PubAcks as lost, so the retry path runs.
        self._drop_acks = drop_first_acks

    @property
    def in_flight(self) -> int:
        return self._count

    async def publish(self, message: Message, token: object) -> None:
        """Hand a message to NATS once the window has room; the PubAck is awaited in the background."""
        self._raise_failure()
        size = len(message.body)
        async with self._window:
            await self._window.wait_for(lambda: self.failure is not None or self._has_room(size))
            self._raise_failure()
            self._count += 1
            self._bytes += size
            self._update_gauges()
        task = asyncio.create_task(self._deliver(message, token), name=f"publish {message.msg_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every message is acknowledged; return False on timeout."""
        async with self._window:
            try:
                await asyncio.wait_for(self._window.wait_for(lambda: self._count == 0 or self.failure is not None), timeout)
            except TimeoutError:
                return False
        self._raise_failure()
        return True

    async def cancel(self) -> None:
        """Stop retrying; messages without a PubAck stay unconfirmed and are sent again after restart."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _has_room(self, size: int) -> bool:
        if self._count >= self._settings.max_in_flight:
            return False
        # One message larger than the byte budget is still let through when nothing is in flight.
        return self._count == 0 or self._bytes + size <= self._settings.max_in_flight_bytes

    async def _deliver(self, message: Message, token: object) -> None:
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            try:
                duplicate = await self._send_once(message)
                break
            except _RETRYABLE as exc:
                delay = backoff_delay(attempt, self._rng, self._settings.backoff_initial_s, self._settings.backoff_max_s)
                self._metrics.publish_retries.inc()
                level = logging.WARNING if attempt == 1 or attempt % 10 == 0 else logging.DEBUG
                log.log(level, "publish failed, retrying with the same id msg_id=%s subject=%s attempt=%s delay_s=%.2f error=%s",
                        message.msg_id, message.subject, attempt, delay, type(exc).__name__ + (f": {exc}" if str(exc) else ""))
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 (a permanent error must reach the daemon, not vanish in a task)
                await self._fail(_permanent_error(exc, message, self._stream))
                return

        self._metrics.publish_latency.observe(time.monotonic() - started)
        self._metrics.changes_published.inc()
        self._metrics.bytes_published.inc(len(message.body))
        if duplicate:
            self._metrics.duplicates.inc()
        try:
            self._on_ack(token)
        except SsmdError as exc:
            await self._fail(exc)
            return
        async with self._window:
            self._count -= 1
            self._bytes -= len(message.body)
            self._update_gauges()
            self._window.notify_all()

    async def _send_once(self, message: Message) -> bool:
        """Publish and await the PubAck; return whether JetStream reported a duplicate."""
        future = await self._js.publish_async(message.subject, message.body, stream=self._stream, headers={MSG_ID_HEADER: message.msg_id})
        # wait_for cancels the future on timeout, which releases nats-py's pending slot.
        ack = await asyncio.wait_for(future, self._settings.ack_timeout_s)
        if self._drop_acks > 0:
            self._drop_acks -= 1
            raise TimeoutError("PubAck dropped by SSMD_FAULT_DROP_ACKS (test-only)")
        return bool(ack.duplicate)

    async def _fail(self, error: SsmdError) -> None:
        log.error("publishing stopped: %s", error)
        async with self._window:
            if self.failure is None:
                self.failure = error
            self._window.notify_all()

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure

    def _update_gauges(self) -> None:
        self._metrics.in_flight_messages.set(self._count)
        self._metrics.in_flight_bytes.set(self._bytes)


def _permanent_error(exc: Exception, message: Message, stream: str) -> SsmdError:
    if isinstance(exc, nats.errors.MaxPayloadError):
        return ConfigError(
            f"message {message.msg_id} on {message.subject} is {len(message.body)} bytes, over the NATS server's max_payload: "
            f"raise max_payload in the nats-server configuration"
        )
    if isinstance(exc, nats.js.errors.APIError):
        return DependencyError(f"JetStream rejected message {message.msg_id} on {message.subject} for stream {stream}: {exc}")
    return DependencyError(f"publishing message {message.msg_id} on {message.subject} failed: {type(exc).__name__}: {exc}")
