"""Stream messages: a `Change` as subject, JSON body and JetStream message id, and back.

Subject `cdc.<table>.<op>`, where `<table>` is the table name for schema `public` and
`<schema>_<table>` otherwise. The body is canonical JSON (sorted keys, exact numbers). Its
fields are `lsn` (commit LSN), `seq` (index in the transaction), `xid`, `schema`, `table`,
`op`, `key`, `old_key` (only when an update changed the key), `data` (absent for delete and
truncate), `unchanged` (absent when empty) and `commit_time` (absent when wal2json gave none).
The `Nats-Msg-Id` header is `<commit LSN>:<index>`, so a retried publish is deduplicated.

Control messages use `cdc._ssmd.<event>`; `cdc._ssmd.slot_created` says the publisher created
its slot at a consistent point, so changes before it may never reach the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NoReturn

from ssmd.core.changes import Change, Op, Row
from ssmd.core.errors import DecodeError
from ssmd.core.jsontext import JsonNumber, dumps, loads
from ssmd.core.lsn import Lsn
from ssmd.core.position import MAX_INDEX, Position

SUBJECT_PREFIX = "cdc"
CONTROL_PREFIX = "cdc._ssmd"
SLOT_CREATED_SUBJECT = f"{CONTROL_PREFIX}.slot_created"
MSG_ID_HEADER = "Nats-Msg-Id"

_FORBIDDEN_IN_TOKEN = set(".*> \t\r\n")


@dataclass(frozen=True, slots=True)
class Message:
    """One stream message: subject, body bytes and the `Nats-Msg-Id` header value."""

    subject: str
    body: bytes
    msg_id: str


@dataclass(frozen=True, slots=True)
class SlotCreated:
    """Body of `cdc._ssmd.slot_created`."""

    slot: str
    consistent_point: Lsn


@lru_cache(maxsize=4096)
def subject_table(schema: str, table: str) -> str:
    """Return the table token of a subject; raise DecodeError when a NATS subject cannot carry it."""
    token = table if schema == "public" else f"{schema}_{table}"
    if not token or _FORBIDDEN_IN_TOKEN & set(token):
        raise DecodeError(
            f"table name {schema}.{table} cannot be a NATS subject token: it contains '.', '*', '>' or whitespace",
            table=f"{schema}.{table}",
        )
    return token


def subject_for(change: Change) -> str:
    """Return `cdc.<table>.<op>` for a change."""
    return f"{SUBJECT_PREFIX}.{subject_table(change.schema, change.table)}.{change.op.value}"


class _LsnText:
    """The text of the last commit LSN formatted: every change of a transaction shares it.

    The pair is replaced as one tuple, so a reader in another thread never sees an LSN with
    the text of another.
    """

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: tuple[Lsn | None, str] = (None, "")

    def format(self, lsn: Lsn) -> str:
        last = self.last
        if last[0] is lsn:
            return last[1]
        text = str(lsn)
        self.last = (lsn, text)
        return text


_commit_lsn_text = _LsnText()


def encode_change(change: Change) -> Message:
    """Return the stream message of a change."""
    position = change.position
    lsn = _commit_lsn_text.format(position.commit_lsn)
    body: dict[str, Any] = {
        "lsn": lsn,
        "seq": position.index,
        "xid": change.xid,
        "schema": change.schema,
        "table": change.table,
        "op": change.op.value,
        "key": change.key,
    }
    if change.old_key is not None:
        body["old_key"] = change.old_key
    if change.data is not None:
        body["data"] = change.data
    if change.unchanged:
        body["unchanged"] = list(change.unchanged)
    if change.commit_time is not None:
        body["commit_time"] = change.commit_time
    # The same text as `Position.message_id()`, without formatting the LSN again.
    return Message(subject_for(change), dumps(body), f"{lsn}:{position.index}")


def decode_change(subject: str, body: bytes) -> Change:
    """Parse a stream message back into a `Change`; raise DecodeError naming the subject and field."""
    try:
        fields = loads(body)
    except ValueError as exc:
        raise DecodeError(f"invalid JSON body on subject {subject}: {exc}") from None
    if not isinstance(fields, dict):
        raise DecodeError(f"invalid body on subject {subject}: expected a JSON object")
    change = _usual_change(subject, fields)
    return change if change is not None else _checked_change(subject, fields)


_OPS = {op.value: op for op in Op}
_MAX_XID = (1 << 64) - 1


def _usual_change(subject: str, fields: dict[str, Any]) -> Change | None:
    """Return the change of a body whose every field has its usual form, else None.

    The cache decodes every message, and `_checked_change` pays for its precise errors on
    every field. This accepts exactly what `_checked_change` accepts, with plain type checks,
    and leaves anything unusual, valid or not, to it.
    """
    get = fields.get
    lsn_text, schema, table, op_text, seq, xid, key = get("lsn"), get("schema"), get("table"), get("op"), get("seq"), get("xid"), get("key")
    if type(lsn_text) is not str or type(schema) is not str or type(table) is not str or type(op_text) is not str or type(key) is not dict:
        return None
    op = _OPS.get(op_text)
    if op is None or type(seq) is not JsonNumber or type(xid) is not JsonNumber or not seq.isdigit() or not xid.isdigit():
        return None
    index, xid_value = int(seq), int(xid)
    old_key, data, unchanged, commit_time = get("old_key"), get("data"), get("unchanged", ()), get("commit_time")
    if index > MAX_INDEX or xid_value > _MAX_XID or (data is None) != (op is Op.DELETE or op is Op.TRUNCATE):
        return None
    if ("old_key" in fields and type(old_key) is not dict) or ("data" in fields and type(data) is not dict):
        return None
    if ("commit_time" in fields and type(commit_time) is not str) or ("unchanged" in fields and not _plain_names(unchanged)):
        return None
    try:
        lsn = Lsn.parse(lsn_text)
        if subject != f"{SUBJECT_PREFIX}.{subject_table(schema, table)}.{op_text}":
            return None
    except DecodeError:
        return None
    return Change(op, schema, table, Position(lsn, index), xid_value, key, old_key, data, tuple(unchanged), commit_time)


def _plain_names(value: Any) -> bool:
    return type(value) is list and all(type(item) is str for item in value)


def _checked_change(subject: str, fields: dict[str, Any]) -> Change:
    """Return the change of a body, checking every field and naming the first invalid one."""
    reader = _FieldReader(subject, fields)

    lsn = reader.lsn("lsn")
    schema_name, table_name = reader.text("schema"), reader.text("table")
    table = f"{schema_name}.{table_name}"
    try:
        op = Op(reader.text("op"))
    except ValueError:
        raise DecodeError(f"invalid field 'op' on subject {subject}: {fields.get('op')!r}", lsn=str(lsn), table=table) from None
    change = Change(
        op=op,
        schema=schema_name,
        table=table_name,
        position=Position(lsn, reader.integer("seq", MAX_INDEX)),
        xid=reader.integer("xid", (1 << 64) - 1),
        key=reader.row("key"),
        old_key=reader.row("old_key") if "old_key" in fields else None,
        data=reader.row("data") if "data" in fields else None,
        unchanged=reader.names("unchanged") if "unchanged" in fields else (),
        commit_time=reader.text("commit_time") if "commit_time" in fields else None,
    )

    expected = subject_for(change)
    if subject != expected:
        raise DecodeError(f"subject {subject} does not match the body, which belongs on {expected}", lsn=str(lsn), table=table)
    if (change.data is None) != (op in (Op.DELETE, Op.TRUNCATE)):
        raise DecodeError(f"field 'data' on subject {subject} must be present exactly for insert and update", lsn=str(lsn), table=table)
    return change


def encode_slot_created(slot: str, consistent_point: Lsn) -> Message:
    """Return the control message announcing a new slot; its id makes a repeat a duplicate."""
    body = dumps({"slot": slot, "consistent_point": str(consistent_point)})
    return Message(SLOT_CREATED_SUBJECT, body, f"slot_created:{slot}:{consistent_point}")


def decode_slot_created(body: bytes) -> SlotCreated:
    """Parse the body of `cdc._ssmd.slot_created`."""
    try:
        fields = loads(body)
    except ValueError as exc:
        raise DecodeError(f"invalid JSON body on subject {SLOT_CREATED_SUBJECT}: {exc}") from None
    if not isinstance(fields, dict):
        raise DecodeError(f"invalid body on subject {SLOT_CREATED_SUBJECT}: expected a JSON object")
    reader = _FieldReader(SLOT_CREATED_SUBJECT, fields)
    return SlotCreated(reader.text("slot"), reader.lsn("consistent_point"))


class _FieldReader:
    def __init__(self, subject: str, fields: dict[str, Any]) -> None:
        self.subject = subject
        self.fields = fields

    def text(self, name: str) -> str:
        value = self.fields.get(name)
        if not isinstance(value, str) or isinstance(value, JsonNumber):
            self._fail(name, "expected a string")
        return str(value)

    def integer(self, name: str, maximum: int) -> int:
        value = self.fields.get(name)
        if not isinstance(value, JsonNumber) or not value.isdigit() or int(value) > maximum:
            self._fail(name, f"expected an integer 0..{maximum}")
        return int(value)

    def lsn(self, name: str) -> Lsn:
        text = self.text(name)
        try:
            return Lsn.parse(text)
        except DecodeError:
            self._fail(name, "expected an LSN like '16/B374D848'")

    def row(self, name: str) -> Row:
        value = self.fields.get(name)
        if not isinstance(value, dict):
            self._fail(name, "expected an object")
        return value

    def names(self, name: str) -> tuple[str, ...]:
        value = self.fields.get(name)
        if not isinstance(value, list) or not all(isinstance(item, str) and not isinstance(item, JsonNumber) for item in value):
            self._fail(name, "expected a list of column names")
        return tuple(value)

    def _fail(self, name: str, expectation: str) -> NoReturn:
        value = self.fields.get(name, "<missing>")
        raise DecodeError(f"invalid field {name!r} on subject {self.subject}: {expectation}, got {str(value)[:100]!r}")
