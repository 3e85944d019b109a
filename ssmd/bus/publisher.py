"""Publishing to JetStream with many messages in flight, bounded memory, and retries.

Each message carries `Nats-Msg-Id`, so JetStream drops a repeat inside the stream's duplicate
window and returns a PubAck marked `duplicate`. That counts as success, because the message is
stored. A publish whose PubAck does not arrive in time is sent again with the same id after a
jittered backoff, until it is acknowledged or the publisher stops: giving up would let the
caller confirm the slot past a message the stream may not hold.

The window bounds both the number and the body bytes of unacknowledged messages. `publish`
waits while the window is full, which stops the caller from reading the replication stream, so
PostgreSQL holds the rest (TCP back-pressure on the walsender) instead of this process.

Messages go out as plain NATS publishes with a reply subject under one inbox of this publisher,
and JetStream answers each with a PubAck on that subject. This is what nats-py's
`publish_async` does too, minus its per-message future, semaphore, timer and random token, which
together cost more than the publish itself at tens of thousands of messages per second. One
sweep task finds the attempts whose PubAck is overdue instead of a timer per message.
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
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ssmd.core.envelope import MSG_ID_HEADER, Message
from ssmd.core.errors import ConfigError, DependencyError, SsmdError
from ssmd.observe import LATENCY_SAMPLE_EVERY, CdcMetrics

log = logging.getLogger(__name__)

_STATUS_HEADER = "Status"
_NO_RESPONDERS = "503"  # the server's reply status when no stream listens on the subject
_REPORT_EVERY = 256  # PubAcks counted locally before the Prometheus counters are updated

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
    """

    def __init__(
        self,
        nc: NatsClient,
        stream: str,
        on_ack: Callable[[object], None],
        metrics: CdcMetrics,
        *,
        settings: PublishSettings = PublishSettings(),
        rng: random.Random | None = None,
        drop_first_acks: int = 0,
    ) -> None:
        self._nc = nc
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
        # Attempts waiting for their PubAck by reply token, in the order they were sent.
        self._waiting: dict[str, _Attempt] = {}
        self._last_token = 0
        self._reply_prefix = ""
        self._subscription = None
        self._sweeper: asyncio.Task | None = None
        # PubAcks not yet added to the Prometheus counters: (messages, bytes, duplicates).
        self._unreported = [0, 0, 0]
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
        if self._subscription is None:
            await self._subscribe()
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
        finally:
            self._report()
        self._raise_failure()
        return True

    async def cancel(self) -> None:
        """Stop retrying; messages without a PubAck stay unconfirmed and are sent again after restart."""
        self._closed = True
        self._report()
        tasks = list(self._retries)
        if self._sweeper is not None:
            tasks.append(self._sweeper)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._subscription is not None:
            try:
                await self._subscription.unsubscribe()
            except nats.errors.Error as exc:
                log.debug("unsubscribing the PubAck inbox failed: %s", exc)

    def _has_room(self, size: int) -> bool:
        if self._count >= self._settings.max_in_flight:
            return False
        # One message larger than the byte budget is still let through when nothing is in flight.
        return self._count == 0 or self._bytes + size <= self._settings.max_in_flight_bytes

    async def _subscribe(self) -> None:
        inbox = self._nc.new_inbox()
        self._subscription = await self._nc.subscribe(f"{inbox}.*", cb=self._on_reply)
        self._reply_prefix = f"{inbox}."
        self._sweeper = self._loop.create_task(self._sweep(), name="PubAck timeouts")

    async def _send(self, attempt: _Attempt) -> None:
        message = attempt.message
        self._last_token += 1
        token = str(self._last_token)
        attempt.started = time.monotonic()
        self._waiting[token] = attempt
        try:
            await self._nc.publish(
                message.subject, message.body, reply=self._reply_prefix + token,
                headers={MSG_ID_HEADER: message.msg_id},
            )
        except _RETRYABLE as exc:
            del self._waiting[token]
            self._retry_later(attempt, exc)
        except nats.errors.Error as exc:
            del self._waiting[token]
            self._fail(_permanent_error(exc, message, self._stream))

    async def _on_reply(self, msg: Msg) -> None:
        # A reply for an attempt that timed out meanwhile finds nothing: its retry gets a
        # PubAck of its own, marked duplicate when the first publish was stored.
        attempt = self._waiting.pop(msg.subject[len(self._reply_prefix):], None)
        if attempt is None or self._closed:
            return
        error, duplicate = _read_reply(msg, self._stream)
        if error is None and self._drop_acks > 0:
            self._drop_acks -= 1
            error = TimeoutError("PubAck dropped by the test-only fault hook SSMD_FAULT_DROP_ACKS")

        if error is None:
            self._complete(attempt, duplicate)
        elif isinstance(error, _RETRYABLE):
            self._retry_later(attempt, error)
        else:
            self._fail(_permanent_error(error, attempt.message, self._stream))

    async def _sweep(self) -> None:
        """Retry every attempt whose PubAck is overdue; checks a few times per ack timeout."""
        timeout = self._settings.ack_timeout_s
        while True:
            await asyncio.sleep(min(timeout / 4, 0.5))
            self._report()
            deadline = time.monotonic() - timeout
            overdue = []
            for token, attempt in self._waiting.items():
                if attempt.started > deadline:
                    break  # attempts are in send order, so the rest are younger
                overdue.append(token)
            for token in overdue:
                self._retry_later(self._waiting.pop(token), TimeoutError(f"no PubAck within {timeout} s"))

    def _complete(self, attempt: _Attempt, duplicate: bool) -> None:
        size = len(attempt.message.body)
        unreported = self._unreported
        if unreported[0] % LATENCY_SAMPLE_EVERY == 0:
            self._metrics.publish_latency.observe(time.monotonic() - attempt.started)
        unreported[0] += 1
        unreported[1] += size
        unreported[2] += duplicate
        if unreported[0] >= _REPORT_EVERY:
            self._report()
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
            self._report()

    def _report(self) -> None:
        """Add the locally counted PubAcks to the Prometheus counters."""
        messages, size, duplicates = self._unreported
        if messages:
            self._metrics.changes_published.inc(messages)
            self._metrics.bytes_published.inc(size)
        if duplicates:
            self._metrics.duplicates.inc(duplicates)
        self._unreported = [0, 0, 0]

    def _retry_later(self, attempt: _Attempt, error: BaseException) -> None:
        if self._closed:
            return
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


def _read_reply(msg: Msg, stream: str) -> tuple[BaseException | None, bool]:
    """Return the error a JetStream reply reports (None for a PubAck) and whether it is a duplicate.

    A PubAck from another stream than `stream` is an error: that stream took over the subjects.
    Checking the PubAck costs less than a `Nats-Expected-Stream` header on every message, which
    the server checks and stores with it, and every consumer parses again.
    """
    if msg.headers and msg.headers.get(_STATUS_HEADER) == _NO_RESPONDERS:
        return nats.js.errors.NoStreamResponseError(), False
    try:
        reply = orjson.loads(msg.data)
    except orjson.JSONDecodeError as exc:
        return DependencyError(f"invalid JetStream reply {msg.data[:200]!r}: {exc}"), False
    if not isinstance(reply, dict):
        return DependencyError(f"invalid JetStream reply {msg.data[:200]!r}: expected a JSON object"), False
    if "error" in reply:
        try:
            nats.js.errors.APIError.from_error(reply["error"])
        except nats.js.errors.APIError as exc:
            return exc, False
        except (KeyError, TypeError):
            return DependencyError(f"invalid JetStream error reply {msg.data[:200]!r}"), False
    if reply.get("stream") != stream:
        return DependencyError(f"stream {reply.get('stream')!r} stored the message instead of stream {stream!r}: that stream now takes the cdc subjects, so delete it or set NATS_STREAM to it"), False
    return None, reply.get("duplicate") is True


def _permanent_error(exc: BaseException, message: Message, stream: str) -> SsmdError:
    if isinstance(exc, nats.errors.MaxPayloadError):
        return ConfigError(
            f"message {message.msg_id} on {message.subject} is {len(message.body)} bytes, over the NATS server's max_payload: "
            f"raise max_payload in the nats-server configuration"
        )
    if isinstance(exc, SsmdError):
        # ssmd's own errors (an invalid reply, a PubAck from another stream) already say what failed.
        return DependencyError(f"publishing message {message.msg_id} on {message.subject} failed: {exc}")
    if isinstance(exc, nats.js.errors.APIError):
        return DependencyError(f"JetStream rejected message {message.msg_id} on {message.subject} for stream {stream}: {exc}")
    return DependencyError(f"publishing message {message.msg_id} on {message.subject} failed: {type(exc).__name__}: {exc}")
