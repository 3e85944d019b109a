"""`ssmd status`: the replication slot, the stream, the consumer and the cache on one screen.

Each part is read on its own, so an unreachable server shows as an error in its part while the
others still print. The exit status is 0 when every part was read and found, 1 otherwise.
Connection URLs are printed only through `redact_url`, so no password is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import psycopg
from redis.exceptions import RedisError

from ssmd import config
from ssmd.bus.connect import NatsAuth, add_nats_auth_arguments, connect_nats, nats_auth_from_args
from ssmd.core.errors import SsmdError
from ssmd.core.keys import DEFAULT_PREFIX
from ssmd.logs import setup_logging
from ssmd.pg.connect import connect_async
from ssmd.store.cache_store import connect_redis

_SETTINGS = (
    config.DATABASE_URL, config.NATS_URL, config.REDIS_URL, config.REPLICATION_SLOT,
    config.NATS_STREAM, config.CONSUMER_NAME,
)
PART_TIMEOUT_S = 10.0

_SLOT_QUERY = """
SELECT slot_name, plugin, database, active, active_pid, confirmed_flush_lsn::text, restart_lsn::text,
       wal_status, pg_current_wal_lsn()::text,
       pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
       pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
FROM pg_replication_slots
WHERE slot_name = %s
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_settings(parser, *_SETTINGS)
    add_nats_auth_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
    # Closing the NATS client logs a disconnect warning, which is expected here.
    setup_logging("ERROR")
    status = asyncio.run(collect(args))
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_text(status))
    healthy = all("error" not in part and part.get("found", True) for part in status.values())
    return 0 if healthy else 1


async def collect(args: argparse.Namespace) -> dict[str, dict]:
    """Read the slot, the stream with its consumer, and the cache concurrently.

    A part that fails carries an `error` message instead of its fields.
    """
    auth = nats_auth_from_args(args)
    parts = {
        "slot": _guard(read_slot(config.require(args.database_url, config.DATABASE_URL), args.replication_slot)),
        "stream": _guard(read_stream_and_consumer(args.nats_url, auth, args.nats_stream, args.consumer_name)),
        "cache": _guard(read_cache(args.redis_url, time.time())),
    }
    results = dict(zip(parts, await asyncio.gather(*parts.values())))
    stream = results.pop("stream")
    consumer = stream.pop("consumer", None) if "error" not in stream else {"name": args.consumer_name, "error": stream["error"]}
    return {"slot": results["slot"], "stream": stream, "consumer": consumer, "cache": results["cache"]}


async def _guard(reading) -> dict:
    try:
        return await asyncio.wait_for(reading, PART_TIMEOUT_S)
    except TimeoutError:
        return {"error": f"timed out after {PART_TIMEOUT_S:.0f} s"}
    except (SsmdError, psycopg.Error, OSError) as exc:
        return {"error": str(exc).strip().splitlines()[0]}


async def read_slot(database_url: str, slot: str) -> dict:
    """Return the slot's confirmed LSN, retained WAL bytes and whether a walsender is using it."""
    async with await connect_async(database_url, application_name="ssmd-status") as connection:
        cursor = await connection.execute(_SLOT_QUERY, (slot,))
        row = await cursor.fetchone()
    if row is None:
        return {"name": slot, "found": False, "database": config.redact_url(database_url)}
    (name, plugin, database, active, active_pid, confirmed, restart, wal_status, current, retained, behind) = row
    return {
        "name": name, "found": True, "plugin": plugin, "database": database, "active": active,
        "active_pid": active_pid, "confirmed_flush_lsn": confirmed, "restart_lsn": restart,
        "wal_status": wal_status, "current_wal_lsn": current, "retained_wal_bytes": retained,
        "unconfirmed_wal_bytes": behind,
    }


async def read_stream_and_consumer(nats_url: str, auth: NatsAuth, stream: str, consumer: str) -> dict:
    """Return the stream's size and sequence range, with the durable consumer's progress inside."""
    from nats.js.errors import NotFoundError

    client = await connect_nats(nats_url, name="ssmd-status", auth=auth)
    try:
        jetstream = client.jetstream()
        try:
            info = await jetstream.stream_info(stream)
        except NotFoundError:
            return {"name": stream, "found": False, "consumer": {"name": consumer, "found": False}}
        state = info.state
        result = {
            "name": stream, "found": True, "messages": state.messages, "bytes": state.bytes,
            "first_seq": state.first_seq, "last_seq": state.last_seq, "consumers": state.consumer_count,
        }
        try:
            consumer_info = await jetstream.consumer_info(stream, consumer)
        except NotFoundError:
            result["consumer"] = {"name": consumer, "found": False}
            return result
        result["consumer"] = {
            "name": consumer, "found": True,
            "pending": consumer_info.num_pending,
            "ack_pending": consumer_info.num_ack_pending,
            "redelivered": consumer_info.num_redelivered,
            "ack_floor_stream_seq": consumer_info.ack_floor.stream_seq if consumer_info.ack_floor else None,
            "delivered_stream_seq": consumer_info.delivered.stream_seq if consumer_info.delivered else None,
        }
        return result
    finally:
        await client.close()


async def read_cache(redis_url: str, now: float) -> dict:
    """Return the cache's state from its meta hash, with the seconds since its last applied change."""
    client = connect_redis(redis_url, name="ssmd-status")
    try:
        raw = await client.hgetall(f"{DEFAULT_PREFIX}:meta")
    except RedisError as exc:
        return {"error": f"reading {DEFAULT_PREFIX}:meta from {config.redact_url(redis_url)} failed: {exc}"}
    finally:
        await client.aclose()
    meta = {key.decode(): value.decode() for key, value in raw.items()}
    if not meta:
        return {"found": False, "detail": "no meta hash: the cache has not warmed yet, or Redis lost its data"}
    last_applied = meta.get("last_applied_at")
    return {
        "found": True,
        "state": meta.get("state"),
        "snapshot_lsn": meta.get("snapshot_lsn"),
        "applied_lsn": meta.get("applied_lsn"),
        "stream_seq": _int_or_none(meta.get("stream_seq")),
        "warm_rows": _int_or_none(meta.get("warm_rows")),
        "seconds_since_last_change": round(now - float(last_applied), 3) if last_applied else None,
    }


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text not in (None, "") else None


def format_text(status: dict[str, dict]) -> str:
    lines = [_format_slot(status["slot"]), _format_stream(status["stream"]), _format_consumer(status["consumer"]), _format_cache(status["cache"])]
    return "\n".join(lines)


def _format_slot(slot: dict) -> str:
    if "error" in slot:
        return f"slot      error: {slot['error']}"
    if not slot["found"]:
        return f"slot      {slot['name']}: not found in {slot['database']} (ssmd cdc creates it on start)"
    holder = f"active (pid {slot['active_pid']})" if slot["active"] else "inactive"
    return (
        f"slot      {slot['name']} ({slot['plugin']}, database {slot['database']}): {holder}, "
        f"confirmed {slot['confirmed_flush_lsn']}, retained WAL {_bytes(slot['retained_wal_bytes'])}, "
        f"unconfirmed {_bytes(slot['unconfirmed_wal_bytes'])}, wal_status {slot['wal_status']}"
    )


def _format_stream(stream: dict) -> str:
    if "error" in stream:
        return f"stream    error: {stream['error']}"
    if not stream["found"]:
        return f"stream    {stream['name']}: not found (ssmd cdc creates it on start)"
    return (
        f"stream    {stream['name']}: {stream['messages']} messages, {_bytes(stream['bytes'])}, "
        f"seq {stream['first_seq']}..{stream['last_seq']}, {stream['consumers']} consumer(s)"
    )


def _format_consumer(consumer: dict) -> str:
    if "error" in consumer:
        return f"consumer  {consumer['name']}: error: {consumer['error']}"
    if not consumer["found"]:
        return f"consumer  {consumer['name']}: not found (ssmd cache creates it on start)"
    return (
        f"consumer  {consumer['name']}: pending {consumer['pending']}, ack pending {consumer['ack_pending']}, "
        f"ack floor seq {consumer['ack_floor_stream_seq']}, redelivered {consumer['redelivered']}"
    )


def _format_cache(cache: dict) -> str:
    if "error" in cache:
        return f"cache     error: {cache['error']}"
    if not cache["found"]:
        return f"cache     {cache['detail']}"
    since = cache["seconds_since_last_change"]
    last = "no change applied yet" if since is None else f"last change applied {since:.1f} s ago"
    return (
        f"cache     {cache['state']}: snapshot {cache['snapshot_lsn'] or '-'}, applied {cache['applied_lsn'] or '-'}, "
        f"stream seq {cache['stream_seq'] if cache['stream_seq'] is not None else '-'}, {last}"
    )


def _bytes(count: int | None) -> str:
    if count is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"
