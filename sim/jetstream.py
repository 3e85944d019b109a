"""JetStream as the simulator models it: one stream with a durable pull consumer.

The stream deduplicates by `Nats-Msg-Id` within a window of virtual time, keeps at most
`max_messages` (discard-old), and can be deleted and created again by an administrator, which
gives it a new identity. The consumer redelivers a message whose ack did not arrive within
`ack_wait` or that was negatively acknowledged, and may deliver unacknowledged messages out of
order. A handler terminates (AckTerm) a message that failed on its last allowed delivery.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ssmd.core.envelope import Message


@dataclass(slots=True)
class StoredMessage:
    seq: int
    message: Message
    change_lsn: int  # the change's own LSN, carried only for the `change-lsn-order` strategy
    commit_time: int
    failures_left: int = 0  # handler failures still to come, injected as a fault


@dataclass(slots=True)
class Stream:
    window: int
    max_messages: int
    identity: int = 1
    messages: dict[int, StoredMessage] = field(default_factory=dict)
    first_seq: int = 1
    last_seq: int = 0
    dedupe: dict[str, int] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)
    deadlines: dict[int, int] = field(default_factory=dict)  # seq -> redelivery time
    deliveries: dict[int, int] = field(default_factory=dict)  # seq -> delivery count
    terminated: list[tuple[int, int, int]] = field(default_factory=list)  # (time, identity, seq)
    ever_stored: set[str] = field(default_factory=set)  # msg ids stored in any stream
    discarded: list[tuple[int, int, int]] = field(default_factory=list)  # (time, identity, seq) not yet acked

    def publish(self, message: Message, change_lsn: int, commit_time: int, now: int) -> bool:
        """Store a message unless it is a duplicate inside the window; return True if stored."""
        stored_at = self.dedupe.get(message.msg_id)
        if stored_at is not None and now - stored_at < self.window:
            return False
        self.last_seq += 1
        self.messages[self.last_seq] = StoredMessage(self.last_seq, message, change_lsn, commit_time)
        self.dedupe[message.msg_id] = now
        self.ever_stored.add(message.msg_id)
        while len(self.messages) > self.max_messages:
            self._discard_oldest(now)
        return True

    def _discard_oldest(self, now: int) -> None:
        seq = self.first_seq
        self.messages.pop(seq, None)
        self.first_seq += 1
        if seq not in self.acked:
            self.discarded.append((now, self.identity, seq))
        self.acked.discard(seq)
        self.deadlines.pop(seq, None)
        self.deliveries.pop(seq, None)

    def recreate(self) -> None:
        """Delete the stream and create it again: new identity, sequences restart at 1."""
        self.identity += 1
        self.messages.clear()
        self.first_seq = 1
        self.last_seq = 0
        self.dedupe.clear()
        self.acked.clear()
        self.deadlines.clear()
        self.deliveries.clear()

    def deliverable(self, now: int, limit: int) -> list[int]:
        """Return up to `limit` sequences the consumer may deliver now, oldest first."""
        found = []
        for seq in self.messages:
            if seq in self.acked:
                continue
            deadline = self.deadlines.get(seq)
            if deadline is None or deadline <= now:
                found.append(seq)
                if len(found) == limit:
                    break
        return found

    def deliver(self, seq: int, now: int, ack_wait: int) -> StoredMessage:
        self.deadlines[seq] = now + ack_wait
        self.deliveries[seq] = self.deliveries.get(seq, 0) + 1
        return self.messages[seq]

    def nak(self, identity: int, seq: int, redeliver_at: int) -> None:
        if identity == self.identity and seq in self.messages and seq not in self.acked:
            self.deadlines[seq] = redeliver_at

    def terminate(self, identity: int, seq: int, now: int) -> None:
        """Stop redelivering a message the handler gave up on (AckTerm)."""
        if identity == self.identity and seq in self.messages and seq not in self.acked:
            self.acked.add(seq)
            self.deadlines.pop(seq, None)
            self.terminated.append((now, identity, seq))

    def ack(self, identity: int, seq: int) -> None:
        if identity == self.identity and seq in self.messages:
            self.acked.add(seq)
            self.deadlines.pop(seq, None)

    def next_deadline(self) -> int | None:
        pending = [deadline for seq, deadline in self.deadlines.items() if seq not in self.acked]
        return min(pending, default=None)
