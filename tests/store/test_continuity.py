"""The cache's continuity decisions: when to warm again, and the applied stream position."""

from __future__ import annotations

from datetime import datetime, timezone

from ssmd.bus.stream import StreamState
from ssmd.cache.continuity import SequenceTracker, format_created, rewarm_reason
from ssmd.core.lsn import Lsn

CREATED = datetime(2026, 1, 1, tzinfo=timezone.utc)


def stream(first_seq: int, last_seq: int, created: datetime = CREATED) -> StreamState:
    messages = max(last_seq - first_seq + 1, 0)
    return StreamState("S", created, first_seq, last_seq, messages, messages * 100)


def ready_meta(stream_seq: int) -> dict[str, str]:
    return {"state": "ready", "stream_created": format_created(CREATED), "stream_seq": str(stream_seq), "snapshot_lsn": "0/10"}


def test_resume_when_nothing_missed():
    assert rewarm_reason(ready_meta(10), stream(1, 20), consumer_exists=True) is None
    assert rewarm_reason(ready_meta(10), stream(11, 20), consumer_exists=True) is None
    assert rewarm_reason(ready_meta(20), stream(21, 20), consumer_exists=True) is None  # empty after purge, nothing new


def test_rewarm_reasons():
    assert "meta hash missing" in rewarm_reason({}, stream(1, 5), True)
    assert "did not finish" in rewarm_reason({**ready_meta(3), "state": "warming"}, stream(1, 5), True)
    assert rewarm_reason(ready_meta(3), None, True) == "stream missing"
    assert "stream created" in rewarm_reason(ready_meta(3), stream(1, 5, datetime(2026, 2, 1, tzinfo=timezone.utc)), True)
    assert rewarm_reason(ready_meta(3), stream(1, 5), False) == "durable consumer missing"
    assert "discarded" in rewarm_reason(ready_meta(3), stream(6, 9), True)
    assert "discarded" in rewarm_reason(ready_meta(3), stream(10, 9), True)  # purged past unapplied messages


def test_first_delivery_jump_is_gap():
    tracker = SequenceTracker(contiguous=5, last_first_delivery=5)
    assert tracker.first_delivery_gap(6, 1) is None
    assert tracker.first_delivery_gap(3, 2) is None  # redelivery of an older message
    assert "7..8" in tracker.first_delivery_gap(9, 1)


def test_contiguous_waits_for_redelivery():
    tracker = SequenceTracker(contiguous=5, last_first_delivery=5)
    tracker.handled(7, Lsn(70))
    assert tracker.contiguous == 5
    assert tracker.applied_lsn is None

    tracker.handled(6, Lsn(60))
    assert tracker.contiguous == 7
    assert tracker.applied_lsn == Lsn(70)

    tracker.handled(8, None)  # terminated poison message: counts as handled, carries no LSN
    assert tracker.contiguous == 8
    assert tracker.applied_lsn == Lsn(70)


def test_ack_floor_unblocks_contiguous_prefix():
    # A killed instance acknowledged 7..9; only 6 comes back as a redelivery.
    tracker = SequenceTracker(contiguous=5, last_first_delivery=9)
    tracker.handled(6, Lsn(60))
    tracker.handled(11, Lsn(110))
    assert tracker.contiguous == 6

    tracker.acknowledged_through(9)
    assert tracker.contiguous == 9
    assert tracker.applied_lsn == Lsn(60)

    tracker.handled(10, Lsn(100))
    assert tracker.contiguous == 11
    assert tracker.applied_lsn == Lsn(110)


def test_ack_floor_below_prefix_changes_nothing():
    tracker = SequenceTracker(contiguous=8, last_first_delivery=8, applied_lsn=Lsn(80))
    tracker.acknowledged_through(3)
    assert tracker.contiguous == 8
    assert tracker.applied_lsn == Lsn(80)
