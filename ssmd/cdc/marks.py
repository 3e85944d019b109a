"""`cdc._ssmd.mark`: ssmd's own logical messages, forwarded so a reader can wait for a point.

`ssmd verify` writes `pg_logical_emit_message(true, 'ssmd', token)` and waits until the cache
has applied the mark; the publisher's heartbeat uses the same prefix. The body's `lsn` is the
commit LSN of the transaction that carried a transactional message (the position the cache
compares with), or the message's own LSN for a non-transactional one.
"""

from __future__ import annotations

from ssmd.core.changes import LogicalMessage
from ssmd.core.envelope import CONTROL_PREFIX, Message
from ssmd.core.errors import DecodeError
from ssmd.core.jsontext import dumps
from ssmd.core.lsn import Lsn

MARK_SUBJECT = f"{CONTROL_PREFIX}.mark"
SLOT_CREATED_CONTENT = "slot_created:"  # content prefix of the message that announces a new slot


def encode_mark(message: LogicalMessage, commit_lsn: Lsn | None) -> Message:
    """Return the stream message of a logical message; `commit_lsn` is None outside a transaction."""
    lsn = commit_lsn if message.transactional and commit_lsn is not None else message.lsn
    body = {
        "lsn": str(lsn),
        "message_lsn": str(message.lsn),
        "prefix": message.prefix,
        "content": message.content,
        "transactional": message.transactional,
    }
    # The message's own LSN makes the id unique when one transaction emits several marks.
    return Message(MARK_SUBJECT, dumps(body), f"mark:{lsn}:{message.lsn}")


def slot_created_content(slot: str, consistent_point: Lsn) -> str:
    """Return the logical message content that announces `slot`, created at `consistent_point`.

    The slot name is part of it because every logical slot of the database decodes the message,
    and only the daemon of the named slot may announce it.
    """
    return f"{SLOT_CREATED_CONTENT}{slot}:{consistent_point}"


def parse_slot_created(content: str) -> tuple[str, Lsn] | None:
    """Return (slot, consistent point) of an announcement's content, or None for any other content."""
    if not content.startswith(SLOT_CREATED_CONTENT):
        return None
    slot, separator, point = content[len(SLOT_CREATED_CONTENT):].rpartition(":")
    if not separator or not slot:
        raise DecodeError(f"invalid slot announcement {content!r}: expected 'slot_created:<slot>:<X/Y>'")
    return slot, Lsn.parse(point)
