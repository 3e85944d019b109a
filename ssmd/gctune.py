"""Garbage-collector settings of the long-running daemons.

Every change allocates a few dozen short-lived objects (parsed JSON, rows, dataclasses), and
with CPython's default generation-0 threshold of 700 allocations the collector ran every few
changes. Objects made at start-up (modules, settings, table descriptions) live until exit, so
they are frozen out of every later collection.
"""

from __future__ import annotations

import gc

GENERATION0_THRESHOLD = 20_000  # allocations minus deallocations between young collections


def tune_for_daemon() -> None:
    """Freeze what start-up allocated and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GENERATION0_THRESHOLD, 20, 20)
