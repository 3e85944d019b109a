"""The invariants checker on hand-made states, plus a Hypothesis machine over a versioned cache."""

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ssmd.core.invariants import (
    INVARIANTS,
    ApplyLag,
    BoundaryDecision,
    Gap,
    History,
    SlotConfirmation,
    VersionWrite,
    check,
)
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position
from ssmd.core.versioning import Entry, apply_delete, apply_upsert

NAMESPACES = {"markets": "market"}


def pos(text: str, index: int = 0) -> Position:
    return Position(Lsn.parse(text), index)


def names(violations) -> set[str]:
    return {violation.invariant for violation in violations}


def test_equal_states_have_no_violations():
    database = {"markets": {"A": b'{"ticker":"A"}'}}
    cache = {"market": {"A": (b'{"ticker":"A"}', pos("0/1").pack()), "B": (None, pos("0/2").pack())}}
    assert check(database, cache, NAMESPACES) == []
    assert check(database, cache, NAMESPACES, History()) == []


def test_missing_extra_and_wrong_values_break_convergence():
    database = {"markets": {"A": b"1", "B": b"2"}}
    cache = {"market": {"A": (b"9", pos("0/1").pack()), "C": (b"3", pos("0/1").pack())}}
    found = {(v.key, v.detail.split(" ")[0]) for v in check(database, cache, NAMESPACES)}
    assert ("A", "cached") in found
    assert ("B", "row") in found
    assert ("C", "cached") in found


def test_unfollowed_namespace_breaks_convergence():
    violations = check({}, {"markets": {"A": (b"1", pos("0/1").pack())}}, NAMESPACES)
    assert names(violations) == {"convergence"}
    assert violations[0].table_or_namespace == "markets"


def test_value_without_version_breaks_convergence():
    violations = check({"markets": {"A": b"1"}}, {"market": {"A": (b"1", None)}}, NAMESPACES)
    assert names(violations) == {"convergence"}


def test_version_going_down_breaks_monotonic():
    writes = [VersionWrite("market", "A", pos("0/10").pack()), VersionWrite("market", "A", pos("0/9").pack())]
    violations = check({}, {}, NAMESPACES, History(version_writes=writes))
    assert names(violations) == {"monotonic"}
    assert violations[0].key == "A"


def test_confirm_past_unacked_breaks_no_loss():
    ok = SlotConfirmation(Lsn.parse("0/10"), (Lsn.parse("0/10"),))
    bad = SlotConfirmation(Lsn.parse("0/10"), (Lsn.parse("0/8"),))
    assert check({}, {}, NAMESPACES, History(confirmations=[ok])) == []
    assert names(check({}, {}, NAMESPACES, History(confirmations=[bad]))) == {"no-loss-at-source"}


def test_replay_changing_state_breaks_idempotent():
    cache = {"market": {"A": (b"1", pos("0/2").pack())}}
    replayed = {"market": {"A": (b"0", pos("0/1").pack())}}
    database = {"markets": {"A": b"1"}}
    assert check(database, cache, NAMESPACES, History(replayed_cache=cache)) == []
    assert names(check(database, cache, NAMESPACES, History(replayed_cache=replayed))) == {"idempotent"}


def test_wrong_boundary_decision_breaks_exact_boundary():
    right = BoundaryDecision("markets", pos("0/5"), True, True)
    wrong = BoundaryDecision("markets", pos("0/6"), True, False)
    violations = check({}, {}, NAMESPACES, History(boundary_decisions=[right, wrong]))
    assert names(violations) == {"exact-boundary"}
    assert len(violations) == 1


def test_deleted_key_cached_again_breaks_no_resurrection():
    cache = {"market": {"A": (b"1", pos("0/1").pack())}}
    violations = check({"markets": {}}, cache, NAMESPACES, History(deleted_keys=[("market", "A")]))
    assert names(violations) == {"convergence", "no-resurrection"}


def test_reinserted_key_is_not_resurrection():
    cache = {"market": {"A": (b"1", pos("0/3").pack())}}
    history = History(deleted_keys=[("market", "A")])
    assert check({"markets": {"A": b"1"}}, cache, NAMESPACES, history) == []


def test_gap_without_later_warm_breaks_continuity():
    gaps = [Gap(5.0, "messages discarded")]
    assert check({}, {}, NAMESPACES, History(gaps=gaps, warm_snapshot_times=[1.0, 6.0])) == []
    assert names(check({}, {}, NAMESPACES, History(gaps=gaps, warm_snapshot_times=[1.0]))) == {"continuity"}


def test_lag_over_bound_breaks_fresh():
    lags = [ApplyLag("market", "A", pos("0/1"), 0.5), ApplyLag("market", "B", pos("0/2"), 3.0)]
    violations = check({}, {}, NAMESPACES, History(lags=lags, lag_bound=1.0))
    assert names(violations) == {"fresh"}
    assert [v.key for v in violations] == ["B"]


def test_every_name_is_listed():
    assert len(INVARIANTS) == 8


class VersionedCacheMachine(RuleBasedStateMachine):
    """Writes and deletes arrive in any order, duplicated; the cache ends at the database."""

    def __init__(self) -> None:
        super().__init__()
        self.next_lsn = 0x0FFFFFF0  # near the 7-to-8 hex digit step
        self.database: dict[str, bytes] = {}
        self.pending: list[tuple[str, bytes | None, Position]] = []
        self.delivered: list[tuple[str, bytes | None, Position]] = []
        self.entries: dict[str, Entry] = {}
        self.writes: list[VersionWrite] = []
        self.deleted: set[tuple[str, str]] = set()

    def _commit(self, key: str, value: bytes | None) -> None:
        self.next_lsn += 0x9
        position = Position(Lsn(self.next_lsn))
        if value is None:
            self.database.pop(key, None)
        else:
            self.database[key] = value
        self.pending.append((key, value, position))

    @rule(key=st.sampled_from("ABC"), value=st.binary(min_size=1, max_size=3))
    def upsert(self, key, value):
        self._commit(key, value)

    @rule(key=st.sampled_from("ABC"))
    def delete(self, key):
        self._commit(key, None)

    @rule(data=st.data())
    def deliver(self, data):
        if not self.pending:
            return
        index = data.draw(st.integers(0, len(self.pending) - 1))
        message = self.pending[index] if data.draw(st.booleans()) else self.pending.pop(index)
        self._apply(message)

    def _apply(self, message) -> None:
        key, value, position = message
        self.delivered.append(message)
        entry = self.entries.get(key)
        if value is None:
            self.deleted.add(("market", key))
            new = apply_delete(entry, position)
        else:
            new = apply_upsert(entry, value, position)
        if new is not None:
            self.entries[key] = new
            self.writes.append(VersionWrite("market", key, position.pack()))

    def _cache(self) -> dict:
        return {"market": {key: (entry.value, entry.version.pack()) for key, entry in self.entries.items()}}

    @invariant()
    def history_holds(self):
        history = History(version_writes=self.writes, deleted_keys=self.deleted)
        database = {"markets": self.database}
        violations = check(database, self._cache(), NAMESPACES, history)
        # Convergence and no-resurrection hold once every change is delivered (teardown).
        assert [v for v in violations if v.invariant not in ("convergence", "no-resurrection")] == []

    def teardown(self):
        while self.pending:
            self._apply(self.pending.pop())
        cache = self._cache()
        for message in list(self.delivered):
            self._apply(message)
        history = History(version_writes=self.writes, deleted_keys=self.deleted, replayed_cache=self._cache())
        assert check({"markets": self.database}, cache, NAMESPACES, history) == []


TestVersionedCacheMachine = VersionedCacheMachine.TestCase
