from hypothesis import given, strategies as st
import pytest

from ssmd.core.errors import DecodeError
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position

lsn_values = st.integers(min_value=0, max_value=(1 << 64) - 1)


def test_lsn_orders_across_high_half():
    assert Lsn.parse("F/FFFFFFFF") < Lsn.parse("10/0")


def test_lsn_padding_is_ignored():
    assert Lsn.parse("2/03F42B70") == Lsn.parse("2/3F42B70")


def test_lsn_text_order_differs_from_value_order():
    assert "0/9" > "0/10"
    assert Lsn.parse("0/9") < Lsn.parse("0/10")


def test_lsn_full_range():
    assert Lsn.parse("FFFFFFFF/FFFFFFFF").value == (1 << 64) - 1
    assert Lsn.parse("0/0") < Lsn.parse("7FFFFFFF/FFFFFFFF") < Lsn.parse("80000000/0") < Lsn.parse("FFFFFFFF/FFFFFFFF")


@pytest.mark.parametrize("text", ["", "0", "1/", "/1", "G/0", "1/123456789", "0x1/2", "1/2/3", "-1/0"])
def test_lsn_rejects_malformed(text):
    with pytest.raises(DecodeError, match="invalid LSN"):
        Lsn.parse(text)


@given(lsn_values, lsn_values)
def test_lsn_order_equals_integer_order(a, b):
    assert (Lsn(a) < Lsn(b)) == (a < b)
    assert (Lsn(a) == Lsn(b)) == (a == b)


@given(lsn_values)
def test_lsn_text_round_trip(value):
    assert Lsn.parse(str(Lsn(value))) == Lsn(value)


@given(lsn_values, st.integers(0, 0xFFFFFFFF), lsn_values, st.integers(0, 0xFFFFFFFF))
def test_packing_preserves_order(lsn_a, index_a, lsn_b, index_b):
    a, b = Position(Lsn(lsn_a), index_a), Position(Lsn(lsn_b), index_b)
    assert (a.pack() < b.pack()) == (a < b)
    assert Position.unpack(a.pack()) == a


def test_position_orders_by_commit_then_index():
    early_commit = Position(Lsn.parse("0/200"), 5)
    late_commit = Position(Lsn.parse("0/300"), 0)
    assert early_commit < late_commit
    assert Position(Lsn.parse("0/300"), 1) > late_commit
