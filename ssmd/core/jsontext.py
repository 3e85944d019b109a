"""JSON text with exact numbers.

PostgreSQL numerics can carry more digits than a double, and trailing zeros are part of the
value (`0.0700`). `JsonNumber` keeps a number's exact text through parsing and serialising, so
no value ever passes through float.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


class JsonNumber(str):
    """The exact text of a JSON number, serialised bare (without quotes)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"JsonNumber({str(self)!r})"


JsonValue = None | bool | str | JsonNumber | list["JsonValue"] | dict[str, "JsonValue"]

_DUMP_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_SUBCLASS


def _serialise_number(value: Any) -> Any:
    if isinstance(value, JsonNumber):
        return orjson.Fragment(str(value))
    if isinstance(value, str):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} as canonical JSON")


def dumps(value: JsonValue) -> bytes:
    """Serialise with sorted keys, no spaces and numbers kept exactly as their text."""
    return orjson.dumps(value, default=_serialise_number, option=_DUMP_OPTIONS)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}: JSON has no NaN or Infinity literals")


# `json.loads` with hooks builds a new decoder and scanner on every call.
_DECODER = json.JSONDecoder(parse_float=JsonNumber, parse_int=JsonNumber, parse_constant=_reject_constant)


def loads(text: bytes | str) -> Any:
    """Parse JSON keeping every number as `JsonNumber`; bytes must be UTF-8."""
    if not isinstance(text, str):
        # UnicodeDecodeError is a ValueError, like the parser's own errors.
        text = bytes(text).decode()
    return _DECODER.decode(text)
