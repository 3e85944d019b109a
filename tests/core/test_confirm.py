import pytest

from ssmd.core.confirm import AckTracker
from ssmd.core.errors import InternalError
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position


def lsn(text):
    return Lsn.parse(text)


def test_confirm_waits_for_every_ack_of_transaction():
    tracker = AckTracker()
    tracker.open(lsn("0/100"), lsn("0/130"))
    for index in range(3):
        tracker.sent(Position(lsn("0/100"), index))
    tracker.close(lsn("0/100"))
    tracker.acked(Position(lsn("0/100"), 0))
    tracker.acked(Position(lsn("0/100"), 1))
    assert tracker.confirmable() is None
    tracker.acked(Position(lsn("0/100"), 2))
    assert tracker.confirmable() == lsn("0/130")


def test_confirm_never_passes_unacked_earlier_transaction():
    tracker = AckTracker()
    tracker.open(lsn("0/100"), lsn("0/130"))
    tracker.sent(Position(lsn("0/100"), 0))
    tracker.close(lsn("0/100"))
    tracker.open(lsn("0/200"), lsn("0/230"))
    tracker.sent(Position(lsn("0/200"), 0))
    tracker.close(lsn("0/200"))
    tracker.acked(Position(lsn("0/200"), 0))
    assert tracker.confirmable() is None
    tracker.acked(Position(lsn("0/100"), 0))
    assert tracker.confirmable() == lsn("0/230")


def test_open_transaction_is_not_confirmable():
    tracker = AckTracker()
    tracker.open(lsn("0/100"), lsn("0/130"))
    tracker.sent(Position(lsn("0/100"), 0))
    tracker.acked(Position(lsn("0/100"), 0))
    assert tracker.confirmable() is None
    assert tracker.idle_confirmable(lsn("0/500")) is None


def test_empty_transaction_confirms_at_commit():
    tracker = AckTracker()
    tracker.open(lsn("0/100"), lsn("0/130"))
    tracker.close(lsn("0/100"))
    assert tracker.confirmable() == lsn("0/130")
    assert tracker.idle_confirmable(lsn("0/500")) == lsn("0/500")


def test_out_of_order_open_is_a_bug():
    tracker = AckTracker()
    tracker.open(lsn("0/200"), lsn("0/230"))
    with pytest.raises(InternalError):
        tracker.open(lsn("0/100"), lsn("0/130"))


def test_late_duplicate_ack_is_ignored():
    tracker = AckTracker()
    tracker.open(lsn("0/100"), lsn("0/130"))
    tracker.sent(Position(lsn("0/100"), 0))
    tracker.close(lsn("0/100"))
    tracker.acked(Position(lsn("0/100"), 0))
    tracker.acked(Position(lsn("0/100"), 0))
    assert tracker.confirmable() == lsn("0/130")
