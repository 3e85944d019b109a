"""Baseline publisher: the first plan's approach, one awaited JetStream publish per message.

It reads its own slot with `pg_logical_slot_get_changes` in batches, decodes each row with the
same decoder and envelope as ssmd cdc, and publishes every change with `await js.publish(...)`,
waiting for each PubAck before sending the next message. It only exists to show what awaiting
every acknowledgement costs. It is not safe: `get_changes` consumes the slot before anything is
published (the `consume-before-publish` strategy that ssmd avoids), and it re-reads no TOAST or
NaN columns.
"""

from __future__ import annotations

import time

import nats
import psycopg

from ssmd.bus.stream import StreamLimits, ensure_stream
from ssmd.core.envelope import MSG_ID_HEADER, encode_change
from ssmd.core.wal2json import WAL2JSON_OPTIONS, DecodedChange, Wal2JsonDecoder, fill_columns

BATCH_ROWS = 2000


def _get_changes_sql(tables: list[str]) -> tuple[str, list[str]]:
    options = dict(WAL2JSON_OPTIONS)
    options["add-tables"] = ",".join(table if "." in table else f"public.{table}" for table in tables)
    placeholders = ", ".join("%s" for _ in range(2 * len(options)))
    arguments = [item for pair in options.items() for item in pair]
    return f"SELECT data FROM pg_logical_slot_get_changes(%s, %s::pg_lsn, %s, {placeholders})", arguments


async def publish_awaited(dsn: str, slot: str, end_lsn: str, nats_url: str, stream: str, tables: list[str]) -> tuple[int, float]:
    """Publish every change in `slot` up to `end_lsn`; return (changes published, seconds)."""
    query, options = _get_changes_sql(tables)
    decoder = Wal2JsonDecoder()
    client = await nats.connect(nats_url, name="ssmd-bench-baseline")
    try:
        js = client.jetstream()
        await ensure_stream(js, stream, StreamLimits())
        published = 0
        started = time.perf_counter()
        with psycopg.connect(dsn, autocommit=True) as connection:
            while True:
                rows = connection.execute(query, [slot, end_lsn, BATCH_ROWS, *options]).fetchall()
                if not rows:
                    break
                for (data,) in rows:
                    record = decoder.decode_row(data)
                    if not isinstance(record, DecodedChange):
                        continue
                    message = encode_change(fill_columns(record, None))
                    await js.publish(message.subject, message.body, stream=stream, headers={MSG_ID_HEADER: message.msg_id})
                    published += 1
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
    return published, elapsed
