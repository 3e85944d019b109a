"""The canonical row encoder: one JSON form for a row, whichever path read it.

Two paths reach a cached row and must produce identical bytes:

- the change path gets wal2json format-version 2 values (numbers as `JsonNumber`, booleans,
  strings, null) with the type name from `include-types`;
- the warm path gets PostgreSQL text output per column, as `COPY ... TO STDOUT` prints it, with
  the type name from `format_type(atttypid, atttypmod)`, which is the spelling `include-types`
  uses. A `::text` cast is not the same: it gives `true` for a boolean (rejected here) and drops
  the trailing blanks of `character(n)` (which would go unnoticed).

Both sessions must be pinned to `DateStyle=ISO`, `TimeZone=UTC`, `extra_float_digits=3`,
`bytea_output=hex` and `IntervalStyle=postgres`, because wal2json 2.5 and the text output both
render dates, times, floats, bytea and intervals through the type's output function, which
follows those settings. A date or timestamp in another style is rejected with `DecodeError`
rather than cached in a second spelling.

| PostgreSQL type | canonical JSON |
|---|---|
| smallint, integer, bigint, oid | bare number, exact digits |
| numeric, real, double precision, finite | bare number, exact digits and trailing zeros (`0.0700`) |
| numeric, real, double precision, NaN / Infinity / -Infinity | string `"NaN"`, `"Infinity"`, `"-Infinity"` |
| boolean | `true` / `false` |
| json, jsonb | the embedded JSON value, numbers exact (a jsonb string scalar becomes a JSON string) |
| any array | JSON array (nested for more dimensions) of the element type's canonical values, null for NULL elements |
| timestamp with time zone | `"2024-03-15T17:30:00.123456+00:00"` (fraction as PostgreSQL prints it; input must be UTC) |
| timestamp without time zone | `"2024-03-15T17:30:00.123456"` |
| date | `"2024-03-15"` |
| infinite date or timestamp | `"infinity"` / `"-infinity"` |
| bytea | `"\\\\x00ff"` (the hex text output) |
| anything else (text, varchar, char, uuid, time, interval, money, bit, enum, domain, ...) | JSON string of the text output |
| SQL NULL | `null` |

wal2json 2.5 renders numeric and float NaN/Infinity as `null`, like SQL NULL; the change path
keeps that `null`, and the publisher re-reads such columns (see `ssmd.core.wal2json`).

A domain is encoded by its own name, so a domain over numeric becomes a JSON string: wal2json
2.5 prints domain values as quoted text, and `format_type` names the domain, not its base type.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from ssmd.core.errors import DecodeError
import orjson

from ssmd.core.jsontext import JsonNumber, JsonValue, dumps, loads
from ssmd.core.pgarray import parse_array

TextConverter = Callable[[str], JsonValue]
ChangeConverter = Callable[[Any], JsonValue]

_INTEGER_TYPES = frozenset({"smallint", "integer", "bigint", "oid"})
_FLOAT_TYPES = frozenset({"numeric", "real", "double precision"})
_SPECIAL_NUMBERS = frozenset({"NaN", "Infinity", "-Infinity"})
_INFINITIES = frozenset({"infinity", "-infinity"})

_TYPMOD = re.compile(r"\([0-9, ]*\)")
_TIMESTAMPTZ = re.compile(r"(\d{4,}-\d\d-\d\d) (\d\d:\d\d:\d\d(?:\.\d+)?)([+-]\d\d)(:\d\d)?(:\d\d)?( BC)?")
_TIMESTAMP = re.compile(r"(\d{4,}-\d\d-\d\d) (\d\d:\d\d:\d\d(?:\.\d+)?)( BC)?")
_DATE = re.compile(r"\d{4,}-\d\d-\d\d(?: BC)?")


def base_type(type_name: str) -> str:
    """Return the type name without its type modifier: `character varying(20)[]` -> `character varying[]`."""
    return " ".join(_TYPMOD.sub("", type_name).split())


def is_array_type(type_name: str) -> bool:
    """Tell whether `format_type` names an array type."""
    return type_name.endswith("[]")


@lru_cache(maxsize=1024)
def is_float_like(type_name: str) -> bool:
    """Tell whether wal2json renders NaN and Infinity of this type as `null` (numeric, real, double)."""
    return base_type(type_name) in _FLOAT_TYPES


# --- warm path: PostgreSQL text output -----------------------------------------------------


def _integer_from_text(text: str) -> JsonValue:
    return JsonNumber(text)


def _number_from_text(text: str) -> JsonValue:
    if text in _SPECIAL_NUMBERS:
        return str(text)
    return JsonNumber(text)


def _bool_from_text(text: str) -> JsonValue:
    if text == "t":
        return True
    if text == "f":
        return False
    raise DecodeError(f"invalid boolean text {text!r}: expected 't' or 'f'")


def _json_from_text(text: str) -> JsonValue:
    try:
        return loads(text)
    except ValueError as exc:
        raise DecodeError(f"invalid json value {text[:100]!r}: {exc}") from None


# NOTE: a BC date keeps PostgreSQL's " BC" suffix, so it is not valid ISO 8601.
def _timestamptz_from_text(text: str) -> JsonValue:
    match = _TIMESTAMPTZ.fullmatch(text)
    if match is None:
        return _infinity_or_fail(text, "timestamp with time zone")
    day, clock, hours, minutes, seconds, era = match.groups()
    if hours != "+00" or minutes not in (None, ":00") or seconds not in (None, ":00"):
        # Another offset spells the same instant differently, so the two paths would disagree.
        raise DecodeError(f"invalid timestamp with time zone text {text!r}: expected UTC; pin the session to TimeZone=UTC")
    return f"{day}T{clock}+00:00{era or ''}"


def _timestamp_from_text(text: str) -> JsonValue:
    match = _TIMESTAMP.fullmatch(text)
    if match is None:
        return _infinity_or_fail(text, "timestamp without time zone")
    day, clock, era = match.groups()
    return f"{day}T{clock}{era or ''}"


def _date_from_text(text: str) -> JsonValue:
    if _DATE.fullmatch(text) is None:
        return _infinity_or_fail(text, "date")
    return str(text)


def _infinity_or_fail(text: str, type_name: str) -> str:
    if text in _INFINITIES:
        return str(text)
    raise DecodeError(f"invalid {type_name} text {text!r}: expected ISO output; pin the session to DateStyle=ISO and TimeZone=UTC")


def _bytea_from_text(text: str) -> JsonValue:
    if not text.startswith("\\x"):
        raise DecodeError(f"invalid bytea text {text[:40]!r}: expected hex output; pin the session to bytea_output=hex")
    return str(text)


def string_from_text(text: str) -> JsonValue:
    """Return the canonical value of a type whose text output is the value (text, uuid, ...)."""
    return str(text)


def _array_converter(element_converter: TextConverter, delimiter: str) -> TextConverter:
    def convert_elements(elements: list[Any]) -> list[JsonValue]:
        converted: list[JsonValue] = []
        for element in elements:
            if isinstance(element, list):
                converted.append(convert_elements(element))
            elif element is None:
                converted.append(None)
            else:
                converted.append(element_converter(element))
        return converted

    def convert(text: str) -> JsonValue:
        return convert_elements(parse_array(text, delimiter))

    return convert


@lru_cache(maxsize=1024)
def text_converter(type_name: str) -> TextConverter:
    """Return the function that maps a non-NULL text output of `type_name` to its canonical value."""
    name = base_type(type_name)
    if is_array_type(name):
        element_type = name[:-2]
        delimiter = ";" if element_type == "box" else ","
        return _array_converter(text_converter(element_type), delimiter)
    if name in _INTEGER_TYPES:
        return _integer_from_text
    if name in _FLOAT_TYPES:
        return _number_from_text
    return _TEXT_CONVERTERS.get(name, string_from_text)


_TEXT_CONVERTERS: dict[str, TextConverter] = {
    "boolean": _bool_from_text,
    "json": _json_from_text,
    "jsonb": _json_from_text,
    "timestamp with time zone": _timestamptz_from_text,
    "timestamp without time zone": _timestamp_from_text,
    "date": _date_from_text,
    "bytea": _bytea_from_text,
}


def value_from_text(type_name: str, text: str | None) -> JsonValue:
    """Map one column's text output (None for SQL NULL) to its canonical value."""
    if text is None:
        return None
    return text_converter(type_name)(text)


# --- change path: wal2json format-version 2 values -----------------------------------------


def _wal2json_number(value: Any) -> JsonValue:
    if isinstance(value, JsonNumber):
        return value
    if isinstance(value, str):
        return _number_from_text(value)
    raise DecodeError(f"invalid wal2json number {value!r}")


def _wal2json_bool(value: Any) -> JsonValue:
    if isinstance(value, bool):
        return value
    raise DecodeError(f"invalid wal2json boolean {value!r}")


def _wal2json_bytea(value: Any) -> JsonValue:
    # wal2json 2.5 prints bytea as bare hex digits, without the `\x` that the text output has.
    if not isinstance(value, str):
        raise DecodeError(f"invalid wal2json bytea {value!r}")
    if value.startswith("\\x"):
        return str(value)
    return "\\x" + value


def _wal2json_text(converter: TextConverter) -> ChangeConverter:
    # wal2json 2.5 picks the JSON form by type oid. Only the built-in integer, float and numeric
    # types become JSON numbers and boolean becomes true/false, so a domain over them is a
    # string. Every other value is a JSON string of the type's text output.
    def convert(value: Any) -> JsonValue:
        if not isinstance(value, str) or isinstance(value, JsonNumber):
            raise DecodeError(f"invalid wal2json value {value!r}: expected a string")
        return converter(value)

    return convert


@lru_cache(maxsize=1024)
def change_converter(type_name: str) -> ChangeConverter:
    """Return the function that maps a non-null wal2json value of `type_name` to its canonical value."""
    name = base_type(type_name)
    if is_array_type(name):
        return _wal2json_text(text_converter(name))
    if name in _INTEGER_TYPES or name in _FLOAT_TYPES:
        return _wal2json_number
    if name == "boolean":
        return _wal2json_bool
    if name == "bytea":
        return _wal2json_bytea
    return _wal2json_text(text_converter(name))


def value_from_change(type_name: str, value: Any) -> JsonValue:
    """Map one wal2json column value (None for null) to its canonical value."""
    if value is None:
        return None
    return change_converter(type_name)(value)


# --- rows ----------------------------------------------------------------------------------


def encode_row(row: dict[str, JsonValue]) -> bytes:
    """Serialise a canonical row: sorted keys, no spaces, numbers exactly as their text."""
    return dumps(row)


class TextRowEncoder:
    """Per-table encoder for the warm path, with the converters looked up once.

    Warm encodes every row of every followed table. Text-like columns pass through unchanged,
    so the per-row work is one converter call per other non-NULL column and one `orjson`
    serialisation. `encode` hands numbers to orjson as `orjson.Fragment`, which writes the
    same bytes as `dumps` writes for a `JsonNumber`.
    """

    __slots__ = ("names", "_converted", "_encoded")

    def __init__(self, columns: Sequence[tuple[str, str]]) -> None:
        self.names = tuple(name for name, _ in columns)
        self._converted = tuple(
            (index, name, text_converter(type_name))
            for index, (name, type_name) in enumerate(columns)
            if text_converter(type_name) is not string_from_text
        )
        self._encoded = tuple(
            (index, name, _FRAGMENT_CONVERTERS.get(convert, convert)) for index, name, convert in self._converted
        )

    def row(self, values: Sequence[str | None]) -> dict[str, JsonValue]:
        """Return the canonical row for one tuple of text outputs, in column order."""
        return self._convert(values, self._converted)

    def encode(self, values: Sequence[str | None]) -> bytes:
        """Return the canonical JSON bytes for one tuple of text outputs."""
        return dumps(self._convert(values, self._encoded))

    def _convert(self, values: Sequence[str | None], converters: tuple[tuple[int, str, Callable[[str], Any]], ...]) -> dict[str, Any]:
        if len(values) != len(self.names):
            raise DecodeError(f"row has {len(values)} values, expected {len(self.names)} ({', '.join(self.names)})")
        row: dict[str, Any] = dict(zip(self.names, values))
        for index, name, convert in converters:
            text = values[index]
            if text is not None:
                row[name] = convert(text)
        return row


def _integer_fragment(text: str) -> Any:
    return orjson.Fragment(text)


def _number_fragment(text: str) -> Any:
    if text in _SPECIAL_NUMBERS:
        return str(text)
    return orjson.Fragment(text)


_FRAGMENT_CONVERTERS: dict[Callable[[str], JsonValue], Callable[[str], Any]] = {
    _integer_from_text: _integer_fragment,
    _number_from_text: _number_fragment,
}
