"""Stream message encoding of changes and control messages."""

import pytest
from hypothesis import given, strategies as st

from ssmd.core.changes import Change, Op
from ssmd.core.envelope import (
    SLOT_CREATED_SUBJECT,
    _checked_change,
    _usual_change,
    SlotCreated,
    decode_change,
    decode_slot_created,
    encode_change,
    encode_slot_created,
    subject_for,
)
from ssmd.core.errors import DecodeError
from ssmd.core.jsontext import JsonNumber, dumps, loads
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position

POSITION = Position(Lsn.parse("0/164D6378"), 3)


def market_update(**overrides):
    fields = dict(
        op=Op.UPDATE,
        schema="public",
        table="markets",
        position=POSITION,
        xid=420857,
        key={"ticker": "TEST-1B"},
        old_key={"ticker": "TEST-1"},
        data={"ticker": "TEST-1B", "price": JsonNumber("12345678901234567890.123456789012345678"), "fee": "NaN", "volume": JsonNumber("9223372036854775807")},
        unchanged=("notes",),
        commit_time="2026-12-04 19:36:01.342175+00",
    )
    fields.update(overrides)
    return Change(**fields)


def test_message_layout():
    message = encode_change(market_update())

    assert message.subject == "cdc.markets.update"
    assert message.msg_id == "0/164D6378:3"
    assert message.body == (
        b'{"commit_time":"2026-12-04 19:36:01.342175+00",'
        b'"data":{"fee":"NaN","price":12345678901234567890.123456789012345678,"ticker":"TEST-1B","volume":9223372036854775807},'
        b'"key":{"ticker":"TEST-1B"},"lsn":"0/164D6378","old_key":{"ticker":"TEST-1"},"op":"update","schema":"public",'
        b'"seq":3,"table":"markets","unchanged":["notes"],"xid":420857}'
    )


def test_delete_has_no_data_old_key_or_unchanged():
    body = loads(encode_change(market_update(op=Op.DELETE, old_key=None, data=None, unchanged=())).body)
    assert "data" not in body
    assert "old_key" not in body
    assert "unchanged" not in body


def test_subject_of_other_schema():
    assert subject_for(market_update(schema="ref", table="venues")) == "cdc.ref_venues.update"


def test_subject_rejects_dotted_table():
    with pytest.raises(DecodeError):
        subject_for(market_update(table="a.b"))


def test_decode_keeps_exact_numbers():
    message = encode_change(market_update())
    decoded = decode_change(message.subject, message.body)
    assert isinstance(decoded.data["price"], JsonNumber)
    assert decoded.data["price"] == "12345678901234567890.123456789012345678"
    assert decoded.data["fee"] == "NaN"
    assert not isinstance(decoded.data["fee"], JsonNumber)


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda body: body.pop("lsn"), "'lsn'"),
        (lambda body: body.update(lsn="nope"), "'lsn'"),
        (lambda body: body.update(seq=JsonNumber("-1")), "'seq'"),
        (lambda body: body.update(seq="3"), "'seq'"),
        (lambda body: body.update(xid=JsonNumber("1.5")), "'xid'"),
        (lambda body: body.update(op="upsert"), "'op'"),
        (lambda body: body.update(key=[1]), "'key'"),
        (lambda body: body.update(unchanged=[JsonNumber("1")]), "'unchanged'"),
        (lambda body: body.pop("data"), "'data'"),
        (lambda body: body.update(table="events"), "does not match"),
    ],
)
def test_bad_body_names_field(mutate, fragment):
    message = encode_change(market_update())
    body = loads(message.body)
    mutate(body)
    assert _usual_change(message.subject, body) is None
    with pytest.raises(DecodeError) as raised:
        decode_change(message.subject, dumps(body))
    assert fragment in str(raised.value)
    assert "cdc.markets.update" in str(raised.value)


def test_bad_json_names_subject():
    with pytest.raises(DecodeError, match="cdc.markets.update"):
        decode_change("cdc.markets.update", b"{")


def test_slot_created_round_trip():
    message = encode_slot_created("ssmd_cdc", Lsn.parse("0/164D6378"))
    assert message.subject == SLOT_CREATED_SUBJECT == "cdc._ssmd.slot_created"
    assert message.body == b'{"consistent_point":"0/164D6378","slot":"ssmd_cdc"}'
    assert decode_slot_created(message.body) == SlotCreated("ssmd_cdc", Lsn.parse("0/164D6378"))


def test_slot_created_rejects_bad_point():
    with pytest.raises(DecodeError, match="consistent_point"):
        decode_slot_created(b'{"slot":"s","consistent_point":"x"}')


names = st.text(alphabet=st.characters(blacklist_characters=".*> \t\r\n\x00", blacklist_categories=("Cs",)), min_size=1, max_size=8)
numbers = st.one_of(
    st.integers().map(str),
    st.decimals(allow_nan=False, allow_infinity=False, places=None).map(lambda d: format(d, "f")),
).map(JsonNumber)
scalars = st.one_of(st.none(), st.booleans(), st.text(max_size=8), numbers)
values = st.recursive(scalars, lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3), max_leaves=6)
rows = st.dictionaries(st.text(min_size=1, max_size=6), values, min_size=1, max_size=4)


@st.composite
def changes(draw):
    op = draw(st.sampled_from(list(Op)))
    has_data = op in (Op.INSERT, Op.UPDATE)
    return Change(
        op=op,
        schema=draw(st.sampled_from(["public", "ref"])),
        table=draw(names),
        position=Position(Lsn(draw(st.integers(0, (1 << 64) - 1))), draw(st.integers(0, 0xFFFFFFFF))),
        xid=draw(st.integers(0, (1 << 32) - 1)),
        key=draw(rows) if op is not Op.TRUNCATE else {},
        old_key=draw(st.none() | rows) if op is Op.UPDATE else None,
        data=draw(rows) if has_data else None,
        unchanged=tuple(draw(st.lists(st.text(min_size=1, max_size=5), max_size=2))) if has_data else (),
        commit_time=draw(st.none() | st.just("2026-12-04 19:36:01.342175+00")),
    )


@given(changes())
def test_envelope_round_trip(change):
    message = encode_change(change)
    decoded = decode_change(message.subject, message.body)

    assert decoded.op is change.op
    assert decoded.position == change.position
    assert (decoded.schema, decoded.table, decoded.xid) == (change.schema, change.table, change.xid)
    assert dumps(decoded.key) == dumps(change.key)
    assert dumps(decoded.old_key) == dumps(change.old_key)
    assert dumps(decoded.data) == dumps(change.data)
    assert decoded.unchanged == change.unchanged
    assert decoded.commit_time == change.commit_time
    assert encode_change(decoded) == message


@given(changes())
def test_usual_and_checked_decoding_agree(change):
    message = encode_change(change)
    fields = loads(message.body)
    usual = _usual_change(message.subject, fields)
    assert usual is not None
    assert usual == _checked_change(message.subject, fields)
