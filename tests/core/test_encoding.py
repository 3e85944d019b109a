"""The canonical encoder: expected bytes per type, and both paths giving identical bytes."""

import json
from decimal import Decimal

import pytest
from hypothesis import given, settings, strategies as st

from ssmd.core.encoding import (
    TextRowEncoder,
    base_type,
    encode_row,
    is_float_like,
    value_from_change,
    value_from_text,
)
from ssmd.core.errors import DecodeError
from ssmd.core.jsontext import JsonNumber, dumps, loads
from ssmd.core.pgarray import format_array
from ssmd.core.wal2json import Wal2JsonDecoder


def encode_text(type_name, text):
    return dumps(value_from_text(type_name, text))


def encode_change(type_name, wal2json_json):
    return dumps(value_from_change(type_name, loads(wal2json_json)))


@pytest.mark.parametrize(
    ("type_name", "text", "expected"),
    [
        ("numeric", "12345678901234567890.123456789012345678", b"12345678901234567890.123456789012345678"),
        ("numeric(10,4)", "0.0700", b"0.0700"),
        ("bigint", "9223372036854775807", b"9223372036854775807"),
        ("smallint", "-32768", b"-32768"),
        ("numeric", "NaN", b'"NaN"'),
        ("numeric", "Infinity", b'"Infinity"'),
        ("double precision", "-Infinity", b'"-Infinity"'),
        ("real", "1.1", b"1.1"),
        ("double precision", "1e+300", b"1e+300"),
        ("boolean", "t", b"true"),
        ("boolean", "f", b"false"),
        ("jsonb", '{"b": [1.50, null], "a": "x"}', b'{"a":"x","b":[1.50,null]}'),
        ("jsonb", '"s"', b'"s"'),
        ("json", '{"z": 1, "a": 2}', b'{"a":2,"z":1}'),
        ("text[]", '{a,"b c",NULL,"",NULL}', b'["a","b c",null,"",null]'),
        ("text[]", '{"NULL","a\\\\b\\""}', b'["NULL","a\\\\b\\""]'),
        ("integer[]", "{{1,2},{3,NULL}}", b"[[1,2],[3,null]]"),
        ("numeric[]", "{1.50,NaN}", b'[1.50,"NaN"]'),
        ("integer[]", "[0:1]={7,8}", b"[7,8]"),
        ("integer[]", "{}", b"[]"),
        ("timestamp with time zone", "2024-03-15 17:30:00.123456+00", b'"2024-03-15T17:30:00.123456+00:00"'),
        ("timestamp(3) with time zone", "2024-03-15 17:30:00.12+00", b'"2024-03-15T17:30:00.12+00:00"'),
        ("timestamp with time zone", "0044-03-15 12:00:00+00 BC", b'"0044-03-15T12:00:00+00:00 BC"'),
        ("timestamp with time zone", "infinity", b'"infinity"'),
        ("timestamp with time zone", "-infinity", b'"-infinity"'),
        ("timestamp without time zone", "2024-03-15 17:30:00", b'"2024-03-15T17:30:00"'),
        ("date", "2024-03-15", b'"2024-03-15"'),
        ("date", "infinity", b'"infinity"'),
        ("bytea", "\\x00ff", b'"\\\\x00ff"'),
        ("text", 'a"b\n', b'"a\\"b\\n"'),
        ("character varying(20)", "v", b'"v"'),
        ("character(3)", "ab ", b'"ab "'),
        ("uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", b'"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"'),
        ("interval", "1 day 02:00:00", b'"1 day 02:00:00"'),
        ("time(3) without time zone", "10:00:01.5", b'"10:00:01.5"'),
        ("mood", "ok", b'"ok"'),
    ],
)
def test_text_value_encoding(type_name, text, expected):
    assert encode_text(type_name, text) == expected


@pytest.mark.parametrize(
    ("type_name", "wal2json_json", "expected"),
    [
        ("numeric", "12345678901234567890.123456789012345678", b"12345678901234567890.123456789012345678"),
        ("numeric", "0.0700", b"0.0700"),
        ("bigint", "9223372036854775807", b"9223372036854775807"),
        ("numeric", "null", b"null"),
        ("boolean", "true", b"true"),
        ("jsonb", '"{\\"s\\": \\"q\\", \\"x\\": 1.50}"', b'{"s":"q","x":1.50}'),
        ("jsonb", '"\\"s\\""', b'"s"'),
        ("text[]", '"{a,\\"b c\\",NULL,\\"\\"}"', b'["a","b c",null,""]'),
        ("bytea", '"00ff"', b'"\\\\x00ff"'),
        ("timestamp with time zone", '"2024-03-15 17:30:00.12+00"', b'"2024-03-15T17:30:00.12+00:00"'),
    ],
)
def test_change_value_encoding(type_name, wal2json_json, expected):
    assert encode_change(type_name, wal2json_json) == expected


def test_null_is_null_on_both_paths():
    assert value_from_text("numeric", None) is None
    assert value_from_change("text[]", None) is None


@pytest.mark.parametrize(
    ("type_name", "text"),
    [
        ("timestamp with time zone", "15/03/2024 13:30:00.123456 EDT"),
        ("timestamp with time zone", "Fri Mar 15 17:30:00 2024 UTC"),
        ("timestamp with time zone", "2024-03-15 13:30:00-04"),
        ("timestamp with time zone", "2024-03-15 23:00:00+05:30"),
        ("timestamp without time zone", "03/15/2024 17:30:00"),
        ("date", "15.03.2024"),
        ("bytea", "\\000\\377"),
        ("boolean", "true"),
        ("jsonb", "{not json"),
        ("integer[]", "{1,2"),
    ],
)
def test_text_outside_pinned_settings_rejected(type_name, text):
    with pytest.raises(DecodeError):
        value_from_text(type_name, text)


def test_base_type_strips_typmod():
    assert base_type("character varying(20)[]") == "character varying[]"
    assert base_type("timestamp(3) with time zone") == "timestamp with time zone"
    assert base_type("numeric(10,2)") == "numeric"


def test_float_like_types():
    assert is_float_like("numeric(10,2)")
    assert is_float_like("double precision")
    assert is_float_like("real")
    assert not is_float_like("bigint")
    assert not is_float_like("numeric[]")


def test_row_encoder_sorts_keys_and_keeps_digits():
    encoder = TextRowEncoder([("ticker", "text"), ("price", "numeric"), ("volume", "bigint"), ("fee", "numeric")])
    encoded = encoder.encode(("TEST-1", "0.0700", "9223372036854775807", "NaN"))
    assert encoded == b'{"fee":"NaN","price":0.0700,"ticker":"TEST-1","volume":9223372036854775807}'
    assert encoded == encode_row(encoder.row(("TEST-1", "0.0700", "9223372036854775807", "NaN")))


def test_row_encoder_rejects_wrong_width():
    encoder = TextRowEncoder([("a", "text"), ("b", "text")])
    with pytest.raises(DecodeError):
        encoder.encode(("x",))


def test_numbers_never_pass_through_float():
    value = value_from_text("numeric", "0.1000000000000000055511151231257827")
    assert isinstance(value, JsonNumber)
    assert dumps(value) == b"0.1000000000000000055511151231257827"


# --- both paths give identical bytes -------------------------------------------------------
# Each strategy yields (type name, PostgreSQL text output, wal2json value as a Python JSON value).


def _numeric_text(value: Decimal) -> str:
    return format(value, "f")


integers = st.integers(min_value=-(2**63), max_value=2**63 - 1).map(lambda i: ("bigint", str(i), JsonNumber(str(i))))
numerics = st.decimals(allow_nan=False, allow_infinity=False, places=None).map(_numeric_text).map(
    lambda text: ("numeric", text, JsonNumber(text))
)
floats = st.floats(allow_nan=False, allow_infinity=False).map(repr).filter(lambda text: "e" not in text).map(
    lambda text: ("double precision", text.removesuffix(".0"), JsonNumber(text.removesuffix(".0")))
)
booleans = st.booleans().map(lambda flag: ("boolean", "t" if flag else "f", flag))
texts = st.text().filter(lambda text: "\x00" not in text).map(lambda text: ("text", text, text))
byteas = st.binary(max_size=32).map(lambda data: ("bytea", "\\x" + data.hex(), data.hex()))
timestamps = st.datetimes().map(lambda moment: moment.isoformat(sep=" ")).map(
    lambda text: ("timestamp with time zone", text + "+00", text + "+00")
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers().map(lambda i: JsonNumber(str(i))) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=3), children, max_size=3),
    max_leaves=8,
)
jsonbs = json_values.map(lambda value: dumps(value).decode()).map(lambda text: ("jsonb", text, text))
array_elements = st.one_of(st.none(), st.text(max_size=6).filter(lambda text: "\x00" not in text))
text_arrays = st.lists(array_elements, max_size=4).map(format_array).map(lambda text: ("text[]", text, text))
int_matrices = st.integers(min_value=1, max_value=3).flatmap(
    lambda width: st.lists(st.lists(st.none() | st.integers().map(str), min_size=width, max_size=width), min_size=1, max_size=3)
).map(format_array).map(lambda text: ("integer[]", text, text))

column_values = st.one_of(integers, numerics, floats, booleans, texts, byteas, timestamps, jsonbs, text_arrays, int_matrices)


def wal2json_insert(columns):
    """Render an insert the way wal2json v2 prints it, with a B row before it."""
    begin = b'{"action":"B","xid":7,"lsn":"0/10","nextlsn":"0/20"}'
    rendered = [{"name": name, "type": type_name, "value": value} for name, type_name, value in columns]
    row = {"action": "I", "xid": 7, "lsn": "0/8", "schema": "public", "table": "t", "columns": rendered, "pk": [{"name": "c0", "type": "integer"}]}
    return begin, dumps(row)


@settings(max_examples=300, deadline=None)
@given(st.lists(column_values, min_size=1, max_size=6), st.data())
def test_both_paths_identical(values, data):
    columns = [("c0", "integer", "1", JsonNumber("1"))]
    columns += [(f"c{i}", type_name, text, value) for i, (type_name, text, value) in enumerate(values, start=1)]
    nulls = data.draw(st.sets(st.integers(min_value=1, max_value=len(values))))
    columns = [(name, type_name, None if i in nulls else text, None if i in nulls else value) for i, (name, type_name, text, value) in enumerate(columns)]

    warm = TextRowEncoder([(name, type_name) for name, type_name, _, _ in columns]).encode([text for _, _, text, _ in columns])
    decoder = Wal2JsonDecoder()
    begin, insert = wal2json_insert([(name, type_name, value) for name, type_name, _, value in columns])
    decoder.decode(begin)
    change = decoder.decode(insert)

    assert encode_row(change.data) == warm


@given(st.decimals(allow_nan=False, allow_infinity=False, places=None).map(_numeric_text))
def test_numeric_digits_survive_json(text):
    encoded = encode_text("numeric", text)
    assert encoded == text.encode()
    assert json.loads(encoded, parse_float=Decimal, parse_int=Decimal) == Decimal(text)
