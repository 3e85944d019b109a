"""The PostgreSQL array literal parser."""

import pytest
from hypothesis import given, strategies as st

from ssmd.core.errors import DecodeError
from ssmd.core.pgarray import format_array, parse_array


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{}", []),
        ('{a,"b c"}', ["a", "b c"]),
        ('{NULL,"",x}', [None, "", "x"]),
        ('{"NULL",null,Null}', ["NULL", None, None]),
        ("{{1,2},{3,4}}", [["1", "2"], ["3", "4"]]),
        ("{{{1},{2}},{{3},{4}}}", [[["1"], ["2"]], [["3"], ["4"]]]),
        ('{"a\\"b","c\\\\d"}', ['a"b', "c\\d"]),
        ("{a\\,b}", ["a,b"]),
        ("[1:2]={x,y}", ["x", "y"]),
        ("[0:1][1:2]={{1,2},{3,4}}", [["1", "2"], ["3", "4"]]),
        ("{ a , b }", ["a", "b"]),
        ('{" a "}', [" a "]),
        ('{"{}","}"}', ["{}", "}"]),
    ],
)
def test_parse_array_literal(text, expected):
    assert parse_array(text) == expected


def test_parse_box_array_uses_semicolon():
    assert parse_array("{(1,1),(0,0);(2,2),(1,1)}", ";") == ["(1,1),(0,0)", "(2,2),(1,1)"]


@pytest.mark.parametrize("text", ["", "{", "{a", "{a,}", "a,b", '{"a}', "{a}x", "{a{b}}", "[1:2]{a}"])
def test_parse_array_rejects_malformed(text):
    with pytest.raises(DecodeError):
        parse_array(text)


def test_format_array_quotes_like_array_out():
    assert format_array(["a", "b c", None, "", "NULL", 'q"', "x\\y"]) == '{a,"b c",NULL,"","NULL","q\\"","x\\\\y"}'


elements = st.none() | st.text().filter(lambda text: "\x00" not in text)


@st.composite
def arrays(draw):
    """Rectangular arrays of one to three dimensions, as PostgreSQL requires."""
    shape = draw(st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=3))

    def build(dimensions):
        if not dimensions:
            return draw(elements)
        return [build(dimensions[1:]) for _ in range(dimensions[0])]

    return build(shape)


@given(arrays())
def test_array_round_trip(value):
    assert parse_array(format_array(value)) == value


def test_empty_array_round_trip():
    assert parse_array(format_array([])) == []
