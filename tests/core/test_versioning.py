"""The apply rule, warm boundary, sweep, truncate floor and TOAST merge."""

from hypothesis import given
from hypothesis import strategies as st

from ssmd.core.lsn import Lsn
from ssmd.core.position import Position, warm_version
from ssmd.core.versioning import (
    Decision,
    Entry,
    apply_delete,
    apply_upsert,
    decide,
    decide_packed,
    has_stream_gap,
    in_snapshot,
    merge_unchanged,
    needs_rewarm_for_slot,
    raise_floor,
    should_sweep,
    truncate_clears,
)

positions = st.builds(Position, st.builds(Lsn, st.integers(0, (1 << 64) - 1)), st.integers(0, 0xFFFFFFFF))


def pos(text: str, index: int = 0) -> Position:
    return Position(Lsn.parse(text), index)


def test_decide_applies_newer_only():
    assert decide(None, pos("0/10")) is Decision.APPLY
    assert decide(pos("0/9"), pos("0/10")) is Decision.APPLY
    assert decide(pos("0/10"), pos("0/10")) is Decision.STALE
    assert decide(pos("0/10", 1), pos("0/10", 0)) is Decision.STALE


def test_decide_respects_floor():
    assert decide(None, pos("0/10"), floor=pos("0/10")) is Decision.BELOW_FLOOR
    assert decide(None, pos("0/10", 1), floor=pos("0/10")) is Decision.APPLY
    assert decide(pos("0/1"), pos("0/5"), floor=pos("0/6")) is Decision.BELOW_FLOOR


def test_decide_orders_lsn_numerically():
    assert decide(pos("F/FFFFFFFF"), pos("10/0")) is Decision.APPLY
    assert decide(pos("0/9"), pos("0/10")) is Decision.APPLY
    assert decide(pos("0/10"), pos("0/9")) is Decision.STALE


@given(st.none() | positions, positions, st.none() | positions)
def test_decide_packed_matches_decide(stored, incoming, floor):
    packed = decide_packed(
        None if stored is None else stored.pack(), incoming.pack(), None if floor is None else floor.pack()
    )
    assert packed is decide(stored, incoming, floor)


@given(st.lists(positions, min_size=1, max_size=20), st.randoms(use_true_random=False))
def test_apply_order_does_not_matter(versions, rng):
    """Whatever order writes arrive in, the newest one stays."""
    shuffled = list(versions)
    rng.shuffle(shuffled)
    entry = None
    for version in shuffled:
        entry = apply_upsert(entry, version.pack().encode(), version) or entry
    assert entry is not None
    assert entry.version == max(versions)
    assert entry.value == max(versions).pack().encode()


def test_delete_leaves_tombstone_that_blocks_older_write():
    tombstone = apply_delete(Entry(b"{}", pos("0/5")), pos("0/8"))
    assert tombstone == Entry(None, pos("0/8"))
    assert tombstone.is_tombstone
    assert apply_upsert(tombstone, b"{}", warm_version(Lsn.parse("0/7"))) is None
    assert apply_upsert(tombstone, b"{}", pos("0/9")) == Entry(b"{}", pos("0/9"))


def test_duplicate_delete_is_skipped():
    tombstone = Entry(None, pos("0/8"))
    assert apply_delete(tombstone, pos("0/8")) is None


def test_in_snapshot_is_strictly_below():
    snapshot = Lsn.parse("1/0")
    assert in_snapshot(Lsn.parse("0/FFFFFFFF"), snapshot)
    assert not in_snapshot(Lsn.parse("1/0"), snapshot)
    assert not in_snapshot(Lsn.parse("1/1"), snapshot)


def test_sweep_removes_older_than_warm_version():
    snapshot = Lsn.parse("0/100")
    assert should_sweep(pos("0/FF", 7), snapshot)
    assert not should_sweep(pos("0/100"), snapshot)
    assert not should_sweep(pos("0/100", 1), snapshot)


def test_floor_only_rises():
    assert raise_floor(None, pos("0/5")) == pos("0/5")
    assert raise_floor(pos("0/9"), pos("0/5")) == pos("0/9")
    assert raise_floor(pos("0/5"), pos("0/9")) == pos("0/9")


def test_truncate_clears_older_keys_only():
    assert truncate_clears(pos("0/4"), pos("0/5"))
    assert not truncate_clears(pos("0/5", 1), pos("0/5"))


def test_merge_unchanged_keeps_cached_columns():
    cached = {"ticker": "A", "notes": "long", "status": "open"}
    data = {"ticker": "A", "status": "closed"}
    assert merge_unchanged(cached, data, ("notes",)) == {"ticker": "A", "status": "closed", "notes": "long"}
    assert merge_unchanged(None, data, ("notes",)) == data
    assert merge_unchanged(cached, {"ticker": "A", "notes": None}, ()) == {"ticker": "A", "notes": None}


def test_slot_created_forces_rewarm_below_point():
    assert needs_rewarm_for_slot(None, Lsn.parse("0/10"))
    assert needs_rewarm_for_slot(Lsn.parse("0/F"), Lsn.parse("0/10"))
    assert not needs_rewarm_for_slot(Lsn.parse("0/10"), Lsn.parse("0/10"))


def test_stream_gap_detection():
    assert not has_stream_gap(0, 1)
    assert not has_stream_gap(5, 3)
    assert has_stream_gap(5, 7)


def test_change_at_snapshot_point_replaces_warm_row():
    """The first transaction after the snapshot can commit exactly at S."""
    snapshot = Lsn.parse("1/0")
    warm_row = apply_upsert(None, b"warm", warm_version(snapshot))
    assert not in_snapshot(snapshot, snapshot)
    assert apply_upsert(warm_row, b"change", Position(snapshot, 0)) == Entry(b"change", Position(snapshot, 0))
    assert apply_upsert(warm_row, b"older", pos("0/FFFFFFF8", 3)) is None
    assert not should_sweep(warm_version(snapshot), snapshot)
