from ssmd.core.lsn import Lsn
from ssmd.verify import fence_reached

FENCE = Lsn.parse("0/5000")


def test_fence_reached_by_applied_mark():
    assert fence_reached({"state": "ready", "applied_lsn": "0/5000", "snapshot_lsn": "0/100"}, FENCE)


def test_fence_reached_by_later_snapshot():
    # The cache warmed after the fence was written: the snapshot contains every earlier commit.
    assert fence_reached({"state": "ready", "snapshot_lsn": "0/6000"}, FENCE)


def test_fence_not_reached_while_warming():
    assert not fence_reached({"state": "warming", "applied_lsn": "0/9000", "snapshot_lsn": "0/9000"}, FENCE)


def test_fence_not_reached_by_earlier_positions():
    assert not fence_reached({"state": "ready", "applied_lsn": "0/4FFF", "snapshot_lsn": "0/5000"}, FENCE)
    assert not fence_reached({"state": "ready"}, FENCE)
