"""A huge transaction through `ssmd cdc`: one message per change, bounded memory, no early confirm.

The default run updates 50,000 rows in one transaction; SSMD_LONG=1 runs the 200,000-row case.
"""

from __future__ import annotations

import asyncio
import os
import time

import nats

from ssmd.core.lsn import Lsn
from tests.integration.cdc_support import (
    MARKETS_SCHEMA, CdcProcess, changes, current_wal_lsn, read_stream, run_sql, slot_state, stream_count,
    wait_announced, wait_streaming,
)

ROWS = 200_000 if os.environ.get("SSMD_LONG") == "1" else 50_000
# Peak resident memory the daemon may reach. Holding the whole transaction would take far more,
# because each message is ~300 bytes of body plus its Python objects and publish future.
MAX_PEAK_RSS_MIB = 200


async def _max_payload(url: str) -> int:
    client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        return client.max_payload
    finally:
        await client.close()


def test_huge_transaction(ssmd_env, tmp_path):
    url = ssmd_env["DATABASE_URL"]
    run_sql(url, MARKETS_SCHEMA,
            f"INSERT INTO markets SELECT 'M' || i, 'EV-' || (i % 100), 'open', i * 0.01, i, NULL FROM generate_series(1, {ROWS}) i")
    process = CdcProcess(ssmd_env, tmp_path / "cdc.log")
    wait_streaming(url, ssmd_env["REPLICATION_SLOT"], process)
    wait_announced(ssmd_env, process)
    announced = stream_count(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"])  # the slot_created message

    before = current_wal_lsn(url)
    run_sql(url, "UPDATE markets SET status = 'halted'")
    committed = time.monotonic()

    # Sample the slot, then the stream. Keepalives may move the slot while the UPDATE still runs
    # (its commit lies ahead), but once the slot passes the commit LSN the whole transaction must
    # already be stored.
    samples: list[tuple[Lsn, int]] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        confirmed, _ = slot_state(url, ssmd_env["REPLICATION_SLOT"])
        stored = stream_count(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"]) - announced
        samples.append((confirmed, stored))
        if stored >= ROWS:
            break
        assert process.process.poll() is None, process.log_text()[-3000:]
        time.sleep(0.05)
    elapsed = time.monotonic() - committed
    peak_kib = process.peak_rss_kib()
    assert process.terminate() == 0, process.log_text()[-3000:]

    rate = ROWS / elapsed
    print(f"\n{ROWS} changes in {elapsed:.1f} s from commit to last PubAck: {rate:,.0f} changes/s; daemon peak RSS {peak_kib / 1024:.0f} MiB")
    assert peak_kib is not None and peak_kib / 1024 < MAX_PEAK_RSS_MIB

    messages = changes(read_stream(ssmd_env["NATS_URL"], ssmd_env["NATS_STREAM"]))
    max_payload = asyncio.run(_max_payload(ssmd_env["NATS_URL"]))
    assert len(messages) == ROWS
    assert len({message.msg_id for message in messages}) == ROWS
    assert max(len(message.data) for message in messages) < max_payload
    assert {message.body["data"]["status"] for message in messages} == {"halted"}
    assert len({message.body["key"]["ticker"] for message in messages}) == ROWS
    assert len({message.body["lsn"] for message in messages}) == 1
    commit_lsn = Lsn.parse(messages[0].body["lsn"])
    assert commit_lsn > before
    early = [(str(confirmed), stored) for confirmed, stored in samples if confirmed > commit_lsn and stored < ROWS]
    assert early == []
    assert any(stored < ROWS for _, stored in samples), "the sampling never saw the transaction in progress"
    assert slot_state(url, ssmd_env["REPLICATION_SLOT"])[0] > commit_lsn
