"""What ssmd knows about a followed table: its columns, their types and its key."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ColumnInfo:
    """One column; `type_name` is spelled as `format_type()` and wal2json's include-types give it."""

    name: str
    type_name: str


@dataclass(frozen=True, slots=True)
class TableInfo:
    """A followed table.

    `key_columns` are the primary-key columns in index order, or the replica identity index
    columns when the table has no primary key. `replica_identity` is PostgreSQL's
    `relreplident` code: `d` default, `f` full, `i` index, `n` nothing.
    """

    schema: str
    name: str
    columns: tuple[ColumnInfo, ...]
    key_columns: tuple[str, ...]
    replica_identity: str = "d"

    @property
    def qualified_name(self) -> str:
        return f"{self.schema}.{self.name}"

    def column_names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    def type_of(self, column: str) -> str:
        for candidate in self.columns:
            if candidate.name == column:
                return candidate.type_name
        raise KeyError(column)


_COLUMN_SETS: dict[int, tuple[TableInfo, frozenset[str]]] = {}


def column_name_set(info: TableInfo) -> frozenset[str]:
    """Return the column names of a table, remembered by identity (TableInfo hashes slowly)."""
    entry = _COLUMN_SETS.get(id(info))
    if entry is None or entry[0] is not info:
        if len(_COLUMN_SETS) >= 4096:
            _COLUMN_SETS.clear()
        entry = (info, frozenset(column.name for column in info.columns))
        _COLUMN_SETS[id(info)] = entry
    return entry[1]
