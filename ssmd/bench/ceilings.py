"""Ceilings measured in the same run: the fastest reader of the WAL, and Redis compare-and-set.

- pg_recvlogical (PostgreSQL's own C client) streams the slot with the wal2json options ssmd cdc
  uses and writes to /dev/null. No consumer of the same WAL can be faster on the same server,
  so it bounds the publish and end-to-end rates.
- A pipelined EVALSHA of a compare-and-set script with the same key shape as the cache's write
  (value key plus version key in one hash slot, fixed-width hex versions) and values of the same
  sizes bounds the warm rate: warm also reads and encodes rows, the ceiling only writes. The
  server's ceiling comes from redis-benchmark (C, several pipelined connections); one redis-py
  client with the warm's batch size shows what a Python client reaches.
- JetStream publish with a window of pending PubAcks, and a pull consumer acking each message,
  with ssmd's own messages, show what NATS and nats-py allow one client on this machine. They are
  context for the publish and end-to-end rates, which pg_recvlogical bounds.
"""

from __future__ import annotations

import shutil
import subprocess
import time

import nats
import redis

from ssmd.bus.stream import StreamLimits, ensure_stream
from ssmd.core.envelope import MSG_ID_HEADER
from ssmd.core.wal2json import WAL2JSON_OPTIONS
from ssmd.dev.servers import PG_BINDIR

PG_RECVLOGICAL = PG_BINDIR / "pg_recvlogical"
REDIS_BENCHMARK = shutil.which("redis-benchmark") or "redis-benchmark"  # Debian package redis-tools

# Same decision as a versioned write: apply only when the new version is greater than the
# stored one, then store value and version. Versions are fixed-width hex strings.
CAS_SCRIPT = """
local stored = redis.call("GET", KEYS[2])
if stored and ARGV[1] <= stored then
  return 0
end
redis.call("SET", KEYS[1], ARGV[2])
redis.call("SET", KEYS[2], ARGV[1])
return 1
"""


def recvlogical_options(tables: list[str]) -> list[str]:
    """Return `-o name=value` arguments for the wal2json options of ssmd cdc."""
    options = dict(WAL2JSON_OPTIONS)
    options["add-tables"] = ",".join(table if "." in table else f"public.{table}" for table in tables)
    options["add-msg-prefixes"] = "ssmd"
    arguments = []
    for name, value in options.items():
        arguments += ["-o", f"{name}={value}"]
    return arguments


def run_pg_recvlogical(dsn: str, slot: str, end_lsn: str, tables: list[str], timeout_s: float) -> float:
    """Stream `slot` up to `end_lsn` into /dev/null and return the elapsed seconds."""
    command = [
        str(PG_RECVLOGICAL), "--dbname", dsn, "--slot", slot, "--start",
        "--endpos", end_lsn, "--file", "/dev/null", "--fsync-interval", "0", "--no-loop",
        *recvlogical_options(tables),
    ]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"pg_recvlogical exited with code {result.returncode}: {result.stderr.strip()[-500:]}")
    return elapsed


def redis_cas_rate(redis_url: str, values: list[bytes], rows: int, batch_size: int, key_prefix: str = "bench:cas") -> float:
    """Write `rows` keys with pipelined EVALSHA CAS calls and return rows per second.

    Values cycle through `values` (rows sampled from the cache) so value sizes match. Each key
    is new, so every call applies, as in a warm of an empty cache.
    """
    client = redis.Redis.from_url(redis_url, protocol=2)
    try:
        sha = client.script_load(CAS_SCRIPT)
        version = b"%016X%08X" % (0x100000000, 0)
        started = time.perf_counter()
        for first in range(0, rows, batch_size):
            pipeline = client.pipeline(transaction=False)
            for index in range(first, min(rows, first + batch_size)):
                value_key = f"{key_prefix}:{index}"
                pipeline.evalsha(sha, 2, value_key, "{" + value_key + "}:v", version, values[index % len(values)])
            pipeline.execute()
        elapsed = time.perf_counter() - started
        client.flushdb()
    finally:
        client.close()
    return rows / elapsed


def redis_benchmark_cas_rate(host: str, port: int, db: int, value: bytes, requests: int, *, clients: int = 4, pipeline: int = 100, timeout_s: float = 300.0) -> float:
    """Return the requests per second of redis-benchmark (C) running the same CAS by EVALSHA.

    The keys are random in a range 100 times the number of requests, so nearly every call writes
    a new key, like a warm of an empty cache. Several pipelined connections keep the server busy,
    which makes this the server's ceiling rather than one client's.
    """
    client = redis.Redis(host=host, port=port, db=db, protocol=2)
    try:
        sha = client.script_load(CAS_SCRIPT)
        version = "%016X%08X" % (0x100000000, 0)
        command = [
            REDIS_BENCHMARK, "-h", host, "-p", str(port), "--dbnum", str(db), "-n", str(requests),
            "-c", str(clients), "-P", str(pipeline), "-r", str(requests * 100), "--csv",
            "EVALSHA", sha, "2", "bench:rb:__rand_int__", "{bench:rb:__rand_int__}:v", version, value.decode(errors="replace"),
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        client.flushdb()
    finally:
        client.close()
    if result.returncode != 0:
        raise RuntimeError(f"redis-benchmark exited with code {result.returncode}: {result.stderr.strip()[-300:]}")
    return _csv_rps(result.stdout)


def _csv_rps(output: str) -> float:
    # `--csv` prints a header, then per test the command as its name and seven figures, rps first.
    # The name is not escaped, and a JSON value in it contains `","`, so the figures are counted
    # from the end of the line.
    for line in output.strip().splitlines()[1:]:
        cells = line.strip().strip('"').split('","')
        if len(cells) >= 8:
            try:
                return float(cells[-7])
            except ValueError:
                continue
    raise RuntimeError(f"no requests-per-second figure in redis-benchmark output: {output[-300:]!r}")


async def jetstream_rates(nats_url: str, stream: str, messages: list[tuple[str, bytes]], count: int) -> tuple[float, float]:
    """Return (publish rate, consume rate) in messages per second for one client on one stream.

    Publishing uses nats-py's `publish_async` with its default window of 4,000 pending PubAcks,
    each message with its own `Nats-Msg-Id`, cycling through `messages` (subject, body) taken
    from ssmd cdc's stream. Consuming uses a durable pull consumer, `fetch(500)` and one ack per
    message, as a cache would.
    """
    client = await nats.connect(nats_url, name="ssmd-bench-ceiling")
    try:
        js = client.jetstream()
        await ensure_stream(js, stream, StreamLimits())

        started = time.perf_counter()
        for index in range(count):
            subject, body = messages[index % len(messages)]
            await js.publish_async(subject, body, stream=stream, headers={MSG_ID_HEADER: f"ceiling:{index}"})
        await js.publish_async_completed()
        publish_rate = count / (time.perf_counter() - started)

        subscription = await js.pull_subscribe("cdc.>", durable="bench-ceiling", stream=stream)
        received = 0
        started = time.perf_counter()
        while received < count:
            batch = await subscription.fetch(500, timeout=10)
            for message in batch:
                await message.ack()
            received += len(batch)
        consume_rate = count / (time.perf_counter() - started)
        await js.delete_stream(stream)
    finally:
        await client.close()
    return publish_rate, consume_rate
