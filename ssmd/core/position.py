"""Change positions and the versions stored beside every cached entry.

A change's position is (commit LSN of its transaction, index of the change inside that
transaction). A change's own LSN is not used: a transaction that commits later can carry lower
change LSNs than one that committed earlier, so only the commit position orders transactions.
A warm row carries `warm_version(S)`, just below (S, 0), where S is the consistent point of the
warm snapshot.

Redis Lua scripts compare versions as strings, because Lua numbers are doubles and cannot hold
a 64-bit LSN. `pack` therefore yields fixed-width upper-case hex whose string order equals the
tuple order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import total_ordering

from ssmd.core.errors import DecodeError
from ssmd.core.lsn import Lsn

MAX_INDEX = 0xFFFFFFFF
PACKED_LENGTH = 24  # 16 hex digits of LSN, 8 of index


@total_ordering
@dataclass(frozen=True, slots=True)
class Position:
    """Commit LSN of a transaction and the index of one change inside it."""

    commit_lsn: Lsn
    index: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.commit_lsn, Lsn):
            raise TypeError(f"commit_lsn must be Lsn, got {type(self.commit_lsn).__name__}")
        if not 0 <= self.index <= MAX_INDEX:
            raise ValueError(f"change index {self.index} is outside 0..{MAX_INDEX}")

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Position):
            return NotImplemented
        return (self.commit_lsn.value, self.index) < (other.commit_lsn.value, other.index)

    def pack(self) -> str:
        """Return the fixed-width text whose string order equals position order."""
        return f"{self.commit_lsn.value:016X}{self.index:08X}"

    @classmethod
    def unpack(cls, text: str) -> Position:
        """Parse the text made by `pack`."""
        if len(text) != PACKED_LENGTH or not all(c in "0123456789ABCDEF" for c in text):
            raise DecodeError(f"invalid packed position {text!r}: expected {PACKED_LENGTH} upper-case hex digits")
        return cls(Lsn(int(text[:16], 16)), int(text[16:], 16))

    def message_id(self) -> str:
        """Return the JetStream `Nats-Msg-Id` of the change at this position."""
        return f"{self.commit_lsn}:{self.index}"

    def __str__(self) -> str:
        return f"{self.commit_lsn}#{self.index}"


def warm_version(snapshot_lsn: Lsn) -> Position:
    """Return the version of a row read from the snapshot whose consistent point is `snapshot_lsn`.

    The version is (S - 1, MAX_INDEX): above every change of a transaction that committed before
    S (those are in the snapshot) and below every change at or after S. It cannot be (S, 0),
    because the first transaction after the snapshot may have its commit record exactly at S,
    and its first change at (S, 0) would then lose against the warm row it must replace.
    """
    if snapshot_lsn.value == 0:
        return Position(snapshot_lsn, 0)  # 0/0 is never a consistent point: no change can tie
    return Position(Lsn(snapshot_lsn.value - 1), MAX_INDEX)
