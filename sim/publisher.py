"""The publisher (`ssmd cdc`) in the simulator: slot -> JetStream, confirming with `AckTracker`.

It receives committed transactions from the slot in commit order, completes TOAST-omitted
columns by re-reading the current row, publishes each change with `Nats-Msg-Id` = its commit
position, and confirms the slot only to what `AckTracker` reports as fully acknowledged.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ssmd.core.changes import Change
from ssmd.core.confirm import AckTracker
from ssmd.core.envelope import Message, encode_change, encode_slot_created
from ssmd.core.invariants import SlotConfirmation
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position
from ssmd.core.wal2json import DecodedChange, fill_columns
from sim.database import TABLES, Database, Transaction, WalChange

SLOT_NAME = "ssmd_cdc"


@dataclass(slots=True)
class Outgoing:
    message: Message
    position: Position | None  # None for a control message
    change_lsn: int  # for a control message: the consistent point it announces
    commit_time: int


class Publisher:
    def __init__(self, strategy: str, stored_ids: set[str]) -> None:
        self.strategy = strategy
        self.stored_ids = stored_ids  # msg ids the stream stored: the truth for no-loss-at-source
        self.up = True
        self.tracker = AckTracker()
        self.cursor: int | None = None  # commit LSN of the last transaction received
        self.outbox: list[Outgoing] = []
        self.confirmations: list[SlotConfirmation] = []

    def crash(self) -> None:
        self.up = False
        self.tracker = AckTracker()
        self.cursor = None
        self.outbox = []

    def start(self, db: Database, now: int) -> str:
        """Reconnect from the confirmed position; create the slot and announce it when missing."""
        self.up = True
        self.tracker = AckTracker()
        self.cursor = None
        self.outbox = []
        line = "publisher start"
        if not db.slot_exists:
            db.create_slot()
            line = f"publisher start, slot created at {Lsn(db.slot_point)}"

        # A crash between creating the slot and the PubAck of its announcement would hide the
        # lost changes from the cache, so every start repeats the announcement until it is
        # acknowledged. NOTE: the model keeps that mark in `db`; a real publisher needs a durable one.
        if not db.slot_announced:
            message = encode_slot_created(SLOT_NAME, Lsn(db.slot_point))
            self.outbox.append(Outgoing(message, None, db.slot_point, now))
        return line

    def can_receive(self, db: Database) -> bool:
        return self.up and db.next_decoded(self.cursor) is not None

    def receive(self, db: Database, now: int) -> str:
        """Take the next decoded transaction from the slot and queue its messages."""
        transaction = db.next_decoded(self.cursor)
        assert transaction is not None
        self.cursor = transaction.commit_lsn
        commit_lsn = Lsn(transaction.commit_lsn)
        self.tracker.open(commit_lsn, Lsn(transaction.next_lsn))
        for index, wal_change in enumerate(transaction.changes):
            change = self._complete(db, transaction, index, wal_change)
            self.outbox.append(Outgoing(encode_change(change), change.position, wal_change.change_lsn, transaction.commit_time))
            self.tracker.sent(change.position)
        self.tracker.close(commit_lsn)

        if self.strategy == "consume-before-publish":
            self.confirm_to(db, transaction.next_lsn)
        return f"publisher receive xid={transaction.xid} commit={commit_lsn} changes={len(transaction.changes)}"

    def _complete(self, db: Database, transaction: Transaction, index: int, wal_change: WalChange) -> Change:
        """Return the change as the publisher publishes it, with omitted and NaN values filled in."""
        spec = TABLES[wal_change.table]
        key = dict(zip(spec.key_columns, wal_change.key)) if wal_change.key is not None else {}
        change = Change(
            op=wal_change.op,
            schema="public",
            table=wal_change.table,
            position=Position(Lsn(transaction.commit_lsn), index),
            xid=transaction.xid,
            key=key,
            old_key=dict(zip(spec.key_columns, wal_change.old_key)) if wal_change.old_key is not None else None,
            data=_as_wal2json_sends(wal_change),
            unchanged=wal_change.omitted,
            commit_time=str(transaction.commit_time),
        )
        if change.data is None:
            return change

        omitted = wal_change.omitted
        if self.strategy == "toast-as-null":
            change = replace(change, data={**change.data, **dict.fromkeys(omitted)}, unchanged=())
        elif self.strategy == "toast-replace":
            change = replace(change, unchanged=())
        change = fill_columns(DecodedChange(change, key, spec.types), self._reread(db, wal_change))
        if self.strategy == "toast-replace":
            change = replace(change, unchanged=omitted)
        return change

    def _reread(self, db: Database, wal_change: WalChange) -> dict[str, str | None] | None:
        """Return the current row's text output by key, None when the row is gone.

        The re-read value can be newer than this change, but every later change of the column
        carries its own value, so the cache still converges.
        """
        current = db.rows[wal_change.table].get(wal_change.key)
        if current is None:
            return None
        return {column: None if value is None else str(value) for column, value in current.items()}

    def can_publish(self) -> bool:
        return self.up and bool(self.outbox)

    def pop_outgoing(self, index: int) -> Outgoing:
        return self.outbox.pop(index)

    def acknowledged(self, db: Database, outgoing: Outgoing) -> None:
        if outgoing.position is not None:
            self.tracker.acked(outgoing.position)
        elif outgoing.change_lsn == db.slot_point:
            db.slot_announced = True

    def can_confirm(self, db: Database) -> bool:
        confirmable = self.tracker.confirmable()
        return self.up and db.slot_exists and confirmable is not None and confirmable.value > db.slot_confirmed

    def confirm(self, db: Database) -> str:
        confirmable = self.tracker.confirmable()
        assert confirmable is not None
        self.confirm_to(db, confirmable.value)
        return f"publisher confirm {confirmable}"

    def confirm_to(self, db: Database, lsn: int) -> None:
        """Move the slot's confirmed flush position, recording what was not yet in the stream."""
        unacknowledged = tuple(
            Lsn(transaction.commit_lsn)
            for transaction in db.committed_between(db.slot_confirmed, lsn)
            if not self.all_stored(transaction)
        )
        self.confirmations.append(SlotConfirmation(Lsn(lsn), unacknowledged))
        db.slot_confirmed = max(db.slot_confirmed, lsn)

    def all_stored(self, transaction: Transaction) -> bool:
        stored = self.stored_ids
        commit = Lsn(transaction.commit_lsn)
        return all(Position(commit, index).message_id() in stored for index in range(len(transaction.changes)))


def _as_wal2json_sends(wal_change: WalChange) -> dict | None:
    """Return the row as wal2json 2.5 sends it: TOAST-omitted columns left out, numeric NaN as null."""
    if wal_change.row is None:
        return None
    data = {column: value for column, value in wal_change.row.items() if column not in wal_change.omitted}
    if data.get("fee") == "NaN":
        data["fee"] = None
    return data
