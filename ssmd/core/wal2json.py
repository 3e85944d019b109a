"""Decoding of wal2json format-version 2 rows into `Begin`, `Change`, `Commit`, `LogicalMessage`.

The publisher requests the options `include-xids`, `include-lsn`, `include-timestamp`,
`include-transaction`, `include-pk` and `include-types`. Facts about wal2json 2.5 on
PostgreSQL 15 that this module relies on:

- a transaction arrives only after it committed, as one `B` row, one row per change (`I`, `U`,
  `D`, `T` one per truncated table, `M` for a transactional logical message) and one `C` row;
- the `B` and `C` rows carry the commit record's `lsn` and its end `nextlsn`. A change row's own
  `lsn` is not ordered across transactions, so a change's position is (commit LSN, index of the
  change inside the transaction);
- a non-transactional logical message arrives on its own, outside any `B`/`C` pair, with a null
  xid;
- `pk` lists the primary-key columns, and is empty when the table has none. An UPDATE or
  DELETE carries `identity` with the old key columns, or every old column under REPLICA
  IDENTITY FULL;
- an UPDATE leaves out a TOASTed column it did not change, and numeric/float NaN and Infinity
  arrive as `null`, like SQL NULL. The publisher completes such columns before it publishes:
  `columns_to_fill` names them and `fill_columns` applies the old tuple or a re-read.

Rows are parsed with orjson, which is several times faster than `json.loads` with number hooks
but turns numbers into int and float. wal2json prints the values of integer, float and numeric
columns as bare JSON numbers, so `_parse_json` first quotes each such number after its
`"type":"<number type>","value":` prefix, and the exact text arrives as a string. A bare number
left anywhere else is an int or float after parsing. An int is exact. A float, or a row orjson
rejects, makes the decoder parse that row again with `jsontext.loads`, which keeps every number
as its text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import orjson

from ssmd.core.changes import Begin, Change, Commit, LogicalMessage, Op, Record, Row
from ssmd.core.encoding import (
    base_type, change_converter, is_array_type, is_float_like, string_from_text, text_converter, value_from_text,
)
from ssmd.core.errors import DecodeError
from ssmd.core.jsontext import JsonNumber, loads
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position
from ssmd.core.tables import TableInfo, column_name_set

# Options for START_REPLICATION or pg_logical_slot_get_changes; add-tables is added per deployment.
WAL2JSON_OPTIONS: dict[str, str] = {
    "format-version": "2",
    "include-xids": "1",
    "include-lsn": "1",
    "include-timestamp": "1",
    "include-transaction": "1",
    "include-pk": "1",
    "include-types": "1",
}

_ACTIONS = {"I": Op.INSERT, "U": Op.UPDATE, "D": Op.DELETE, "T": Op.TRUNCATE}

# The value of a column whose type wal2json 2.5 prints as a JSON number. It picks that form by
# type oid (int2, int4, int8, oid, float4, float8, numeric), and include-typmod may add "(10,2)".
# The pattern cannot match inside a string value, because a `"` inside a JSON string is always
# escaped. So `value":` with a bare quote can only be the wal2json key.
_NUMBER_VALUE = re.compile(
    rb'("type":"(?:smallint|integer|bigint|oid|real|double precision|numeric(?:\([0-9,]*\))?)","value":)'
    rb"(-?[0-9][0-9.eE+-]*)"
)
_NUMBER_TYPES = frozenset({"smallint", "integer", "bigint", "oid", "real", "double precision", "numeric"})
_SPECIAL_NUMBERS = frozenset({"NaN", "Infinity", "-Infinity"})


class _InexactNumber(Exception):
    """A number reached the decoder as a float, so its exact text must be parsed again."""


@dataclass(frozen=True, slots=True)
class DecodedChange:
    """A decoded change with what the publisher needs to complete its row.

    `old_row` is the canonical old tuple from `identity`: every column under REPLICA IDENTITY
    FULL, only the key otherwise. `types` maps each column wal2json sent to its type name.
    """

    change: Change
    old_row: Row | None
    types: dict[str, str]


class Wal2JsonDecoder:
    """Stateful decoder of one wal2json v2 stream; pure, fed one row of bytes at a time.

    `tables` lists the `TableInfo` of known tables. For a known table the decoder reports
    TOAST-omitted columns in `Change.unchanged` and uses its key columns when a row has no `pk`.
    With `only_known_tables`, changes of other tables are decoded to None (they still count in the
    transaction's index, so positions do not depend on the filter).
    """

    def __init__(self, tables: Iterable[TableInfo] = (), *, only_known_tables: bool = False) -> None:
        self._tables = {(table.schema, table.name): table for table in tables}
        self._only_known = only_known_tables
        self._begin: Begin | None = None
        self._begin_text: tuple[str, str] = ("", "")  # the B row's lsn and nextlsn as sent
        self._next_index = 0
        self._row: bytes | str = b""  # the row being decoded, for an exact re-parse

    @property
    def in_transaction(self) -> bool:
        """True between a `B` row and its `C` row."""
        return self._begin is not None

    def decode(self, data: bytes | str) -> Record | None:
        """Decode one row; None for a change of a table outside the filter."""
        decoded = self.decode_row(data)
        if isinstance(decoded, DecodedChange):
            return decoded.change
        return decoded

    def decode_row(self, data: bytes | str) -> Begin | Commit | LogicalMessage | DecodedChange | None:
        """Decode one row, keeping the old tuple and column types of a change."""
        self._row = data
        message = _parse_json(data)
        action = message.get("action")
        if action == "B":
            return self._on_begin(message)
        if action == "C":
            return self._on_commit(message)
        if action == "M":
            return self._on_message(message)
        if action in _ACTIONS:
            return self._on_change(message, _ACTIONS[action])
        raise DecodeError(f"unknown wal2json action {action!r}", lsn=_text(message.get("lsn")), table=_table_name(message))

    def _on_begin(self, message: dict[str, Any]) -> Begin:
        if self._begin is not None:
            raise DecodeError(
                f"B row while transaction {self._begin.xid} at {self._begin.commit_lsn} is still open", lsn=_text(message.get("lsn"))
            )
        begin = Begin(
            xid=_required_int(message, "xid"),
            commit_lsn=_required_lsn(message, "lsn"),
            next_lsn=_required_lsn(message, "nextlsn"),
            commit_time=_optional_text(message, "timestamp"),
        )
        self._begin = begin
        self._begin_text = (message["lsn"], message["nextlsn"])
        self._next_index = 0
        return begin

    def _on_commit(self, message: dict[str, Any]) -> Commit:
        begin = self._begin
        if begin is not None and message.get("lsn") == self._begin_text[0] and message.get("nextlsn") == self._begin_text[1]:
            # The C row repeats the B row's positions, so they are not parsed twice.
            commit_lsn, next_lsn = begin.commit_lsn, begin.next_lsn
        else:
            commit_lsn, next_lsn = _required_lsn(message, "lsn"), _required_lsn(message, "nextlsn")
        commit = Commit(
            xid=_required_int(message, "xid"),
            commit_lsn=commit_lsn,
            next_lsn=next_lsn,
            commit_time=_optional_text(message, "timestamp"),
        )
        if begin is None:
            raise DecodeError(f"C row of transaction {commit.xid} without a B row", lsn=str(commit.commit_lsn))
        if (begin.xid, begin.commit_lsn) != (commit.xid, commit.commit_lsn):
            raise DecodeError(
                f"C row of transaction {commit.xid} does not match the open transaction {begin.xid} at {begin.commit_lsn}",
                lsn=str(commit.commit_lsn),
            )
        self._begin = None
        return commit

    def _on_message(self, message: dict[str, Any]) -> LogicalMessage:
        transactional = message.get("transactional")
        if not isinstance(transactional, bool):
            raise DecodeError("M row without a boolean 'transactional'", lsn=_text(message.get("lsn")))
        xid = message.get("xid")
        return LogicalMessage(
            prefix=_required_text(message, "prefix"),
            content=_required_text(message, "content"),
            transactional=transactional,
            lsn=_required_lsn(message, "lsn"),
            xid=None if xid is None else _required_int(message, "xid"),
        )

    def _on_change(self, message: dict[str, Any], op: Op) -> DecodedChange | None:
        begin = self._begin
        if begin is None:
            raise DecodeError(f"{op.value} row outside a transaction", lsn=_text(message.get("lsn")), table=_table_name(message))
        index = self._next_index
        self._next_index += 1

        schema = message.get("schema")
        table = message.get("table")
        if type(schema) is not str or type(table) is not str:
            schema = _required_text(message, "schema")
            table = _required_text(message, "table")
        info = self._tables.get((schema, table))
        if info is None and self._only_known:
            return None
        position = Position(begin.commit_lsn, index)
        try:
            try:
                return _decode_change(message, op, position, begin, info)
            except _InexactNumber:
                return _decode_change(_parse_exact(self._row), op, position, begin, info)
        except DecodeError as exc:
            if exc.lsn is None:
                raise DecodeError(str(exc), lsn=_text(message.get("lsn")), table=_table_name(message)) from None
            raise


def _decode_change(message: dict[str, Any], op: Op, position: Position, begin: Begin, info: TableInfo | None) -> DecodedChange:
    schema = message["schema"]
    table = message["table"]
    change_lsn = _change_lsn(message)
    if op is Op.TRUNCATE:
        change = Change(op, schema, table, position, begin.xid, commit_time=begin.commit_time, change_lsn=change_lsn)
        return DecodedChange(change, None, {})

    types: dict[str, str] = {}
    new_row = _canonical_columns(message.get("columns"), "columns", types) if op is not Op.DELETE else None
    old_row = _canonical_columns(message.get("identity"), "identity", types) if "identity" in message else None
    key_columns = _key_columns(message, info, old_row)

    if op is Op.DELETE:
        if old_row is None:
            raise DecodeError("delete row without 'identity'")
        key = _pick(old_row, key_columns, "identity")
        change = Change(op, schema, table, position, begin.xid, key, commit_time=begin.commit_time, change_lsn=change_lsn)
        return DecodedChange(change, old_row, types)

    assert new_row is not None
    key = _pick(new_row, key_columns, "columns")
    old_key = None
    if old_row is not None and op is Op.UPDATE:
        previous = _pick(old_row, key_columns, "identity")
        if _key_changed(previous, key):
            old_key = previous
    unchanged: tuple[str, ...] = ()
    if info is not None and op is Op.UPDATE and not new_row.keys() >= column_name_set(info):
        unchanged = tuple(column.name for column in info.columns if column.name not in new_row)
        for column in info.columns:
            types.setdefault(column.name, column.type_name)
    change = Change(op, schema, table, position, begin.xid, key, old_key, new_row, unchanged, begin.commit_time, change_lsn)
    return DecodedChange(change, old_row, types)


def _change_lsn(message: dict[str, Any]) -> Lsn | None:
    text = message.get("lsn")
    if text is None:
        return None
    if not isinstance(text, str) or isinstance(text, JsonNumber):
        raise DecodeError(f"invalid 'lsn' {text!r}: expected text like '16/B374D848'")
    return Lsn.parse(text)


def _canonical_columns(columns: Any, field: str, types: dict[str, str]) -> Row:
    if type(columns) is not list:
        raise DecodeError(f"missing or invalid {field!r}: expected a list of columns")
    row: Row = {}
    for column in columns:
        try:
            name = column["name"]
            type_name = column["type"]
            value = column["value"]
        except (KeyError, TypeError):
            _raise_invalid_column(column, field)
        if type(name) is not str or type(type_name) is not str:
            _raise_invalid_column(column, field)
        types[name] = type_name
        if value is None:
            row[name] = None
            continue
        convert = _COLUMN_CONVERTERS.get(type_name) or _column_converter(type_name)
        try:
            row[name] = convert(value)
        except DecodeError as exc:
            raise DecodeError(f"column {name!r} ({type_name}): {exc}") from None
    return row


def _raise_invalid_column(column: Any, field: str) -> None:
    if not isinstance(column, dict) or not isinstance(column.get("name"), str) or not isinstance(column.get("type"), str):
        raise DecodeError(f"invalid entry in {field!r}: expected name, type and value, got {str(column)[:200]}")
    raise DecodeError(f"column {column['name']!r} in {field!r} has no value")


def _number_value(value: Any) -> Any:
    """Map a wal2json number (quoted exact text, int, or an exact-parse `JsonNumber`) to its canonical value."""
    kind = type(value)
    if kind is str:
        return value if value in _SPECIAL_NUMBERS else JsonNumber(value)
    if kind is JsonNumber:
        return value
    if kind is int:
        return JsonNumber(str(value))
    if kind is float:
        raise _InexactNumber
    raise DecodeError(f"invalid wal2json number {value!r}")


_COLUMN_CONVERTERS: dict[str, Callable[[Any], Any]] = {}


def _text_value(value: Any) -> Any:
    if type(value) is not str:
        raise DecodeError(f"invalid wal2json value {value!r}: expected a string")
    return value


def _column_converter(type_name: str) -> Callable[[Any], Any]:
    """Return (and remember) the converter of a non-null wal2json value of `type_name`."""
    name = base_type(type_name)
    if name in _NUMBER_TYPES:
        convert = _number_value
    elif not is_array_type(name) and text_converter(name) is string_from_text:
        convert = _text_value  # text, varchar, uuid and the like: the JSON string is the value
    else:
        convert = change_converter(type_name)
    if len(_COLUMN_CONVERTERS) < 4096:
        _COLUMN_CONVERTERS[type_name] = convert
    return convert


def _key_columns(message: dict[str, Any], info: TableInfo | None, old_row: Row | None) -> tuple[str, ...]:
    pk = message.get("pk")
    if type(pk) is list and pk:
        try:
            names = tuple([entry["name"] for entry in pk])
        except (KeyError, TypeError):
            raise DecodeError(f"invalid 'pk': {str(pk)[:200]}") from None
        for name in names:
            if type(name) is not str:
                raise DecodeError(f"invalid 'pk': {str(pk)[:200]}")
        return names
    if info is not None and info.key_columns:
        return info.key_columns
    if old_row is not None and old_row:
        # No primary key but a replica identity index: identity contains exactly its columns.
        return tuple(old_row)
    raise DecodeError("row has no primary key, no known key columns and no identity: add a primary key to the table")


def _pick(row: Row, columns: tuple[str, ...], field: str) -> Row:
    missing = [name for name in columns if name not in row]
    if missing:
        raise DecodeError(f"key column(s) {', '.join(missing)} missing from {field!r}")
    return {name: row[name] for name in columns}


def _key_changed(previous: Row, key: Row) -> bool:
    # Canonical values of one column have one Python type, so equal dicts mean equal encodings.
    # The type check keeps a number apart from a string with the same text.
    if previous != key:
        return True
    return any(type(previous[name]) is not type(key[name]) for name in key)


# --- completing rows: TOAST-omitted columns and NaN rendered as null --------------------------


def columns_to_fill(decoded: DecodedChange) -> tuple[str, ...]:
    """Return the columns of an insert or update whose value the publisher must still find.

    These are the TOAST-omitted columns (`Change.unchanged`) and every numeric or float column
    whose value is null, since wal2json 2.5 renders NaN and Infinity as null.
    """
    change = decoded.change
    if change.data is None:
        return ()
    if None not in change.data.values():
        return change.unchanged
    nulls = tuple(
        name for name, value in change.data.items() if value is None and is_float_like(decoded.types.get(name, ""))
    )
    return change.unchanged + nulls


def fill_columns(decoded: DecodedChange, reread: Mapping[str, str | None] | None) -> Change:
    """Return the change with its `columns_to_fill` completed.

    A TOAST-omitted column takes its value from the old tuple when `identity` has it (REPLICA
    IDENTITY FULL), except a null numeric there, which is as ambiguous as in the new tuple.
    Any other column takes the re-read text output in `reread` (the row's current values by key,
    None when the row no longer exists). A column neither source can fill stays in `unchanged`
    and out of `data`, so the cache keeps its cached value.
    """
    change = decoded.change
    wanted = columns_to_fill(decoded)
    if not wanted or change.data is None:
        return change

    data = dict(change.data)
    unfilled = []
    for name in wanted:
        type_name = decoded.types.get(name, "")
        if name in change.unchanged and decoded.old_row is not None and name in decoded.old_row:
            old_value = decoded.old_row[name]
            if old_value is not None or not is_float_like(type_name):
                data[name] = old_value
                continue
        if reread is not None and name in reread:
            data[name] = value_from_text(type_name, reread[name])
            continue
        data.pop(name, None)
        unfilled.append(name)
    return replace(change, data=data, unchanged=tuple(unfilled))


# --- field helpers ---------------------------------------------------------------------------


def _parse_json(data: bytes | str) -> dict[str, Any]:
    raw = data.encode() if isinstance(data, str) else data
    try:
        message = orjson.loads(_NUMBER_VALUE.sub(_quote_number, raw))
    except orjson.JSONDecodeError:
        # orjson is stricter than the JSON standard in a few spots (e.g. a lone surrogate
        # escape), so a row it rejects gets the standard parser before it counts as invalid.
        return _parse_exact(data)
    if not isinstance(message, dict):
        raise DecodeError(f"invalid wal2json row: expected a JSON object, got {type(message).__name__}")
    return message


def _quote_number(match: re.Match[bytes]) -> bytes:
    # A function is about three times faster than the template r'\1"\2"' on Python 3.11, which
    # expands a template in Python code for every match.
    return match[1] + b'"' + match[2] + b'"'


def _parse_exact(data: bytes | str) -> dict[str, Any]:
    try:
        message = loads(data)
    except ValueError as exc:
        raise DecodeError(f"invalid wal2json JSON: {exc}; row starts {bytes(data[:120]) if isinstance(data, bytes) else data[:120]!r}") from None
    if not isinstance(message, dict):
        raise DecodeError(f"invalid wal2json row: expected a JSON object, got {type(message).__name__}")
    return message


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _table_name(message: dict[str, Any]) -> str | None:
    schema, table = message.get("schema"), message.get("table")
    if isinstance(table, str):
        return f"{schema}.{table}" if isinstance(schema, str) else table
    return None


def _required_text(message: dict[str, Any], field: str) -> str:
    value = message.get(field)
    if not isinstance(value, str) or isinstance(value, JsonNumber):
        raise DecodeError(f"missing or invalid {field!r} in {message.get('action')} row", lsn=_text(message.get("lsn")))
    return value


def _optional_text(message: dict[str, Any], field: str) -> str | None:
    value = message.get(field)
    return value if isinstance(value, str) and not isinstance(value, JsonNumber) else None


def _required_int(message: dict[str, Any], field: str) -> int:
    value = message.get(field)
    if type(value) is int and value >= 0:
        return value
    if not isinstance(value, JsonNumber) or not value.isdigit():
        raise DecodeError(f"missing or invalid {field!r} in {message.get('action')} row: {value!r}", lsn=_text(message.get("lsn")))
    return int(value)


def _required_lsn(message: dict[str, Any], field: str) -> Lsn:
    text = _required_text(message, field)
    try:
        return Lsn.parse(text)
    except DecodeError as exc:
        raise DecodeError(f"invalid {field!r} in {message.get('action')} row: {exc}", lsn=text) from None
