"""Baseline publisher: the first plan's approach, one awaited JetStream publish per message.

It decodes each wal2json row with the same decoder and envelope as ssmd cdc and publishes every
change with `await js.publish(...)`, waiting for each PubAck before sending the next message.
It only exists to show what awaiting every acknowledgement costs, so it is not safe: it
confirms nothing back to PostgreSQL and re-reads no TOAST or NaN columns.

The rows come from pg_recvlogical streaming the baseline's own slot to a pipe. Reading with
`pg_logical_slot_get_changes` in batches, as the first plan did, would measure something else.
Every such call decodes again from the slot's restart_lsn, which moves only at the next
running-transactions record in the WAL. So a backlog of 200,000 transactions is decoded many
times over instead of once.
"""

from __future__ import annotations

import asyncio
import time

import nats

from ssmd.bench.ceilings import PG_RECVLOGICAL, recvlogical_options
from ssmd.bus.stream import StreamLimits, ensure_stream
from ssmd.core.envelope import MSG_ID_HEADER, encode_change
from ssmd.core.wal2json import DecodedChange, Wal2JsonDecoder, fill_columns

PIPE_LIMIT = 64 * 1024 * 1024


async def publish_awaited(dsn: str, slot: str, end_lsn: str, nats_url: str, stream: str, tables: list[str]) -> tuple[int, float]:
    """Publish every change in `slot` up to `end_lsn`; return (changes published, seconds)."""
    decoder = Wal2JsonDecoder()
    client = await nats.connect(nats_url, name="ssmd-bench-baseline")
    try:
        js = client.jetstream()
        await ensure_stream(js, stream, StreamLimits())
        command = [
            str(PG_RECVLOGICAL), "--dbname", dsn, "--slot", slot, "--start", "--endpos", end_lsn,
            "--file", "-", "--no-loop", *recvlogical_options(tables),
        ]
        started = time.perf_counter()
        reader = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, limit=PIPE_LIMIT)
        published = 0
        try:
            async for line in reader.stdout:
                record = decoder.decode_row(line)
                if not isinstance(record, DecodedChange):
                    continue
                message = encode_change(fill_columns(record, None))
                await js.publish(message.subject, message.body, stream=stream, headers={MSG_ID_HEADER: message.msg_id})
                published += 1
            errors = await reader.stderr.read()
            if await reader.wait() != 0:
                raise RuntimeError(f"pg_recvlogical exited with code {reader.returncode}: {errors.decode(errors='replace').strip()[-500:]}")
        finally:
            if reader.returncode is None:
                reader.kill()
                await reader.wait()
        elapsed = time.perf_counter() - started
    finally:
        await client.close()
    return published, elapsed
