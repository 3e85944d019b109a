"""The invariants checker: one pure function used by the simulator, the tests and `ssmd verify`.

Input is the database state at a position, the cache state, and optionally a history of what
happened on the way. Database state maps each followed table to {key text: canonical row JSON}.
Cache state maps each namespace to {key text: (value or None, packed version or None)}: a
tombstone has a version and no value. The history parts are each optional, so a check against a
real stack with only database and cache state reports what those two can show (convergence).

Each violation names one of the invariants in `INVARIANTS`.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from ssmd.core.errors import DecodeError

from ssmd.core.lsn import Lsn
from ssmd.core.position import Position

INVARIANTS = (
    "convergence",
    "monotonic",
    "no-loss-at-source",
    "idempotent",
    "exact-boundary",
    "no-resurrection",
    "continuity",
    "fresh",
)

DatabaseState = Mapping[str, Mapping[str, bytes]]
CacheEntry = tuple[bytes | None, str | None]
CacheState = Mapping[str, Mapping[str, CacheEntry]]


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant, on a table or namespace and, where it applies, a key."""

    invariant: str
    table_or_namespace: str
    key: str | None
    detail: str

    def __str__(self) -> str:
        where = self.table_or_namespace if self.key is None else f"{self.table_or_namespace}:{self.key}"
        return f"{self.invariant} at {where}: {self.detail}"


@dataclass(frozen=True, slots=True)
class VersionWrite:
    """A version stored for a key (value or tombstone), in the order the writes happened."""

    namespace: str
    key: str
    version: str  # packed


@dataclass(frozen=True, slots=True)
class SlotConfirmation:
    """The slot confirmed up to `confirmed` while transactions were not fully acknowledged.

    `unacknowledged` holds the commit LSNs of transactions read from the slot that had a change
    without a PubAck at that moment.
    """

    confirmed: Lsn
    unacknowledged: tuple[Lsn, ...] = ()


@dataclass(frozen=True, slots=True)
class BoundaryDecision:
    """Whether the consumer treated a change as contained in the warm data, and the truth."""

    table: str
    position: Position
    decided_in_snapshot: bool
    actually_in_snapshot: bool


@dataclass(frozen=True, slots=True)
class Gap:
    """A moment the cache may have missed changes: discarded messages, a new stream or slot."""

    time: float
    reason: str


@dataclass(frozen=True, slots=True)
class ApplyLag:
    """Time from a transaction's commit to the write of one of its changes in the cache."""

    namespace: str
    key: str
    position: Position
    lag: float


@dataclass(frozen=True, slots=True)
class History:
    """Observations of one run; any part may be left empty when it was not observed."""

    version_writes: Sequence[VersionWrite] = ()
    confirmations: Sequence[SlotConfirmation] = ()
    boundary_decisions: Sequence[BoundaryDecision] = ()
    deleted_keys: Collection[tuple[str, str]] = ()  # (namespace, key) of every delete seen
    gaps: Sequence[Gap] = ()
    warm_snapshot_times: Sequence[float] = ()  # when each completed warm took its snapshot
    lags: Sequence[ApplyLag] = ()
    lag_bound: float | None = None
    replayed_cache: CacheState | None = None  # the cache after replaying delivered messages on a copy


def check(
    database: DatabaseState,
    cache: CacheState,
    namespaces: Mapping[str, str],
    history: History | None = None,
) -> list[Violation]:
    """Return every violation found; `namespaces` maps each followed table to its namespace."""
    violations = _check_convergence(database, cache, namespaces)
    if history is None:
        return violations

    violations += _check_monotonic(history.version_writes)
    violations += _check_no_loss_at_source(history.confirmations)
    violations += _check_idempotent(cache, history.replayed_cache)
    violations += _check_exact_boundary(history.boundary_decisions)
    violations += _check_no_resurrection(database, cache, namespaces, history.deleted_keys)
    violations += _check_continuity(history.gaps, history.warm_snapshot_times)
    violations += _check_fresh(history.lags, history.lag_bound)
    return violations


def _check_convergence(database: DatabaseState, cache: CacheState, namespaces: Mapping[str, str]) -> list[Violation]:
    violations = []
    for table, namespace in namespaces.items():
        rows = database.get(table, {})
        entries = cache.get(namespace, {})
        for key, row in rows.items():
            value, _ = entries.get(key, (None, None))
            if value is None:
                violations.append(Violation("convergence", namespace, key, "row missing from cache"))
            elif value != row:
                violations.append(Violation("convergence", namespace, key, f"cached {value!r} != database {row!r}"))
        for key, (value, version) in entries.items():
            if value is not None and key not in rows:
                violations.append(Violation("convergence", namespace, key, "cached key not in database"))
            if value is not None and version is None:
                violations.append(Violation("convergence", namespace, key, "cached value has no version"))

    followed = set(namespaces.values())
    for namespace, entries in cache.items():
        if namespace in followed:
            continue
        for key, (value, _) in entries.items():
            if value is not None:
                violations.append(Violation("convergence", namespace, key, "key in a namespace no followed table uses"))
    return violations


def _check_monotonic(writes: Sequence[VersionWrite]) -> list[Violation]:
    violations = []
    latest: dict[tuple[str, str], str] = {}
    for write in writes:
        slot = (write.namespace, write.key)
        previous = latest.get(slot)
        if previous is not None and write.version < previous:
            detail = f"version went from {_show(previous)} down to {_show(write.version)}"
            violations.append(Violation("monotonic", write.namespace, write.key, detail))
        if previous is None or write.version > previous:
            latest[slot] = write.version
    return violations


def _check_no_loss_at_source(confirmations: Sequence[SlotConfirmation]) -> list[Violation]:
    violations = []
    for confirmation in confirmations:
        for commit_lsn in confirmation.unacknowledged:
            if commit_lsn < confirmation.confirmed:
                detail = f"slot confirmed to {confirmation.confirmed} before transaction {commit_lsn} was acknowledged"
                violations.append(Violation("no-loss-at-source", "slot", None, detail))
    return violations


def _check_idempotent(cache: CacheState, replayed: CacheState | None) -> list[Violation]:
    if replayed is None:
        return []
    violations = []
    for namespace in sorted(set(cache) | set(replayed)):
        before = cache.get(namespace, {})
        after = replayed.get(namespace, {})
        for key in sorted(set(before) | set(after)):
            if before.get(key) != after.get(key):
                detail = f"replay changed {before.get(key)!r} to {after.get(key)!r}"
                violations.append(Violation("idempotent", namespace, key, detail))
    return violations


def _check_exact_boundary(decisions: Sequence[BoundaryDecision]) -> list[Violation]:
    violations = []
    for decision in decisions:
        if decision.decided_in_snapshot != decision.actually_in_snapshot:
            wrong = "skipped as already warm" if decision.decided_in_snapshot else "applied although warm read it"
            detail = f"change at {decision.position} {wrong}"
            violations.append(Violation("exact-boundary", decision.table, None, detail))
    return violations


def _check_no_resurrection(
    database: DatabaseState,
    cache: CacheState,
    namespaces: Mapping[str, str],
    deleted_keys: Collection[tuple[str, str]],
) -> list[Violation]:
    tables = {namespace: table for table, namespace in namespaces.items()}
    violations = []
    for namespace, key in sorted(set(deleted_keys)):
        value, _ = cache.get(namespace, {}).get(key, (None, None))
        table = tables.get(namespace)
        if value is not None and table is not None and key not in database.get(table, {}):
            violations.append(Violation("no-resurrection", namespace, key, "deleted row is cached again"))
    return violations


def _check_continuity(gaps: Sequence[Gap], warm_snapshot_times: Sequence[float]) -> list[Violation]:
    last_warm = max(warm_snapshot_times, default=None)
    violations = []
    for gap in gaps:
        if last_warm is None or last_warm < gap.time:
            detail = f"{gap.reason} at t={gap.time:g} and no warm snapshot after it"
            violations.append(Violation("continuity", "stream", None, detail))
    return violations


def _check_fresh(lags: Sequence[ApplyLag], bound: float | None) -> list[Violation]:
    if bound is None:
        return []
    violations = []
    for lag in lags:
        if lag.lag > bound:
            detail = f"change at {lag.position} applied {lag.lag:g} after commit, bound {bound:g}"
            violations.append(Violation("fresh", lag.namespace, lag.key, detail))
    return violations


def _show(packed: str) -> str:
    try:
        return str(Position.unpack(packed))
    except DecodeError:
        return packed
