"""Key text and Redis key names of cached rows, and the key writes a change causes.

A row's key text is its key columns' canonical values as text, in key order, joined with `:`.
Each part escapes `%`, `:`, `{` and `}` as `%25`, `%3A`, `%7B`, `%7D`, so a part never contains
the separator and the value key `secmaster:<ns>:<key>` contains no `{`. Its version key
`{secmaster:<ns>:<key>}:v` then has the whole value key as its hash tag, and Redis Cluster puts
both keys in the same slot.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ssmd.core.changes import Change, Op, Row
from ssmd.core.errors import DecodeError
from ssmd.core.jsontext import JsonValue, dumps
from ssmd.core.position import Position

KEY_SEPARATOR = ":"
DEFAULT_PREFIX = "secmaster"
DEFAULT_NAMESPACES: Mapping[str, str] = {"markets": "market", "events": "event", "series_fees": "fee"}

_T = TypeVar("_T")
_ESCAPES = {"%": "%25", ":": "%3A", "{": "%7B", "}": "%7D"}
_UNESCAPES = {code: char for char, code in _ESCAPES.items()}


_ESCAPE_TABLE = str.maketrans(_ESCAPES)


def escape_part(text: str) -> str:
    """Escape `%`, `:`, `{` and `}` in one key part."""
    return text.translate(_ESCAPE_TABLE)


def unescape_part(text: str) -> str:
    """Undo `escape_part`; raise DecodeError on an escape it never writes."""
    if "%" not in text:
        return text
    parts = text.split("%")
    chars = [parts[0]]
    for piece in parts[1:]:
        code = "%" + piece[:2].upper()
        if code not in _UNESCAPES:
            raise DecodeError(f"invalid escape {code!r} in key part {text!r}: expected %25, %3A, %7B or %7D")
        chars.append(_UNESCAPES[code] + piece[2:])
    return "".join(chars)


def part_text(value: JsonValue) -> str:
    """Return a canonical key value as text: strings as is, numbers as their digits, true/false."""
    if value is None:
        raise DecodeError("key column is null: a key column must have a value")
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return str(value)
    # A key of array or json type: its canonical JSON text.
    return dumps(value).decode()


def key_text(values: Sequence[JsonValue]) -> str:
    """Return the key text of canonical key values given in key-column order."""
    if not values:
        raise DecodeError("empty key: a followed table needs key columns")
    return KEY_SEPARATOR.join(escape_part(part_text(value)) for value in values)


def row_key_text(key: Row, key_columns: Sequence[str] | None = None) -> str:
    """Return the key text of a key object, in `key_columns` order when given, else in entry order.

    Stream message bodies sort object keys, so a consumer must pass the table's key columns for a
    composite key whose column order is not alphabetical.
    """
    if key_columns is None:
        return key_text(list(key.values()))
    if set(key_columns) != set(key):
        raise DecodeError(f"key has columns {sorted(key)}, expected {list(key_columns)}")
    return key_text([key[name] for name in key_columns])


def parse_key_text(text: str) -> list[str]:
    """Split key text back into its parts' text (types are not recorded, so numbers come back as text)."""
    return [unescape_part(part) for part in text.split(KEY_SEPARATOR)]


def default_namespace(schema: str, table: str) -> str:
    """Return the namespace of a table: market, event, fee for the secmaster tables, else the table name."""
    if schema != "public":
        return f"{schema}_{table}"
    return DEFAULT_NAMESPACES.get(table, table)


@dataclass(frozen=True, slots=True)
class KeySpace:
    """Redis key names under one prefix, with per-table namespace overrides.

    `namespaces` and `key_columns` are keyed by `schema.table`, or by the bare table name for a
    table in `public`. `key_columns` fixes the order of composite key parts.
    """

    prefix: str = DEFAULT_PREFIX
    namespaces: Mapping[str, str] = field(default_factory=dict)
    key_columns: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # (schema, table) -> (value key prefix `<prefix>:<ns>:`, key columns or None), filled on use.
    _tables: dict[tuple[str, str], tuple[str, tuple[str, ...] | None]] = field(default_factory=dict, compare=False, repr=False)

    def namespace(self, schema: str, table: str) -> str:
        """Return the namespace of a table, overridden or default."""
        override = _lookup(self.namespaces, schema, table)
        return override if override is not None else default_namespace(schema, table)

    def row_value_key(self, schema: str, table: str, key: Row) -> str:
        """Return the value key of a row of a table from its key object."""
        entry = self._tables.get((schema, table))
        if entry is None:
            entry = (self.value_key(self.namespace(schema, table), ""), _lookup(self.key_columns, schema, table))
            self._tables[(schema, table)] = entry
        key_prefix, key_columns = entry
        return key_prefix + row_key_text(key, key_columns)

    def value_key(self, namespace: str, key: str) -> str:
        """Return `<prefix>:<ns>:<key>`, the key readers GET."""
        return f"{self.prefix}:{namespace}:{key}"

    def version_key(self, namespace: str, key: str) -> str:
        """Return `{<prefix>:<ns>:<key>}:v`, in the same cluster slot as the value key."""
        return "{" + self.value_key(namespace, key) + "}:v"

    def version_key_of(self, value_key: str) -> str:
        """Return the version key beside a value key."""
        return "{" + value_key + "}:v"

    def namespace_pattern(self, namespace: str) -> str:
        """Return the SCAN pattern matching every value key of a namespace."""
        return f"{self.prefix}:{namespace}:*"

    def parse_value_key(self, redis_key: str) -> tuple[str, list[str]]:
        """Split a value key or version key into its namespace and key parts."""
        if redis_key.startswith("{") and redis_key.endswith("}:v"):
            redis_key = redis_key[1:-3]
        head = f"{self.prefix}:"
        if not redis_key.startswith(head):
            raise DecodeError(f"invalid cache key {redis_key!r}: expected prefix {head!r}")
        namespace, sep, key = redis_key[len(head) :].partition(KEY_SEPARATOR)
        if not sep or not namespace or not key:
            raise DecodeError(f"invalid cache key {redis_key!r}: expected {head}<namespace>:<key>")
        return namespace, parse_key_text(key)


def _lookup(mapping: Mapping[str, _T], schema: str, table: str) -> _T | None:
    if f"{schema}.{table}" in mapping:
        return mapping[f"{schema}.{table}"]
    if schema == "public" and table in mapping:
        return mapping[table]
    return None


@dataclass(frozen=True, slots=True)
class KeyWrite:
    """Store `row` under `value_key` if `position` is newer than the stored version.

    `unchanged` names columns missing from `row` whose cached values the cache keeps.
    """

    namespace: str
    value_key: str
    row: Row
    position: Position
    unchanged: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyDelete:
    """Remove `value_key` and leave a tombstone at `position`, if `position` is newer."""

    namespace: str
    value_key: str
    position: Position


@dataclass(frozen=True, slots=True)
class NamespaceTruncate:
    """Remove every key of `namespace` older than `position` and raise its floor to `position`."""

    namespace: str
    position: Position


CacheAction = KeyWrite | KeyDelete | NamespaceTruncate


def cache_actions(change: Change, keyspace: KeySpace) -> list[CacheAction]:
    """Return the cache operations a change causes, in the order to apply them.

    An update that changed the key deletes the old key and writes the new one, both at the
    change's position; the delete leaves a tombstone, so a late older write of the old key
    cannot bring it back.
    """
    namespace = keyspace.namespace(change.schema, change.table)
    if change.op is Op.TRUNCATE:
        return [NamespaceTruncate(namespace, change.position)]

    value_key = keyspace.row_value_key(change.schema, change.table, change.key)
    if change.op is Op.DELETE:
        return [KeyDelete(namespace, value_key, change.position)]

    if change.data is None:
        raise DecodeError(f"{change.op.value} change at {change.position} has no data", table=f"{change.schema}.{change.table}")
    actions: list[CacheAction] = []
    if change.old_key is not None:
        old_value_key = keyspace.row_value_key(change.schema, change.table, change.old_key)
        if old_value_key != value_key:
            actions.append(KeyDelete(namespace, old_value_key, change.position))
    actions.append(KeyWrite(namespace, value_key, change.data, change.position, change.unchanged))
    return actions
