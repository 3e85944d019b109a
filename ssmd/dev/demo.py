"""`make demo`: sample secmaster data streams into Redis under a live workload, then verify.

Steps: start a throwaway stack in a temporary directory, load sample rows, start `ssmd cdc` and
`ssmd cache`, wait for the cache to warm, drive the workload for DEMO_SECONDS (default 30)
while printing progress, run `ssmd verify`, print a summary and stop everything. The exit
status is 0 only when verify finds the cache equal to the database. DEMO_MARKETS (default 5000)
sets the sample size and DEMO_RATE (default 40) the workload steps per second.

A lag probe updates one market row of its own twice a second and times how long the new value
takes to appear under its Redis key: that is the commit-to-Redis lag the summary reports.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import redis

from ssmd import config
from ssmd.core.keys import KeySpace
from ssmd.dev.command import DevStack, start_stack
from ssmd.dev.sample import MARKET_COLUMNS, RowFactory, load_sample
from ssmd.dev.workload import Workload, WorkloadCounts

DEFAULT_SECONDS = 30.0
DEFAULT_MARKETS = 5000
DEFAULT_RATE = 40.0
WARM_TIMEOUT_S = 120.0
VERIFY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0
PROBE_TICKER = "DEMO-LAG-PROBE"
PROBE_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 10.0


@dataclass
class Daemon:
    """An `ssmd` subcommand running as a child process, its output in a log file."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def exited(self) -> bool:
        return self.process.poll() is not None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class LagProbe:
    """Commit-to-Redis lag probe: a background thread that updates one row and waits for its key."""

    database_url: str
    redis_url: str
    value_key: str
    latencies_ms: list[float] = field(default_factory=list)
    timeouts: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lag-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def percentile(self, fraction: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

    def _run(self) -> None:
        with psycopg.connect(self.database_url, autocommit=True) as connection, redis.Redis.from_url(self.redis_url) as client:
            marker = 0
            while not self._stop.wait(PROBE_INTERVAL_S):
                marker += 1
                connection.execute("UPDATE markets SET open_interest = %s WHERE ticker = %s", (marker, PROBE_TICKER))
                committed = time.monotonic()
                while time.monotonic() - committed < PROBE_TIMEOUT_S and not self._stop.is_set():
                    value = client.get(self.value_key)
                    if value is not None and json.loads(value).get("open_interest") == marker:
                        self.latencies_ms.append((time.monotonic() - committed) * 1000)
                        break
                    time.sleep(0.002)
                else:
                    if not self._stop.is_set():
                        self.timeouts += 1


def main() -> int:
    seconds = float(os.environ.get("DEMO_SECONDS", DEFAULT_SECONDS))
    markets = int(os.environ.get("DEMO_MARKETS", DEFAULT_MARKETS))
    rate = float(os.environ.get("DEMO_RATE", DEFAULT_RATE))
    root = Path(tempfile.mkdtemp(prefix="ssmd-demo-", dir="/tmp"))
    root.chmod(0o755)
    print(f"== ssmd demo: {seconds:.0f} s of changes on {markets} sample markets, stack in {root}")

    stack = start_stack(root, die_with_parent=True, report=lambda line: print(f"   {line}"))
    daemons: list[Daemon] = []
    passed = False
    try:
        passed = _run_demo(stack, daemons, seconds=seconds, markets=markets, rate=rate)
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
        stack.stop()
    if passed:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"   logs kept in {root}")
    return 0 if passed else 1


def _run_demo(stack: DevStack, daemons: list[Daemon], *, seconds: float, markets: int, rate: float) -> bool:
    counts = load_sample(stack.database_url, markets=markets, seed=1)
    print("== sample loaded: " + ", ".join(f"{table}={count}" for table, count in counts.as_dict().items()))

    environment = {**os.environ, **stack.env(), config.LOG_LEVEL.env: "INFO"}
    for name in ("cdc", "cache"):
        daemons.append(_start_daemon(name, environment, stack.root))
    print("== started ssmd cdc and ssmd cache; warming the cache")
    if not _wait_ready(stack.redis.url, daemons):
        return False

    keyspace = KeySpace(namespaces=config.parse_namespaces(config.CACHE_NAMESPACES.default))
    probe = LagProbe(stack.database_url, stack.redis.url, keyspace.value_key(keyspace.namespace("public", "markets"), PROBE_TICKER))
    print(f"== driving the workload for {seconds:.0f} s at {rate:.0f} steps/s")
    with Workload(stack.database_url, seed=7) as workload, redis.Redis.from_url(stack.redis.url) as client:
        # The workload read its keys on entry, so it never picks the probe row inserted now.
        _insert_probe_row(stack.database_url)
        probe.start()
        try:
            totals = workload.run(seconds=seconds, rate=rate, progress=lambda counts, elapsed: _show_progress(counts, elapsed, client, probe, daemons))
        finally:
            probe.stop()
    if any(daemon.exited() for daemon in daemons):
        return _report_exits(daemons)

    print("== ssmd verify")
    verify = subprocess.run(
        [sys.executable, "-m", "ssmd", "verify", "--timeout", str(VERIFY_TIMEOUT_S)],
        env=environment, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S + 60,
    )
    for line in (verify.stdout + verify.stderr).strip().splitlines()[-20:]:
        print(f"   {line}")
    _print_summary(stack, keyspace, totals, probe, verify.returncode == 0)
    return verify.returncode == 0


def _insert_probe_row(database_url: str) -> None:
    row = RowFactory(random.Random(0), edge_cases=False).market(PROBE_TICKER, "DEMO-EVENT")
    placeholders = ", ".join(["%s"] * len(MARKET_COLUMNS))
    with psycopg.connect(database_url, autocommit=True) as connection:
        connection.execute(f"INSERT INTO markets ({', '.join(MARKET_COLUMNS)}) VALUES ({placeholders}) ON CONFLICT DO NOTHING", row)


def _start_daemon(name: str, environment: dict[str, str], root: Path) -> Daemon:
    log_path = root / f"ssmd-{name}.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen([sys.executable, "-m", "ssmd", name], env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    return Daemon(name, process, log_path)


def _wait_ready(redis_url: str, daemons: list[Daemon]) -> bool:
    started = time.monotonic()
    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        while time.monotonic() - started < WARM_TIMEOUT_S:
            if any(daemon.exited() for daemon in daemons):
                return _report_exits(daemons)
            meta = client.hgetall("secmaster:meta")
            if meta.get("state") == "ready":
                print(f"== cache ready after {time.monotonic() - started:.1f} s: {meta.get('warm_rows', '?')} rows warmed at snapshot {meta.get('snapshot_lsn')}")
                return True
            time.sleep(0.2)
    print(f"== the cache was not ready after {WARM_TIMEOUT_S:.0f} s")
    for daemon in daemons:
        print(f"-- {daemon.name} log ({daemon.log_path}):\n{daemon.log_tail()}")
    return False


def _report_exits(daemons: list[Daemon]) -> bool:
    for daemon in daemons:
        if daemon.exited():
            print(f"== ssmd {daemon.name} exited with status {daemon.process.returncode}; last log lines ({daemon.log_path}):")
            print(daemon.log_tail())
    return False


def _show_progress(counts: WorkloadCounts, elapsed: float, client: redis.Redis, probe: LagProbe, daemons: list[Daemon]) -> None:
    meta = {key.decode(): value.decode() for key, value in client.hgetall("secmaster:meta").items()}
    line = f"   {elapsed:5.1f}s  committed {counts.changes:6d} changes in {counts.transactions:5d} tx  | cache {meta.get('state', '-')}"
    line += f", stream seq {meta.get('stream_seq', '-')}, applied {meta.get('applied_lsn', '-')}"
    if meta.get("last_applied_at"):
        line += f", last apply {max(0.0, time.time() - float(meta['last_applied_at'])):.1f} s ago"
    if probe.latencies_ms:
        line += f"  | probe lag {probe.latencies_ms[-1]:.0f} ms"
    if any(daemon.exited() for daemon in daemons):
        line += "  | a daemon exited"
    print(line, flush=True)


def _print_summary(stack: DevStack, keyspace: KeySpace, totals: WorkloadCounts, probe: LagProbe, verified: bool) -> None:
    with psycopg.connect(stack.database_url) as connection:
        rows = {table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in ("events", "markets", "series_fees")}
    with redis.Redis.from_url(stack.redis.url) as client:
        cached = {table: sum(1 for _ in client.scan_iter(keyspace.namespace_pattern(keyspace.namespace("public", table)), count=1000)) for table in rows}
        meta = {key.decode(): value.decode() for key, value in client.hgetall("secmaster:meta").items()}

    print("== summary")
    for table in rows:
        print(f"   {table:12s} rows in PostgreSQL {rows[table]:7d}   keys in Redis {cached[table]:7d}")
    print(
        f"   workload committed {totals.changes} changes ({totals.inserts} inserts, {totals.updates} updates, {totals.deletes} deletes, "
        f"{totals.key_changes} key changes) in {totals.transactions} transactions; {totals.rolled_back} rolled back"
    )
    print(f"   cache applied stream messages up to seq {meta.get('stream_seq', '-')}, commit LSN {meta.get('applied_lsn', '-')}")
    if probe.latencies_ms:
        print(
            f"   commit-to-Redis lag over {len(probe.latencies_ms)} probes: p50 {probe.percentile(0.5):.0f} ms, "
            f"p99 {probe.percentile(0.99):.0f} ms, max {max(probe.latencies_ms):.0f} ms; {probe.timeouts} probe(s) timed out"
        )
    print(f"== verify {'PASSED: the cache equals the database' if verified else 'FAILED'}")


if __name__ == "__main__":
    sys.exit(main())
