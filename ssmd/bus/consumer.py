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
import time
from collections import deque
from dataclasses import dataclass

import orjson

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, ReplayPolicy
from nats.js.errors import APIError, NotFoundError

from ssmd.core.errors import DependencyError
from ssmd.logs import fields

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


def delivery_of(msg: Msg) -> tuple[int, int]:
    """Return (stream sequence, delivery count) from a JetStream message's ack subject.

    nats-py's `msg.metadata` builds a dataclass tree and a datetime per message. The ack subject
    is `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
    or the same with domain and account hash after `ACK` and a random token at the end.
    """
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[4].isdigit() and tokens[5].isdigit():
        return int(tokens[5]), int(tokens[4])
    if len(tokens) >= 12 and tokens[6].isdigit() and tokens[7].isdigit():
        return int(tokens[7]), int(tokens[6])
    metadata = msg.metadata  # raises nats-py's error for a subject that is not an ack subject
    return metadata.sequence.stream, metadata.num_delivered


class PullConsumer:
    """Fetches batches from the durable consumer with its own pull requests.

    nats-py's `fetch` waits for each message through a new task with a timeout, which cost more
    than applying the message. Here one subscription callback collects the messages of every
    request in a buffer. A fetch first requests what the consumer has now (`no_wait`). Only when
    that is nothing does it keep a request open on the server.

    Messages that were delivered but not yet handed out are negatively acknowledged at `close`,
    so the next consumer gets them at once instead of after `ack_wait`.
    """

    def __init__(self, js: JetStreamContext, settings: ConsumerSettings, *, api_prefix: str = "$JS.API") -> None:
        self._nc = js._nc  # nats-py exposes the connection of a JetStream context only this way
        self._settings = settings
        self._next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{settings.stream}.{settings.durable}"
        self._subscription = None
        self._prefix = ""
        self._buffer: deque[Msg] = deque()
        self._changed = asyncio.Event()
        self._last_request = 0
        self._open: _Request | None = None
        self._error: DependencyError | None = None

    async def open(self) -> None:
        inbox = self._nc.new_inbox()
        self._prefix = inbox + "."
        self._subscription = await self._nc.subscribe(inbox + ".*", cb=self._on_message)

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Return up to `batch` messages, or an empty list when none arrived within `timeout`."""
        if self._subscription is None:
            await self.open()
        self._raise_error()
        if not self._buffer and self._open is None:
            await self._request(batch, wait_s=None)
        if self._open is not None and self._open.no_wait:
            await self._wait(lambda: self._open is None or len(self._buffer) >= batch, timeout)
        if not self._buffer:
            if self._open is None:
                # Nothing is there: hold a request on the server until one message arrives. A
                # larger one would go on delivering while that message is applied, and those
                # messages' ack_wait would run out in the buffer if applying stalls.
                await self._request(1, wait_s=timeout)
            await self._wait(lambda: self._buffer or self._open is None, timeout + _EXPIRY_MARGIN_S)
        self._raise_error()
        return [self._buffer.popleft() for _ in range(min(batch, len(self._buffer)))]

    async def close(self) -> None:
        """Wait briefly for the open request, hand back undelivered messages, and unsubscribe."""
        if self._subscription is None:
            return
        if self._open is not None and self._error is None:
            await self._wait(lambda: self._open is None, min(self._open.remaining_s(), _CLOSE_WAIT_S))
        for msg in self._buffer:
            try:
                await msg.nak()
            except Exception as exc:  # the connection may be gone; the server redelivers after ack_wait
                log.debug("nak of a buffered message failed: %s", exc)
                break
        self._buffer.clear()
        try:
            await self._subscription.unsubscribe()
        except Exception as exc:  # the connection may already be gone; nothing to keep
            log.debug("unsubscribe failed: %s", exc)
        self._subscription = None
        self._open = None

    async def _request(self, batch: int, wait_s: float | None) -> None:
        """Send a pull request: without `wait_s` the server replies at once with the messages it has."""
        self._last_request += 1
        token = str(self._last_request)
        body: dict[str, object] = {"batch": batch}
        if wait_s is None:
            body["no_wait"] = True
            expires_at = time.monotonic() + _NO_WAIT_EXPIRY_S
        else:
            body["expires"] = int(wait_s * 1_000_000_000)
            expires_at = time.monotonic() + wait_s
        self._open = _Request(token, batch, expires_at, no_wait=wait_s is None)
        await self._nc.publish(self._next_subject, orjson.dumps(body), reply=self._prefix + token)

    async def _wait(self, condition, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition() and self._error is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if self._open is not None and self._open.remaining_s() <= 0:
                    self._open = None  # its end status was lost, so the next fetch sends a new request
                return
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    async def _on_message(self, msg: Msg) -> None:
        status = msg.headers.get(_STATUS_HEADER) if msg.headers else None
        request = self._open
        if status is None:
            # A stream message keeps its own subject, so it counts toward the one open request.
            self._buffer.append(msg)
            if request is not None:
                request.delivered += 1
                if request.delivered >= request.batch:
                    self._open = None
        elif status in _REQUEST_DONE:
            # A status goes to the request's reply subject: one for an older request changes nothing.
            if request is not None and msg.subject == self._prefix + request.token:
                self._open = None
        elif status != _HEARTBEAT:
            description = msg.headers.get(_DESCRIPTION_HEADER, "")
            self._error = DependencyError(f"fetch from consumer {self._settings.durable} on stream {self._settings.stream} failed: status {status} {description}".rstrip())
            log.error("pull request failed %s", fields(consumer=self._settings.durable, stream=self._settings.stream, status=status, description=description))
            self._open = None
        self._changed.set()

    def _raise_error(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error


@dataclass(slots=True)
class _Request:
    """The one pull request this consumer has open at a time."""

    token: str
    batch: int
    expires_at: float
    no_wait: bool
    delivered: int = 0

    def remaining_s(self) -> float:
        return max(0.0, self.expires_at - time.monotonic())


_STATUS_HEADER = "Status"
_DESCRIPTION_HEADER = "Description"
_HEARTBEAT = "100"
_REQUEST_DONE = ("404", "408")  # no messages, request expired
_NO_WAIT_EXPIRY_S = 5.0  # a no-wait request ends at once; this only bounds a lost end status
_EXPIRY_MARGIN_S = 0.5
_CLOSE_WAIT_S = 2.0
