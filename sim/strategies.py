"""The correct strategy and the known-bad ones, each swapping one piece of the correct logic.

`EXPECTED` names the invariant the checker reports when a bad strategy goes wrong. The
simulator tests require each to be caught within a few hundred seeds.
"""

from __future__ import annotations

CORRECT = "correct"

EXPECTED: dict[str, str] = {
    "string-lsn": "convergence",  # versions compared as LSN text: "0/FFFFFFF" > "0/10000000"
    "lsn-before-warm": "exact-boundary",  # skip below an LSN read beside per-table reads
    "change-lsn-order": "convergence",  # version from the change's own LSN, not its commit
    "first-column-key": "convergence",  # key from the first column, not the primary key
    "consume-before-publish": "no-loss-at-source",  # slot confirmed before the PubAck
    "namespace-mismatch": "convergence",  # warm writes under the table name
    "blind-set": "monotonic",  # SET/DEL without the version guard
    "del-without-tombstone": "no-resurrection",  # DEL drops the version too
    "no-sweep": "no-resurrection",  # rows deleted while the cache was down stay
    "discard-unnoticed": "continuity",  # stream gaps never trigger a re-warm
    "toast-as-null": "convergence",  # omitted TOAST column published as null
    "toast-replace": "convergence",  # omitted TOAST column dropped from the cached row
}

STRATEGIES: tuple[str, ...] = (CORRECT, *EXPECTED)
