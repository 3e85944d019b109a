"""Decoding wal2json format-version 2 rows, shaped as wal2json 2.5 on PostgreSQL 15 prints them."""

import json

import pytest

from ssmd.core.changes import Begin, Change, Commit, LogicalMessage, Op
from ssmd.core.encoding import encode_row
from ssmd.core.errors import DecodeError
from ssmd.core.jsontext import JsonNumber, dumps
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position
from ssmd.core.tables import ColumnInfo, TableInfo
from ssmd.core.wal2json import Wal2JsonDecoder, columns_to_fill, fill_columns

MARKETS = TableInfo(
    "public",
    "markets",
    (
        ColumnInfo("ticker", "text"),
        ColumnInfo("status", "text"),
        ColumnInfo("price", "numeric"),
        ColumnInfo("volume", "bigint"),
        ColumnInfo("notes", "text"),
    ),
    ("ticker",),
)
SERIES_FEES = TableInfo(
    "public",
    "series_fees",
    (ColumnInfo("series_ticker", "text"), ColumnInfo("effective_from", "date"), ColumnInfo("fee", "numeric")),
    ("series_ticker", "effective_from"),
)
PK_MARKETS = [{"name": "ticker", "type": "text"}]


def begin(xid, lsn, nextlsn):
    return json.dumps({"action": "B", "xid": xid, "timestamp": "2026-12-04 19:36:01.342175+00", "lsn": lsn, "nextlsn": nextlsn}).encode()


def commit(xid, lsn, nextlsn):
    return json.dumps({"action": "C", "xid": xid, "timestamp": "2026-12-04 19:36:01.342175+00", "lsn": lsn, "nextlsn": nextlsn}).encode()


def column(name, type_name, value_json):
    return f'{{"name":"{name}","type":"{type_name}","value":{value_json}}}'


def change(action, xid, lsn, table="markets", columns=None, identity=None, pk=PK_MARKETS):
    """Build a change row as text, so numbers keep their exact digits."""
    parts = [f'"action":"{action}"', f'"xid":{xid}', f'"lsn":"{lsn}"', '"schema":"public"', f'"table":"{table}"']
    if columns is not None:
        parts.append(f'"columns":[{",".join(columns)}]')
    if identity is not None:
        parts.append(f'"identity":[{",".join(identity)}]')
    if pk is not None:
        parts.append(f'"pk":{json.dumps(pk)}')
    return ("{" + ",".join(parts) + "}").encode()


def market_columns(ticker="TEST-1", status='"open"', price="1.5", volume="10", notes='"n"'):
    return [
        column("ticker", "text", f'"{ticker}"'),
        column("status", "text", status),
        column("price", "numeric", price),
        column("volume", "bigint", volume),
        column("notes", "text", notes),
    ]


def decode_all(decoder, rows):
    return [decoder.decode(row) for row in rows]


def test_transaction_records_and_positions():
    decoder = Wal2JsonDecoder()
    records = decode_all(
        decoder,
        [
            begin(5, "0/164D6378", "0/164D63A8"),
            change("I", 5, "0/164D6000", columns=market_columns("TEST-1")),
            change("I", 5, "0/164D6100", columns=market_columns("TEST-2")),
            commit(5, "0/164D6378", "0/164D63A8"),
        ],
    )

    assert records[0] == Begin(5, Lsn.parse("0/164D6378"), Lsn.parse("0/164D63A8"), "2026-12-04 19:36:01.342175+00")
    assert records[1].position == Position(Lsn.parse("0/164D6378"), 0)
    assert records[2].position == Position(Lsn.parse("0/164D6378"), 1)
    assert records[1].change_lsn == Lsn.parse("0/164D6000")
    assert records[1].commit_time == "2026-12-04 19:36:01.342175+00"
    assert records[3] == Commit(5, Lsn.parse("0/164D6378"), Lsn.parse("0/164D63A8"), "2026-12-04 19:36:01.342175+00")
    assert not decoder.in_transaction


def test_exact_numerics_case():
    decoder = Wal2JsonDecoder([MARKETS])
    rows = [
        begin(10, "0/100", "0/130"),
        change("I", 10, "0/90", columns=market_columns(price="12345678901234567890.123456789012345678", volume="9223372036854775807")),
        change("U", 10, "0/A0", columns=market_columns(price="0.0700", volume="9223372036854775807"), identity=[column("ticker", "text", '"TEST-1"')]),
        commit(10, "0/100", "0/130"),
    ]
    _, inserted, updated, _ = decode_all(decoder, rows)

    assert b'"price":12345678901234567890.123456789012345678' in encode_row(inserted.data)
    assert b'"volume":9223372036854775807' in encode_row(inserted.data)
    assert b'"price":0.0700' in encode_row(updated.data)
    assert isinstance(updated.data["price"], JsonNumber)
    assert updated.old_key is None


@pytest.mark.parametrize(
    ("type_name", "value"),
    [
        ("numeric(30,10)", "0.0700"),
        ("double precision", "1e+300"),
        ("real", "-1.5e-07"),
        ("numeric", "123456789012345678901234567890"),
        ("bigint", "-9223372036854775808"),
        ("integer", "-0"),
    ],
)
def test_number_text_kept_exactly(type_name, value):
    decoder = Wal2JsonDecoder()
    decoder.decode(begin(10, "0/100", "0/130"))
    inserted = decoder.decode(change("I", 10, "0/90", columns=[column("ticker", "text", '"T"'), column("n", type_name, value)]))
    assert inserted.data["n"] == JsonNumber(value)
    assert type(inserted.data["n"]) is JsonNumber


def test_unquoted_float_parsed_again_exactly():
    # A layout the fast path does not quote (a typeoid between type and value) leaves a float
    # after orjson, and the decoder must fall back to the exact parser for that row.
    decoder = Wal2JsonDecoder([MARKETS])
    decoder.decode(begin(10, "0/100", "0/130"))
    columns = market_columns()[:2] + ['{"name":"price","type":"numeric","typeoid":1700,"value":0.0700}', column("volume", "bigint", "7")]
    inserted = decoder.decode(change("I", 10, "0/90", columns=columns))
    after = decoder.decode(change("I", 10, "0/91", columns=market_columns(ticker="TEST-2")))
    assert encode_row(inserted.data) == b'{"price":0.0700,"status":"open","ticker":"TEST-1","volume":7}'
    assert inserted.position == Position(Lsn.parse("0/100"), 0)
    assert after.position == Position(Lsn.parse("0/100"), 1)


def test_number_in_text_value_not_quoted():
    decoder = Wal2JsonDecoder()
    decoder.decode(begin(10, "0/100", "0/130"))
    tricky = json.dumps('"type":"numeric","value":1.50')
    inserted = decoder.decode(change("I", 10, "0/90", columns=[column("ticker", "text", tricky), column("n", "numeric", "1.50")]))
    assert inserted.data["ticker"] == '"type":"numeric","value":1.50'
    assert encode_row(inserted.data) == b'{"n":1.50,"ticker":"\\"type\\":\\"numeric\\",\\"value\\":1.50"}'


def test_number_for_text_type_rejected():
    decoder = Wal2JsonDecoder()
    decoder.decode(begin(10, "0/100", "0/130"))
    with pytest.raises(DecodeError, match="column 'ticker'"):
        decoder.decode(change("I", 10, "0/90", columns=[column("ticker", "text", "5")]))


def test_nan_numeric_needs_reread():
    decoder = Wal2JsonDecoder([SERIES_FEES])
    decoder.decode(begin(11, "0/200", "0/230"))
    columns = [column("series_ticker", "text", '"S"'), column("effective_from", "date", '"2024-01-01"'), column("fee", "numeric", "null")]
    pk = [{"name": "series_ticker", "type": "text"}, {"name": "effective_from", "type": "date"}]
    decoded = decoder.decode_row(change("U", 11, "0/1F0", "series_fees", columns, [columns[0], columns[1]], pk))

    assert columns_to_fill(decoded) == ("fee",)
    filled = fill_columns(decoded, {"fee": "NaN"})
    assert filled.data["fee"] == "NaN"
    assert not isinstance(filled.data["fee"], JsonNumber)
    assert filled.unchanged == ()

    really_null = fill_columns(decoded, {"fee": None})
    assert really_null.data["fee"] is None
    assert really_null.unchanged == ()


def test_nan_numeric_row_gone_stays_unchanged():
    decoder = Wal2JsonDecoder([SERIES_FEES])
    decoder.decode(begin(11, "0/200", "0/230"))
    columns = [column("series_ticker", "text", '"S"'), column("effective_from", "date", '"2024-01-01"'), column("fee", "numeric", "null")]
    pk = [{"name": "series_ticker", "type": "text"}, {"name": "effective_from", "type": "date"}]
    decoded = decoder.decode_row(change("I", 11, "0/1F0", "series_fees", columns, None, pk))

    filled = fill_columns(decoded, None)
    assert "fee" not in filled.data
    assert filled.unchanged == ("fee",)


def test_key_change_sets_old_key():
    decoder = Wal2JsonDecoder([MARKETS])
    decoder.decode(begin(12, "0/300", "0/330"))
    updated = decoder.decode(change("U", 12, "0/2F0", columns=market_columns("TEST-1B"), identity=[column("ticker", "text", '"TEST-1"')]))

    assert updated.key == {"ticker": "TEST-1B"}
    assert updated.old_key == {"ticker": "TEST-1"}
    assert updated.data["ticker"] == "TEST-1B"


def test_composite_key_from_pk_not_first_column():
    decoder = Wal2JsonDecoder()
    decoder.decode(begin(13, "0/400", "0/430"))
    columns = [column("fee", "numeric", "0.5"), column("series_ticker", "text", '"S"'), column("effective_from", "date", '"2024-01-01"')]
    pk = [{"name": "series_ticker", "type": "text"}, {"name": "effective_from", "type": "date"}]
    inserted = decoder.decode(change("I", 13, "0/3F0", "series_fees", columns, None, pk))

    assert list(inserted.key.items()) == [("series_ticker", "S"), ("effective_from", "2024-01-01")]


def test_delete_with_full_identity_keeps_pk_only():
    decoder = Wal2JsonDecoder([MARKETS])
    decoder.decode(begin(14, "0/500", "0/530"))
    decoded = decoder.decode_row(change("D", 14, "0/4F0", identity=market_columns("TEST-2", status="null")))

    assert decoded.change.op is Op.DELETE
    assert decoded.change.key == {"ticker": "TEST-2"}
    assert decoded.change.data is None
    assert decoded.old_row["status"] is None


def test_toast_omitted_column_unchanged():
    decoder = Wal2JsonDecoder([MARKETS])
    decoder.decode(begin(15, "0/600", "0/630"))
    columns = market_columns(status='"closed"')[:4]
    decoded = decoder.decode_row(change("U", 15, "0/5F0", columns=columns, identity=[column("ticker", "text", '"TEST-1"')]))

    assert decoded.change.unchanged == ("notes",)
    assert "notes" not in decoded.change.data
    assert columns_to_fill(decoded) == ("notes",)
    assert fill_columns(decoded, {"notes": "x" * 10000}).data["notes"] == "x" * 10000
    assert fill_columns(decoded, None).unchanged == ("notes",)


def test_toast_filled_from_full_identity():
    decoder = Wal2JsonDecoder([MARKETS])
    decoder.decode(begin(16, "0/700", "0/730"))
    old = market_columns(notes='"long old notes"')
    decoded = decoder.decode_row(change("U", 16, "0/6F0", columns=market_columns(status='"closed"')[:4], identity=old))

    filled = fill_columns(decoded, None)
    assert filled.data["notes"] == "long old notes"
    assert filled.data["status"] == "closed"
    assert filled.unchanged == ()


def test_toast_numeric_null_in_identity_needs_reread():
    table = TableInfo("public", "markets", MARKETS.columns, ("ticker",))
    decoder = Wal2JsonDecoder([table])
    decoder.decode(begin(17, "0/800", "0/830"))
    columns = [c for c in market_columns() if '"price"' not in c]
    decoded = decoder.decode_row(change("U", 17, "0/7F0", columns=columns, identity=market_columns(price="null")))

    assert fill_columns(decoded, None).unchanged == ("price",)
    assert fill_columns(decoded, {"price": "Infinity"}).data["price"] == "Infinity"


def test_unchanged_empty_without_table_info():
    decoder = Wal2JsonDecoder()
    decoder.decode(begin(18, "0/900", "0/930"))
    decoded = decoder.decode(change("U", 18, "0/8F0", columns=market_columns()[:2], identity=[column("ticker", "text", '"TEST-1"')]))

    assert decoded.unchanged == ()


def test_interleaved_transactions_order_by_commit():
    # Session A's change is written first (lower change LSN) but A commits after B,
    # so wal2json sends B's transaction first and A's position is later.
    decoder = Wal2JsonDecoder()
    b_rows = [begin(21, "0/2000", "0/2030"), change("U", 21, "0/1F00", columns=market_columns("TEST-2")), commit(21, "0/2000", "0/2030")]
    a_rows = [begin(20, "0/2100", "0/2130"), change("U", 20, "0/1E00", columns=market_columns("TEST-1")), commit(20, "0/2100", "0/2130")]
    b_change = decode_all(decoder, b_rows)[1]
    a_change = decode_all(decoder, a_rows)[1]

    assert a_change.change_lsn < b_change.change_lsn
    assert a_change.position > b_change.position


def test_positions_order_across_high_half():
    decoder = Wal2JsonDecoder()
    first = decode_all(decoder, [begin(1, "F/FFFFFFFF", "10/30"), change("I", 1, "F/FFFFFF00", columns=market_columns()), commit(1, "F/FFFFFFFF", "10/30")])[1]
    second = decode_all(decoder, [begin(2, "10/0", "10/40"), change("I", 2, "F/FFFFFF80", columns=market_columns()), commit(2, "10/0", "10/40")])[1]

    assert first.position < second.position
    assert first.position.message_id() == "F/FFFFFFFF:0"


def test_truncate_rows_get_positions():
    decoder = Wal2JsonDecoder()
    rows = [
        begin(30, "0/3000", "0/3030"),
        b'{"action":"T","xid":30,"lsn":"0/2F00","schema":"public","table":"markets"}',
        b'{"action":"T","xid":30,"lsn":"0/2F00","schema":"public","table":"events"}',
        commit(30, "0/3000", "0/3030"),
    ]
    _, markets, events, _ = decode_all(decoder, rows)

    assert (markets.op, markets.table, markets.position.index) == (Op.TRUNCATE, "markets", 0)
    assert (events.op, events.table, events.position.index) == (Op.TRUNCATE, "events", 1)
    assert markets.data is None
    assert markets.key == {}


def test_logical_messages():
    decoder = Wal2JsonDecoder()
    outside = decoder.decode(b'{"action":"M","xid":null,"timestamp":null,"lsn":"0/152B178","transactional":false,"prefix":"px","content":"hello"}')
    decoder.decode(begin(31, "0/4000", "0/4030"))
    inside = decoder.decode(b'{"action":"M","xid":31,"lsn":"0/4000","transactional":true,"prefix":"px","content":"hi"}')
    after = decoder.decode(change("I", 31, "0/3F00", columns=market_columns()))

    assert outside == LogicalMessage("px", "hello", False, Lsn.parse("0/152B178"), None)
    assert inside.xid == 31
    assert inside.transactional
    assert after.position.index == 0


def test_filter_keeps_indexes_stable():
    decoder = Wal2JsonDecoder([MARKETS], only_known_tables=True)
    rows = [
        begin(40, "0/5000", "0/5030"),
        change("I", 40, "0/4F00", table="other", columns=[column("id", "integer", "1")], pk=[{"name": "id", "type": "integer"}]),
        change("I", 40, "0/4F80", columns=market_columns()),
        commit(40, "0/5000", "0/5030"),
    ]
    _, skipped, kept, _ = decode_all(decoder, rows)

    assert skipped is None
    assert kept.position.index == 1


def test_empty_transaction():
    decoder = Wal2JsonDecoder()
    records = decode_all(decoder, [begin(41, "0/6000", "0/6030"), commit(41, "0/6000", "0/6030")])
    assert [type(record) for record in records] == [Begin, Commit]


def test_pk_empty_falls_back_to_table_info():
    decoder = Wal2JsonDecoder([MARKETS])
    decoder.decode(begin(42, "0/7000", "0/7030"))
    inserted = decoder.decode(change("I", 42, "0/6F00", columns=market_columns(), pk=[]))
    assert inserted.key == {"ticker": "TEST-1"}


@pytest.mark.parametrize(
    ("rows", "fragment"),
    [
        ([b"{not json"], "invalid wal2json JSON"),
        ([b"[1,2]"], "expected a JSON object"),
        ([change("I", 1, "0/10", columns=market_columns())], "lsn 0/10, table public.markets"),
        ([begin(1, "0/20", "0/30"), b'{"action":"X","xid":1,"lsn":"0/10","schema":"public","table":"markets"}'], "unknown wal2json action 'X' (lsn 0/10, table public.markets)"),
        ([begin(1, "0/20", "0/30"), change("I", 1, "0/10")], "missing or invalid 'columns': expected a list of columns (lsn 0/10, table public.markets)"),
        ([begin(1, "0/20", "0/30"), change("D", 1, "0/10")], "delete row without 'identity'"),
        ([begin(1, "0/20", "0/30"), change("I", 1, "0/10", columns=market_columns(), pk=[])], "no primary key"),
        ([begin(1, "0/20", "0/30"), change("I", 1, "0/10", columns=[column("ticker", "boolean", '"x"')])], "column 'ticker' (boolean)"),
        ([begin(1, "0/20", "0/30"), begin(2, "0/40", "0/50")], "still open"),
        ([commit(1, "0/20", "0/30")], "without a B row"),
        ([begin(1, "0/20", "0/30"), commit(2, "0/40", "0/50")], "does not match"),
        ([begin(1, "0/20", "0/30"), change("I", 1, "zz", columns=market_columns())], "invalid LSN 'zz'"),
        ([begin(1, "0/20", "0/30"), change("I", 1, "zz", columns=market_columns())], "(lsn zz, table public.markets)"),
        ([b'{"action":"B","xid":1,"lsn":"0/20"}'], "'nextlsn'"),
        ([b'{"action":"B","xid":1,"lsn":"zz","nextlsn":"0/30"}'], "invalid 'lsn'"),
        ([b'{"action":"B","xid":"1","lsn":"0/20","nextlsn":"0/30"}'], "'xid'"),
    ],
)
def test_malformed_rows_raise_decode_error(rows, fragment):
    decoder = Wal2JsonDecoder()
    with pytest.raises(DecodeError) as raised:
        decode_all(decoder, rows)
    assert fragment in str(raised.value)


def test_decode_error_carries_lsn_and_table():
    decoder = Wal2JsonDecoder()
    decoder.decode(begin(1, "0/20", "0/30"))
    with pytest.raises(DecodeError) as raised:
        decoder.decode(change("I", 1, "0/10"))
    assert raised.value.lsn == "0/10"
    assert raised.value.table == "public.markets"


def test_round_trip_of_decoded_row_bytes():
    decoder = Wal2JsonDecoder()
    decoder.decode(begin(1, "0/20", "0/30"))
    inserted = decoder.decode(change("I", 1, "0/10", columns=market_columns(price="1.000")))
    assert isinstance(inserted, Change)
    assert dumps(inserted.data) == b'{"notes":"n","price":1.000,"status":"open","ticker":"TEST-1","volume":10}'
