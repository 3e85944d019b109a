"""How far the publisher may confirm the slot.

wal2json format-version 2 sends a transaction only after it committed, and its `B` record
already carries the commit LSN, so the publisher can publish every change as it arrives and
needs no buffering. The slot, however, may be confirmed to a transaction's `nextlsn` only when
every message of that transaction and of all earlier ones has its PubAck: otherwise a crash
loses what the slot will never send again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from ssmd.core.errors import InternalError
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position


@dataclass(slots=True)
class _Transaction:
    next_lsn: Lsn
    pending: int = 0
    closed: bool = False


class AckTracker:
    """In-flight transactions in commit order, and the confirmable position."""

    def __init__(self) -> None:
        self._transactions: OrderedDict[Lsn, _Transaction] = OrderedDict()
        self._confirmable: Lsn | None = None

    def open(self, commit_lsn: Lsn, next_lsn: Lsn) -> None:
        """Start tracking a transaction at its `B` record."""
        if self._transactions and commit_lsn <= next(reversed(self._transactions)):
            raise InternalError(f"transaction {commit_lsn} opened out of commit order")
        self._transactions[commit_lsn] = _Transaction(next_lsn)

    def sent(self, position: Position) -> None:
        """Count one published message that still waits for its PubAck."""
        self._get(position.commit_lsn).pending += 1

    def close(self, commit_lsn: Lsn) -> None:
        """Mark that the transaction's `C` record arrived, so no more messages follow."""
        self._get(commit_lsn).closed = True
        self._advance()

    def acked(self, position: Position) -> None:
        """Record a PubAck (a `duplicate` acknowledgement counts too)."""
        transaction = self._transactions.get(position.commit_lsn)
        if transaction is None:
            return  # an earlier transaction already fully acknowledged, e.g. a retried publish
        transaction.pending -= 1
        if transaction.pending < 0:
            raise InternalError(f"more acknowledgements than messages for transaction {position.commit_lsn}")
        self._advance()

    def confirmable(self) -> Lsn | None:
        """Return the newest `nextlsn` below which everything is acknowledged, if any."""
        return self._confirmable

    def in_flight(self) -> int:
        """Return the number of transactions not yet fully acknowledged."""
        return len(self._transactions)

    def idle_confirmable(self, wal_end: Lsn) -> Lsn | None:
        """Return `wal_end` when nothing is in flight, so a keepalive may move the slot."""
        return None if self._transactions else wal_end

    def _get(self, commit_lsn: Lsn) -> _Transaction:
        try:
            return self._transactions[commit_lsn]
        except KeyError:
            raise InternalError(f"transaction {commit_lsn} is not open") from None

    def _advance(self) -> None:
        while self._transactions:
            commit_lsn, transaction = next(iter(self._transactions.items()))
            if not transaction.closed or transaction.pending:
                return
            del self._transactions[commit_lsn]
            self._confirmable = transaction.next_lsn
