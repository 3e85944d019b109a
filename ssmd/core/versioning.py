"""The rules that keep every cached key at its newest version.

Each Redis entry carries the version of its contents: the position (commit LSN, index) of the
change that wrote it, or `warm_version(S)` (just below (S, 0)) for a row read from the warm
snapshot whose consistent point is S. A delete keeps its version as a tombstone, because
without it a warm writer that read the row before the delete would bring the row back. TRUNCATE raises a per-namespace floor, so a late
redelivery from before the truncate cannot write a row again.

Every rule here is pure, and both the simulator and the cache daemon call it. The daemon's Lua
script implements `decide` on packed versions (`Position.pack`), whose string order equals
position order. `decide_packed` is the same rule on that text, so tests can check the script.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from ssmd.core.changes import Row
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position, warm_version


class Decision(str, Enum):
    """Outcome of a versioned write; only `APPLY` changes the cache."""

    APPLY = "apply"
    STALE = "stale"  # the stored version is the same or newer
    BELOW_FLOOR = "below-floor"  # the namespace was truncated at or after this position


def decide(stored: Position | None, incoming: Position, floor: Position | None = None) -> Decision:
    """Return whether a write at `incoming` may replace the entry stored at `stored`.

    `stored` is the version of the value or tombstone, None when the key has neither. A write
    applies only when it is newer than both the stored version and the truncate floor, so
    duplicates (equal versions) are skipped too.
    """
    if floor is not None and not incoming > floor:
        return Decision.BELOW_FLOOR
    if stored is not None and not incoming > stored:
        return Decision.STALE
    return Decision.APPLY


def decide_packed(stored: str | None, incoming: str, floor: str | None = None) -> Decision:
    """Apply `decide` to packed versions, comparing text exactly as the Lua script does."""
    if floor is not None and not incoming > floor:
        return Decision.BELOW_FLOOR
    if stored is not None and not incoming > stored:
        return Decision.STALE
    return Decision.APPLY


@dataclass(frozen=True, slots=True)
class Entry:
    """A cached key: canonical row JSON and its version; a tombstone has no value."""

    value: bytes | None
    version: Position

    @property
    def is_tombstone(self) -> bool:
        return self.value is None


def apply_upsert(entry: Entry | None, value: bytes, version: Position, floor: Position | None = None) -> Entry | None:
    """Return the entry after writing `value` at `version`, or None when the write is skipped."""
    stored = entry.version if entry is not None else None
    if decide(stored, version, floor) is not Decision.APPLY:
        return None
    return Entry(value, version)


def apply_delete(entry: Entry | None, version: Position, floor: Position | None = None) -> Entry | None:
    """Return the tombstone a delete at `version` leaves, or None when the delete is skipped."""
    stored = entry.version if entry is not None else None
    if decide(stored, version, floor) is not Decision.APPLY:
        return None
    return Entry(None, version)


def in_snapshot(commit_lsn: Lsn, snapshot_lsn: Lsn) -> bool:
    """Return whether a transaction committed at `commit_lsn` is already in the warm snapshot.

    The exported snapshot of a slot whose consistent point is S contains exactly the
    transactions that committed before S, so the consumer skips those.
    """
    return commit_lsn < snapshot_lsn


def should_sweep(version: Position, snapshot_lsn: Lsn) -> bool:
    """Return whether the sweep after a warm at `snapshot_lsn` removes a key at `version`.

    A value or tombstone older than the warm version was neither written by this warm nor by a
    change the snapshot does not contain, so its row is absent from the database at S.
    """
    return version < warm_version(snapshot_lsn)


def raise_floor(floor: Position | None, truncate_at: Position) -> Position:
    """Return the namespace floor after a TRUNCATE at `truncate_at`; floors never go down."""
    if floor is None or truncate_at > floor:
        return truncate_at
    return floor


def truncate_clears(version: Position, truncate_at: Position) -> bool:
    """Return whether a TRUNCATE at `truncate_at` removes a key stored at `version`.

    Only older keys go: a change after the truncate may have been applied before it when
    messages are redelivered out of order.
    """
    return version < truncate_at


def merge_unchanged(cached: Row | None, data: Row, unchanged: Iterable[str]) -> Row:
    """Return `data` with each `unchanged` column taken from the cached row.

    The publisher fills TOAST-unchanged columns itself. A column still listed here is one it
    could not re-read because the row was gone, and a later delete removes the row anyway. A
    column missing from the cached row stays missing.
    """
    merged = dict(data)
    for column in unchanged:
        if cached is not None and column in cached:
            merged[column] = cached[column]
    return merged


def needs_rewarm_for_slot(snapshot_lsn: Lsn | None, consistent_point: Lsn) -> bool:
    """Return whether a `slot_created` control message at `consistent_point` forces a re-warm.

    Changes committed before the new slot's consistent point may never reach the stream, so
    a cache whose snapshot is older (or which has none) has to read them from a new snapshot.
    """
    return snapshot_lsn is None or snapshot_lsn < consistent_point


def has_stream_gap(applied_seq: int, first_seq: int) -> bool:
    """Return whether messages after `applied_seq` were discarded before they were applied.

    `applied_seq` is the highest stream sequence applied with all earlier ones; `first_seq` is
    the stream's oldest stored sequence. Discard-old limits raise `first_seq` past messages
    nobody consumed.
    """
    return first_seq > applied_seq + 1
