"""The cache's checks of a decoded change against the followed table."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest

from ssmd.cache.apply import PoisonMessage, check_columns
from ssmd.core.changes import Change, Op
from ssmd.core.jsontext import JsonNumber
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position
from ssmd.core.tables import ColumnInfo, TableInfo

MARKETS = TableInfo("public", "markets", (ColumnInfo("ticker", "text"), ColumnInfo("volume", "bigint")), ("ticker",))
CHANGE = Change(Op.UPDATE, "public", "markets", Position(Lsn(0x100), 0), 7, {"ticker": "T-1"}, data={"ticker": "T-1", "volume": JsonNumber("3")})


def test_known_columns_pass():
    check_columns(CHANGE, MARKETS)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (replace(CHANGE, data={"ticker": "T-1", "colour": "red"}), "unknown columns ['colour']"),
        (replace(CHANGE, data=["ticker", "T-1"]), "is not an object"),
        (replace(CHANGE, key={"volume": JsonNumber("3")}), "differ from its key"),
    ],
)
def test_mismatched_change_is_poison(change, fragment):
    with pytest.raises(PoisonMessage, match=re.escape(fragment)):
        check_columns(change, MARKETS)
