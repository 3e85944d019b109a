"""Key text, Redis key names and the cache actions of a change."""

import pytest
from hypothesis import given, strategies as st

from ssmd.core.changes import Change, Op
from ssmd.core.errors import DecodeError
from ssmd.core.jsontext import JsonNumber
from ssmd.core.keys import (
    KeyDelete,
    KeySpace,
    KeyWrite,
    NamespaceTruncate,
    cache_actions,
    default_namespace,
    escape_part,
    key_text,
    parse_key_text,
    row_key_text,
    unescape_part,
)
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position

POSITION = Position(Lsn.parse("0/164D6378"), 3)


def test_key_text_of_values():
    assert key_text(["TEST-1"]) == "TEST-1"
    assert key_text([JsonNumber("9223372036854775807")]) == "9223372036854775807"
    assert key_text([JsonNumber("0.0700")]) == "0.0700"
    assert key_text([True, False]) == "true:false"
    assert key_text(["S", "2024-01-01"]) == "S:2024-01-01"


def test_key_text_escapes_separator_and_hash_tag():
    assert key_text(["a:b", "{c}", "100%"]) == "a%3Ab:%7Bc%7D:100%25"


def test_key_text_rejects_null_and_empty():
    with pytest.raises(DecodeError):
        key_text([None])
    with pytest.raises(DecodeError):
        key_text([])


def test_unescape_rejects_unknown_escape():
    with pytest.raises(DecodeError):
        unescape_part("a%41")


@given(st.lists(st.text(), min_size=1, max_size=4))
def test_key_escaping_round_trip(parts):
    text = key_text(parts)
    assert parse_key_text(text) == parts
    assert "{" not in text
    assert "}" not in text


@given(st.text())
def test_part_escaping_round_trip(part):
    escaped = escape_part(part)
    assert unescape_part(escaped) == part
    assert ":" not in escaped


def test_default_namespaces():
    assert default_namespace("public", "markets") == "market"
    assert default_namespace("public", "events") == "event"
    assert default_namespace("public", "series_fees") == "fee"
    assert default_namespace("public", "venues") == "venues"
    assert default_namespace("ref", "markets") == "ref_markets"


def test_keyspace_names():
    keyspace = KeySpace()
    assert keyspace.value_key("market", "TEST-1") == "secmaster:market:TEST-1"
    assert keyspace.version_key("market", "TEST-1") == "{secmaster:market:TEST-1}:v"
    assert keyspace.version_key_of("secmaster:market:TEST-1") == "{secmaster:market:TEST-1}:v"
    assert keyspace.namespace_pattern("fee") == "secmaster:fee:*"


def test_keyspace_overrides():
    keyspace = KeySpace(namespaces={"markets": "mkt", "ref.venues": "venue"})
    assert keyspace.namespace("public", "markets") == "mkt"
    assert keyspace.namespace("ref", "venues") == "venue"
    assert keyspace.namespace("public", "events") == "event"


@given(st.lists(st.text(min_size=1), min_size=1, max_size=3))
def test_parse_value_key_round_trip(parts):
    keyspace = KeySpace()
    text = key_text(parts)
    assert keyspace.parse_value_key(keyspace.value_key("fee", text)) == ("fee", parts)
    assert keyspace.parse_value_key(keyspace.version_key("fee", text)) == ("fee", parts)


@pytest.mark.parametrize("redis_key", ["other:market:X", "secmaster:market", "secmaster::X", "secmaster:market:"])
def test_parse_value_key_rejects_foreign_keys(redis_key):
    with pytest.raises(DecodeError):
        KeySpace().parse_value_key(redis_key)


def test_composite_key_order_from_key_columns():
    keyspace = KeySpace(key_columns={"series_fees": ("series_ticker", "effective_from")})
    key = {"effective_from": "2024-01-01", "series_ticker": "S"}
    assert keyspace.row_value_key("public", "series_fees", key) == "secmaster:fee:S:2024-01-01"
    assert row_key_text(key) == "2024-01-01:S"


def test_key_columns_mismatch_rejected():
    with pytest.raises(DecodeError):
        row_key_text({"a": "1"}, ("a", "b"))


def make_change(op, key, data=None, old_key=None, unchanged=()):
    return Change(op=op, schema="public", table="markets", position=POSITION, xid=9, key=key, old_key=old_key, data=data, unchanged=unchanged)


def test_key_change_deletes_old_and_writes_new():
    row = {"ticker": "TEST-1B", "status": "open"}
    actions = cache_actions(make_change(Op.UPDATE, {"ticker": "TEST-1B"}, row, old_key={"ticker": "TEST-1"}), KeySpace())

    assert actions == [
        KeyDelete("market", "secmaster:market:TEST-1", POSITION),
        KeyWrite("market", "secmaster:market:TEST-1B", row, POSITION),
    ]


def test_insert_update_delete_truncate_actions():
    keyspace = KeySpace()
    row = {"ticker": "TEST-1"}
    assert cache_actions(make_change(Op.INSERT, row, row), keyspace) == [KeyWrite("market", "secmaster:market:TEST-1", row, POSITION)]
    assert cache_actions(make_change(Op.UPDATE, row, row, unchanged=("notes",)), keyspace) == [
        KeyWrite("market", "secmaster:market:TEST-1", row, POSITION, ("notes",))
    ]
    assert cache_actions(make_change(Op.DELETE, row), keyspace) == [KeyDelete("market", "secmaster:market:TEST-1", POSITION)]
    assert cache_actions(make_change(Op.TRUNCATE, {}), keyspace) == [NamespaceTruncate("market", POSITION)]


def test_update_without_data_rejected():
    with pytest.raises(DecodeError):
        cache_actions(make_change(Op.UPDATE, {"ticker": "TEST-1"}), KeySpace())
