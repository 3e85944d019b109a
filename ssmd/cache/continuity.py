"""Tell when the cache may have missed changes, so the daemon re-warms, and why.

Reasons, each logged by the daemon:
- the meta hash is missing or a warm never finished: Redis lost its data or a warm was cut off;
- the stream's creation time differs from the one the last warm recorded: a new stream, whose
  sequences start again and whose messages before its creation are gone;
- the stream's first sequence is past the last applied one + 1: discard-old limits removed
  messages nobody applied;
- a first delivery jumps past the previous first delivery + 1: messages vanished between
  deliveries (the consumer sees every subject of the stream, so first deliveries are
  consecutive otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from ssmd.bus.stream import StreamState
from ssmd.core.lsn import Lsn
from ssmd.core.versioning import has_stream_gap


def format_created(created: datetime | None) -> str:
    return created.isoformat() if created is not None else ""


def rewarm_reason(meta: dict[str, str], stream: StreamState | None, consumer_exists: bool) -> str | None:
    """Return why the cache must warm before consuming, or None when it can resume."""
    if not meta:
        return "meta hash missing (first start, or Redis lost its data)"
    if meta.get("state") != "ready":
        return f"previous warm did not finish (state {meta.get('state')!r})"
    if stream is None:
        return "stream missing"
    if meta.get("stream_created", "") != format_created(stream.created):
        return f"stream created at {format_created(stream.created)}, cache followed the one created at {meta.get('stream_created')}"
    if not consumer_exists:
        return "durable consumer missing"
    return stream_gap_reason(int(meta.get("stream_seq", "0")), stream)


def stream_gap_reason(applied_seq: int, stream: StreamState) -> str | None:
    """Return a reason when the stream discarded messages after `applied_seq`."""
    if stream.messages and has_stream_gap(applied_seq, stream.first_seq):
        return f"stream discarded messages: first_seq {stream.first_seq} > applied stream_seq {applied_seq} + 1"
    if not stream.messages and stream.last_seq > applied_seq and stream.first_seq > applied_seq + 1:
        return f"stream discarded messages: empty at last_seq {stream.last_seq} > applied stream_seq {applied_seq}"
    return None


@dataclass
class SequenceTracker:
    """Stream sequences handled so far: the contiguous prefix, and first-delivery order.

    `contiguous` is the highest sequence handled together with every earlier one; the LSN of
    what it covers becomes the cache's applied LSN. A handled sequence above it waits in
    `_done` until the gap below fills (a redelivery applied later).
    """

    contiguous: int
    last_first_delivery: int
    applied_lsn: Lsn | None = None
    _done: dict[int, Lsn | None] = field(default_factory=dict)

    def first_delivery_gap(self, stream_seq: int, num_delivered: int) -> str | None:
        """Record a delivery; return a reason when a first delivery skipped sequences."""
        if num_delivered != 1:
            return None
        previous = self.last_first_delivery
        self.last_first_delivery = max(previous, stream_seq)
        if stream_seq > previous + 1:
            return f"first delivery of stream seq {stream_seq} after {previous}: messages {previous + 1}..{stream_seq - 1} were never delivered"
        return None

    def handled(self, stream_seq: int, lsn: Lsn | None) -> None:
        """Record a message as applied, skipped or terminated; advance the contiguous prefix."""
        if stream_seq <= self.contiguous:
            return
        self._done[stream_seq] = lsn
        self._advance()

    def acknowledged_through(self, ack_floor: int) -> None:
        """Count every sequence up to the consumer's ack floor as handled.

        A killed earlier instance may have acknowledged messages above the `stream_seq` it last
        stored. JetStream never redelivers those, so without the floor the contiguous prefix
        would stop below them for good.
        """
        if ack_floor <= self.contiguous:
            return
        for stream_seq in [seq for seq in self._done if seq <= ack_floor]:
            self._cover(self._done.pop(stream_seq))
        self.contiguous = ack_floor
        self._advance()

    def _advance(self) -> None:
        while self.contiguous + 1 in self._done:
            self.contiguous += 1
            self._cover(self._done.pop(self.contiguous))

    def _cover(self, lsn: Lsn | None) -> None:
        if lsn is not None and (self.applied_lsn is None or lsn > self.applied_lsn):
            self.applied_lsn = lsn
