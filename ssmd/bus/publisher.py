"""Publishing to JetStream with many messages in flight, bounded memory, and retries.

Each message carries `Nats-Msg-Id`, so JetStream drops a repeat inside the stream's duplicate
window and returns a PubAck marked `duplicate`. That counts as success, because the message is
stored. A publish whose PubAck does not arrive in time is sent again with the same id after a
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


@dataclass(slots=True)
class _Attempt:
    """One message on its way to a PubAck, across retries."""

    message: Message
    token: object
    number: int = 1
    started: float = 0.0


class Publisher:
    """Publishes messages concurrently within a window and reports each PubAck to `on_ack`.

    `on_ack(token)` runs in the event loop once per message, with the token given to `publish`.
    A failure that no retry can fix (e.g. a message over the server's max_payload, or a stream
    that rejects the subject) is stored in `failure` and raised by the next `publish`/`drain`.
    A PubAck is handled in a done-callback of nats-py's future, not in a task per message,
    because that costs less per message. Only retries get a task.
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
        self._count = 0
        self._bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._retries: set[asyncio.Task] = set()
        self._closed = False
        self._loop = asyncio.get_running_loop()
        # Read at scrape time: setting a gauge twice per message costs more than the scrape.
        metrics.in_flight_messages.set_function(lambda: self._count)
        metrics.in_flight_bytes.set_function(lambda: self._bytes)
        self.failure: SsmdError | None = None
        # Test-only fault hook: treat the first N PubAcks as lost, so the retry path runs.
        self._drop_acks = drop_first_acks

    @property
    def in_flight(self) -> int:
        return self._count

    async def publish(self, message: Message, token: object) -> None:
        """Hand a message to NATS once the window has room; the PubAck is handled in the background."""
        self._raise_failure()
        size = len(message.body)
        while not self._has_room(size):
            self._room.clear()
            await self._room.wait()
            self._raise_failure()
        self._count += 1
        self._bytes += size
        self._idle.clear()
        await self._send(_Attempt(message, token))

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every message is acknowledged; return False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        self._raise_failure()
        return True

    async def cancel(self) -> None:
        """Stop retrying; messages without a PubAck stay unconfirmed and are sent again after restart."""
        self._closed = True
        for task in list(self._retries):
            task.cancel()
        await asyncio.gather(*self._retries, return_exceptions=True)

    def _has_room(self, size: int) -> bool:
        if self._count >= self._settings.max_in_flight:
            return False
        # One message larger than the byte budget is still let through when nothing is in flight.
        return self._count == 0 or self._bytes + size <= self._settings.max_in_flight_bytes

    async def _send(self, attempt: _Attempt) -> None:
        message = attempt.message
        attempt.started = time.monotonic()
        try:
            future = await self._js.publish_async(
                message.subject, message.body, stream=self._stream, headers={MSG_ID_HEADER: message.msg_id}
            )
        except _RETRYABLE as exc:
            self._retry_later(attempt, exc)
            return
        except nats.errors.Error as exc:
            self._fail(_permanent_error(exc, message, self._stream))
            return
        # Cancelling the future on timeout also releases nats-py's pending-publish slot.
        timer = self._loop.call_later(self._settings.ack_timeout_s, future.cancel)
        future.add_done_callback(lambda done: self._on_done(attempt, timer, done))

    def _on_done(self, attempt: _Attempt, timer: asyncio.TimerHandle, future: asyncio.Future) -> None:
        timer.cancel()
        if self._closed:
            return
        if future.cancelled():
            error: BaseException | None = TimeoutError(f"no PubAck within {self._settings.ack_timeout_s} s")
        else:
            error = future.exception()
        if error is None and self._drop_acks > 0:
            self._drop_acks -= 1
            error = TimeoutError("PubAck dropped by the test-only fault hook SSMD_FAULT_DROP_ACKS")

        if error is None:
            self._complete(attempt, bool(future.result().duplicate))
        elif isinstance(error, _RETRYABLE):
            self._retry_later(attempt, error)
        else:
            self._fail(_permanent_error(error, attempt.message, self._stream))

    def _complete(self, attempt: _Attempt, duplicate: bool) -> None:
        size = len(attempt.message.body)
        self._metrics.publish_latency.observe(time.monotonic() - attempt.started)
        self._metrics.changes_published.inc()
        self._metrics.bytes_published.inc(size)
        if duplicate:
            self._metrics.duplicates.inc()
        try:
            self._on_ack(attempt.token)
        except SsmdError as exc:
            self._fail(exc)
            return

        self._count -= 1
        self._bytes -= size
        self._room.set()
        if self._count == 0:
            self._idle.set()

    def _retry_later(self, attempt: _Attempt, error: BaseException) -> None:
        delay = backoff_delay(attempt.number, self._rng, self._settings.backoff_initial_s, self._settings.backoff_max_s)
        self._metrics.publish_retries.inc()
        level = logging.WARNING if attempt.number == 1 or attempt.number % 10 == 0 else logging.DEBUG
        log.log(level, "publish failed, retrying with the same id msg_id=%s subject=%s attempt=%s delay_s=%.2f error=%s",
                attempt.message.msg_id, attempt.message.subject, attempt.number, delay,
                type(error).__name__ + (f": {error}" if str(error) else ""))
        task = self._loop.create_task(self._retry(attempt, delay), name=f"retry {attempt.message.msg_id}")
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _retry(self, attempt: _Attempt, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._closed or self.failure is not None:
            return
        attempt.number += 1
        await self._send(attempt)

    def _fail(self, error: SsmdError) -> None:
        log.error("publishing stopped: %s", error)
        if self.failure is None:
            self.failure = error
        self._room.set()
        self._idle.set()

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise self.failure


def _permanent_error(exc: BaseException, message: Message, stream: str) -> SsmdError:
    if isinstance(exc, nats.errors.MaxPayloadError):
        return ConfigError(
            f"message {message.msg_id} on {message.subject} is {len(message.body)} bytes, over the NATS server's max_payload: "
            f"raise max_payload in the nats-server configuration"
        )
    if isinstance(exc, nats.js.errors.APIError):
        return DependencyError(f"JetStream rejected message {message.msg_id} on {message.subject} for stream {stream}: {exc}")
    return DependencyError(f"publishing message {message.msg_id} on {message.subject} failed: {type(exc).__name__}: {exc}")
