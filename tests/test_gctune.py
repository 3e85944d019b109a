"""The daemons' garbage-collector settings."""

from __future__ import annotations

import gc

from ssmd.gctune import GENERATION0_THRESHOLD, tune_for_daemon


def test_tune_freezes_start_up_objects_and_raises_threshold():
    before = gc.get_threshold()
    try:
        tune_for_daemon()
        assert gc.get_threshold()[0] == GENERATION0_THRESHOLD
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
