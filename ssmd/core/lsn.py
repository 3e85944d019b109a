"""PostgreSQL log sequence numbers.

An LSN is an unsigned 64-bit byte position in the WAL, written as two hexadecimal halves
`X/Y` (high and low 32 bits, unpadded). Text comparison is wrong (`"0/9" > "0/10"`), so every
comparison goes through the integer value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ssmd.core.errors import DecodeError

MAX_LSN_VALUE = (1 << 64) - 1
# ASCII only: `str.isdigit` and `\d` would accept other scripts' digits.
_LSN_TEXT = re.compile(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})")


@dataclass(frozen=True, slots=True)
class Lsn:
    """A WAL position; ordered as an unsigned 64-bit integer."""

    value: int

    def __post_init__(self) -> None:
        if not isinstance(self.value, int) or isinstance(self.value, bool):
            raise TypeError(f"Lsn value must be int, got {type(self.value).__name__}")
        if not 0 <= self.value <= MAX_LSN_VALUE:
            raise ValueError(f"Lsn value {self.value} is outside 0..2**64-1")

    @classmethod
    def parse(cls, text: str) -> Lsn:
        """Parse `X/Y` text, padded or not (`2/03F42B70` equals `2/3F42B70`)."""
        match = _LSN_TEXT.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise DecodeError(f"invalid LSN {text!r}: expected two hexadecimal halves like '16/B374D848'")
        return cls((int(match[1], 16) << 32) | int(match[2], 16))

    def __str__(self) -> str:
        return f"{self.value >> 32:X}/{self.value & 0xFFFFFFFF:X}"

    def __repr__(self) -> str:
        return f"Lsn('{self}')"

    # Written out rather than derived by functools.total_ordering, whose derived methods cost
    # two Python calls per comparison, and positions are compared several times per change.
    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Lsn):
            return NotImplemented
        return self.value < other.value

    def __le__(self, other: object) -> bool:
        if not isinstance(other, Lsn):
            return NotImplemented
        return self.value <= other.value

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, Lsn):
            return NotImplemented
        return self.value > other.value

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, Lsn):
            return NotImplemented
        return self.value >= other.value

    def __int__(self) -> int:
        return self.value

    def __sub__(self, other: Lsn) -> int:
        """Return the distance in bytes between two positions."""
        return self.value - other.value


ZERO_LSN = Lsn(0)
