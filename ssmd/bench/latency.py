"""Commit-to-Redis latency reader: keyspace notifications, one timestamp per arrival.

Run as `python -m ssmd.bench.latency REDIS_URL KEY_PATTERN LABEL DRAIN_S` in its own process, so the
paced writer and the reader do not share one interpreter. It turns on keyspace notifications
for string commands (`notify-keyspace-events K$`) and subscribes to the value keys of the
pattern. For every `set` it notes the arrival time. Then it reads the keys that arrived (one
MGET per burst) and parses `<label> <seq> <epoch>` from each row's title. The latency of a seq
is its first arrival time minus its commit stamp.

A key is updated again only after the writer went round its ring of rows (several seconds at
the rates used), so the value read right after a notification is the value that caused it.

The parent writes the number of seqs it sent to stdin; the reader then waits until it has seen
all of them or for DRAIN_S more seconds, and prints one JSON object on stdout:
`{"latencies_ms": [...], "missing": N, "stale": N}`.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time

import redis


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Return the nearest-rank percentile of sorted values (fraction 0.5 for p50)."""
    if not sorted_values:
        raise ValueError("no values")
    rank = max(1, int(-(-fraction * len(sorted_values) // 1)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize(latencies_ms: list[float]) -> dict[str, float]:
    values = sorted(latencies_ms)
    return {"p50": percentile(values, 0.50), "p99": percentile(values, 0.99), "max": values[-1], "count": len(values)}


def read_arrivals(redis_url: str, key_pattern: str, label: str, drain_s: float) -> dict:
    client = redis.Redis.from_url(redis_url, protocol=2)
    reader = redis.Redis.from_url(redis_url, protocol=2)
    client.config_set("notify-keyspace-events", "K$")
    database = client.connection_pool.connection_kwargs.get("db", 0)
    prefix = f"__keyspace@{database}__:"
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(prefix + key_pattern)
    stamp = re.compile(re.escape(label).encode() + rb" (\d+) ([0-9.]+)")

    expected: list[int] = []
    threading.Thread(target=lambda: expected.append(int(sys.stdin.readline() or 0)), daemon=True).start()
    print("ready", file=sys.stderr, flush=True)

    first_arrival: dict[int, float] = {}
    stale = 0
    drain_deadline = None
    while True:
        message = pubsub.get_message(timeout=0.2)
        burst: list[tuple[bytes, float]] = []
        while message is not None:
            if message["data"] == b"set":
                burst.append((message["channel"][len(prefix):], time.time()))
            message = pubsub.get_message(timeout=0)
        if burst:
            values = reader.mget([key for key, _ in burst])
            for (_, arrived), value in zip(burst, values):
                match = stamp.search(value or b"")
                if match is None:
                    continue
                seq, committed = int(match.group(1)), float(match.group(2))
                if seq in first_arrival:
                    stale += 1
                    continue
                first_arrival[seq] = (arrived - committed) * 1000.0
        if expected:
            if drain_deadline is None:
                drain_deadline = time.monotonic() + drain_s
            if len(first_arrival) >= expected[0] or time.monotonic() > drain_deadline:
                break

    pubsub.close()
    client.close()
    reader.close()
    total = expected[0]
    return {"latencies_ms": [first_arrival[seq] for seq in sorted(first_arrival) if seq < total], "missing": max(0, total - len(first_arrival)), "stale": stale}


def main() -> int:
    redis_url, key_pattern, label, drain_s = sys.argv[1:5]
    result = read_arrivals(redis_url, key_pattern, label, float(drain_s))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
