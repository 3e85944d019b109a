"""PostgreSQL as the simulator models it: tables, interleaved transactions, the WAL and one slot.

Change LSNs are allocated when a transaction writes, commit LSNs when it commits, so a
transaction that commits later can carry lower change LSNs than one that committed earlier.
Row locks serialise writers of the same key, as PostgreSQL's do. A commit is in the WAL (and
decodable) at once but becomes visible to new snapshots only after a delay; the exported
snapshot of a slot is exact regardless: it holds every transaction that committed before its
consistent point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ssmd.core.changes import Op, Row

Key = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TableSpec:
    """A simulated table. `markets` puts `event_ticker` first, so its first column is no key."""

    name: str
    columns: tuple[str, ...]
    key_columns: tuple[str, ...]
    namespace: str
    types: dict[str, str]  # column -> type name, as wal2json's include-types gives it

    def key_of(self, row: Row) -> Key:
        return tuple(str(row[column]) for column in self.key_columns)


TABLES: dict[str, TableSpec] = {
    "markets": TableSpec(
        "markets", ("event_ticker", "ticker", "status", "notes"), ("ticker",), "market", dict.fromkeys(("event_ticker", "ticker", "status", "notes"), "text")
    ),
    "events": TableSpec("events", ("event_ticker", "title"), ("event_ticker",), "event", dict.fromkeys(("event_ticker", "title"), "text")),
    "series_fees": TableSpec(
        "series_fees",
        ("series_ticker", "effective_from", "fee"),
        ("series_ticker", "effective_from"),
        "fee",
        {"series_ticker": "text", "effective_from": "date", "fee": "numeric"},
    ),
}
NAMESPACES = {name: spec.namespace for name, spec in TABLES.items()}
TOAST_PREFIX = "big-"  # a `notes` value stored out of line, which wal2json omits when unchanged


@dataclass(slots=True)
class WalChange:
    """One row change as the WAL records it; `row` is the full new row, `omitted` the TOAST columns."""

    op: Op
    table: str
    key: Key | None
    old_key: Key | None
    row: Row | None
    change_lsn: int
    omitted: tuple[str, ...] = ()


@dataclass(slots=True)
class Transaction:
    xid: int
    changes: list[WalChange] = field(default_factory=list)
    view: dict[tuple[str, Key], Row | None] = field(default_factory=dict)  # own uncommitted rows
    locks: set[tuple[str, Key]] = field(default_factory=set)
    commit_lsn: int = 0
    next_lsn: int = 0
    commit_time: int = 0
    visible_at: int = 0


class Database:
    """Committed rows, open transactions, the WAL's committed transactions and the slot."""

    def __init__(self, start_lsn: int) -> None:
        self.rows: dict[str, dict[Key, Row]] = {name: {} for name in TABLES}
        self.wal_end = start_lsn
        self.committed: list[Transaction] = []  # in commit order
        self.open: dict[int, Transaction] = {}
        self.locks: dict[tuple[str, Key], int] = {}
        self.next_xid = 700
        self.slot_exists = False
        self.slot_confirmed = 0
        self.slot_point = 0  # consistent point of the current slot
        self.slot_announced = False  # the publisher's `slot_created` message for it got its PubAck

    # --- WAL --------------------------------------------------------------------------------

    def allocate(self, size: int) -> int:
        lsn = self.wal_end
        self.wal_end += size
        return lsn

    # --- transactions -----------------------------------------------------------------------

    def begin(self) -> Transaction:
        self.next_xid += 1
        transaction = Transaction(self.next_xid)
        self.open[transaction.xid] = transaction
        return transaction

    def current(self, transaction: Transaction | None, table: str, key: Key) -> Row | None:
        """Return the row visible to `transaction`: its own writes, else the committed row."""
        if transaction is not None and (table, key) in transaction.view:
            return transaction.view[(table, key)]
        return self.rows[table].get(key)

    def can_lock(self, transaction: Transaction, table: str, key: Key) -> bool:
        holder = self.locks.get((table, key))
        return holder is None or holder == transaction.xid

    def table_locked_by_other(self, transaction: Transaction | None, table: str) -> bool:
        xid = transaction.xid if transaction is not None else None
        return any(name == table and holder != xid for (name, _), holder in self.locks.items())

    def write(self, transaction: Transaction, change: WalChange) -> None:
        """Record a row change in an open transaction, taking its row locks."""
        for key in (change.key, change.old_key):
            if key is not None:
                self.locks[(change.table, key)] = transaction.xid
                transaction.locks.add((change.table, key))
        if change.old_key is not None:
            transaction.view[(change.table, change.old_key)] = None
        if change.key is not None:
            transaction.view[(change.table, change.key)] = change.row
        transaction.changes.append(change)

    def commit(self, transaction: Transaction, now: int, visible_delay: int, commit_size: int) -> None:
        """Commit: allocate the commit record, apply the rows, release the locks."""
        del self.open[transaction.xid]
        transaction.commit_lsn = self.allocate(commit_size)
        transaction.next_lsn = self.wal_end
        transaction.commit_time = now
        transaction.visible_at = now + visible_delay
        for change in transaction.changes:
            _apply(self.rows, change)
        self._release(transaction)
        self.committed.append(transaction)

    def rollback(self, transaction: Transaction) -> None:
        del self.open[transaction.xid]
        self._release(transaction)

    def _release(self, transaction: Transaction) -> None:
        for lock in transaction.locks:
            del self.locks[lock]

    # --- snapshots --------------------------------------------------------------------------

    def exported_snapshot(self) -> tuple[int, dict[str, dict[Key, Row]]]:
        """Return (consistent point, rows): every committed transaction is below the point."""
        return self.wal_end, {name: dict(rows) for name, rows in self.rows.items()}

    def visible_rows(self, table: str, now: int) -> dict[Key, Row]:
        """Return `table` as an autocommit query at `now` reads it, with only the commits visible by then."""
        rows: dict[str, dict[Key, Row]] = {table: {}}
        for transaction in self.committed:
            if transaction.visible_at <= now:
                for change in transaction.changes:
                    if change.table == table:
                        _apply(rows, change)
        return rows[table]

    # --- the slot ---------------------------------------------------------------------------

    def create_slot(self) -> int:
        self.slot_exists = True
        self.slot_announced = False
        self.slot_point = self.wal_end
        self.slot_confirmed = self.wal_end
        return self.slot_point

    def drop_slot(self) -> None:
        self.slot_exists = False

    def next_decoded(self, after_commit: int | None) -> Transaction | None:
        """Return the first transaction the slot sends after the one committed at `after_commit`.

        A new replication connection (`after_commit` None) starts at the confirmed flush
        position, so transactions already confirmed are not sent again.
        """
        if not self.slot_exists:
            return None
        floor = max(self.slot_point, self.slot_confirmed)
        for transaction in self._committed_from(floor):
            if after_commit is None or transaction.commit_lsn > after_commit:
                return transaction
        return None

    def committed_between(self, low: int, high: int) -> list[Transaction]:
        """Return transactions with `low <= commit_lsn < high`."""
        return [t for t in self._committed_from(low) if t.commit_lsn < high]

    def _committed_from(self, lsn: int):
        # Commit LSNs rise along `committed`, so a binary search finds the start.
        low, high = 0, len(self.committed)
        while low < high:
            middle = (low + high) // 2
            if self.committed[middle].commit_lsn < lsn:
                low = middle + 1
            else:
                high = middle
        return self.committed[low:]


def _apply(rows: dict[str, dict[Key, Row]], change: WalChange) -> None:
    table = rows[change.table]
    if change.op is Op.TRUNCATE:
        table.clear()
        return
    if change.old_key is not None:
        table.pop(change.old_key, None)
    if change.op is Op.DELETE:
        table.pop(change.key, None)
    else:
        table[change.key] = change.row
