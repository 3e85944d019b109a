"""The phases of one benchmark run, in order, each filling rows of the report.

A phase that fails records its error in its rows and the run goes on, so one broken daemon does
not hide every other figure. Phases run one at a time on purpose: the machine has two CPUs, and
a measured consumer must not share them with another measured consumer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import io
import pstats
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import nats
import redis

from ssmd.bench import baseline, ceilings, workload
from ssmd.bench.cpu import describe_cpu, tree_cpu_seconds
from ssmd.bench.latency import summarize
from ssmd.bench.report import Measurement, Report
from ssmd.bench.stack import BenchStack, Daemon, wait_until
from ssmd.bus.stream import StreamLimits, ensure_stream
from ssmd.cache.warm import BATCH_ROWS as WARM_BATCH_SIZE
from ssmd.core.errors import ConfigError
from ssmd.core.keys import KeySpace
from ssmd.dev.sample import load_sample

log = logging.getLogger(__name__)

TABLES = ["events", "markets", "series_fees"]
E2E_STREAM = "SECMASTER_CDC"
PUBLISH_STREAM = "BENCH_PUBLISH"
BASELINE_STREAM = "BENCH_BASELINE"
JETSTREAM_STREAM = "BENCH_JETSTREAM"
SAMPLED_MESSAGES = 1000
SLOT_RECVLOGICAL = "bench_recvlogical"
SLOT_RECVLOGICAL_AGAIN = "bench_recvlogical_again"
RECVLOGICAL_CEILING = "pg_recvlogical to /dev/null (ceiling)"
SLOT_BASELINE = "bench_baseline"
SLOT_PUBLISH = "bench_cdc_publish"
SLOT_E2E = "bench_cdc_e2e"
STREAM_LABEL = "bench-stream"
BIG_LABEL = "bench-big-txn"
LATENCY_RING_MAX = 20_000
CACHE_DB = 0
CEILING_DB = 1
SAMPLED_VALUES = 1000
SERVER_CAS_CEILING = "redis-benchmark EVALSHA CAS pipelined (ceiling)"
POLL_S = 0.02

# Targets: reported beside the figures, never asserted by tests.
TARGET_E2E_RATIO = 0.3
TARGET_P99_MS_AT_1000 = 25.0
TARGET_WARM_RATIO = 0.5
TARGET_RSS_MIB = 300.0


@dataclass(frozen=True)
class Size:
    markets_rows: int
    stream_transactions: int
    big_transaction_rows: int
    latency_seconds: float
    phase_timeout_s: float
    drain_timeout_s: float

    def scaled(self, *, markets_rows: int | None, transactions: int | None) -> Size:
        """Return this size with other row counts; the markets table must hold every target row."""
        markets = markets_rows if markets_rows is not None else self.markets_rows
        stream = transactions if transactions is not None else self.stream_transactions
        big = transactions if transactions is not None else self.big_transaction_rows
        if min(markets, stream, big) < 1 or markets < max(stream, big + 1):
            raise ConfigError(f"invalid benchmark size: --markets {markets} must be at least --transactions {max(stream, big)} + 1, and both positive")
        return replace(self, markets_rows=markets, stream_transactions=stream, big_transaction_rows=big)

    def describe(self, name: str) -> str:
        return f"{name} ({self.markets_rows:,} markets, {self.stream_transactions:,} transactions, big transaction {self.big_transaction_rows:,} rows)"


SIZES = {
    "small": Size(markets_rows=20_000, stream_transactions=5_000, big_transaction_rows=5_000, latency_seconds=2.0, phase_timeout_s=120.0, drain_timeout_s=30.0),
    "full": Size(markets_rows=1_000_000, stream_transactions=200_000, big_transaction_rows=200_000, latency_seconds=10.0, phase_timeout_s=900.0, drain_timeout_s=120.0),
}
LATENCY_RATES = (1000, 5000)



class BenchRun:
    """One run: the stack, the daemons it started, and the report it fills."""

    def __init__(self, stack: BenchStack, size: Size, report: Report, work_dir: Path, *, profile: bool = False) -> None:
        self.stack = stack
        self.size = size
        self.report = report
        self.work_dir = work_dir
        self.profile = profile
        self.dsn = stack.database_url
        self.keyspace = KeySpace()
        self.cache_url = f"{stack.redis.url}/{CACHE_DB}"
        self.redis = redis.Redis.from_url(self.cache_url, protocol=2)
        self.daemons: list[Daemon] = []
        self.cache: Daemon | None = None
        self.cdc_e2e: Daemon | None = None
        self.end_lsn = ""
        self.targets = 0
        self.recvlogical_rate: float | None = None
        self.recvlogical_row: Measurement | None = None
        self.sampled_messages: list[tuple[str, bytes]] = []

    # --- daemons ---------------------------------------------------------------------------

    def _daemon(self, subcommand: str, name: str, environment: dict[str, str]) -> Daemon:
        profile_path = self.work_dir / f"{name}.prof" if self.profile else None
        daemon = Daemon.for_subcommand(subcommand, name, {"LOG_LEVEL": "INFO", "METRICS_PORT": "0", **environment}, self.work_dir, profile_path=profile_path)
        self.daemons.append(daemon)
        return daemon

    def _cdc(self, name: str, nats_url: str, stream: str, slot: str) -> Daemon:
        return self._daemon("cdc", name, {
            "DATABASE_URL": self.dsn, "NATS_URL": nats_url, "NATS_STREAM": stream,
            "REPLICATION_SLOT": slot, "CDC_TABLES": ",".join(TABLES),
        })

    def stop_daemons(self) -> None:
        for daemon in reversed(self.daemons):
            if daemon.running():
                code = daemon.stop()
                if code not in (0, None):
                    log.warning("%s exited with code %s; log tail:\n%s", daemon.name, code, daemon.log_tail())

    # --- phases ----------------------------------------------------------------------------

    def load_data(self) -> None:
        started = time.perf_counter()
        counts = load_sample(self.dsn, markets=self.size.markets_rows, seed=1)
        # The sentinel of the big transaction is one row past the rows it updates.
        needed = max(self.size.stream_transactions, self.size.big_transaction_rows + 1)
        self.targets = workload.prepare_targets(self.dsn, needed)
        log.info("loaded sample data %s in %.1f s; %d markets rows marked for the generated updates and the big transaction (its last row is the sentinel)", counts.as_dict(), time.perf_counter() - started, self.targets)
        self.counts = counts

    def warm(self) -> None:
        """Start the cache on an empty Redis, time its warm, then measure the CAS ceiling."""
        warm = self.report.add(Measurement("ssmd cache warm (markets + events + fees)", "rows/s", ceiling_name="redis-benchmark EVALSHA CAS", target=TARGET_WARM_RATIO, target_kind="ratio_min"))
        ceiling = self.report.add(Measurement(SERVER_CAS_CEILING, "rows/s"))
        client_ceiling = self.report.add(Measurement("Redis EVALSHA CAS, one redis-py client (context)", "rows/s"))
        try:
            asyncio.run(self._create_stream(self.stack.nats_e2e.url, E2E_STREAM))
            workload.create_slots(self.dsn, [SLOT_E2E])
            self.cache = self._daemon("cache", "cache", {
                "DATABASE_URL": self.dsn, "NATS_URL": self.stack.nats_e2e.url, "REDIS_URL": self.cache_url,
                "NATS_STREAM": E2E_STREAM, "CDC_TABLES": ",".join(TABLES),
            })
            servers = {"postgres": self.stack.postgres.pid, "redis-server": self.stack.redis.pid}
            cpu_before = {"cache": 0.0, **tree_cpu_seconds(servers)}
            started = time.perf_counter()
            self.cache.start()
            wait_until(self._cache_ready_or_failed, self.size.phase_timeout_s, "ssmd cache to finish its warm", interval=0.1, daemons=(self.cache,))
            elapsed = time.perf_counter() - started
            cpu_after = tree_cpu_seconds({"cache": self.cache.pid, **servers})
            rows = int(self.redis.hget("secmaster:meta", "warm_rows") or 0)
            if rows <= 0:
                rows = self.counts.events + self.counts.markets + self.counts.series_fees
            warm.value = rows / elapsed
            cpu = describe_cpu(cpu_before, cpu_after, rows, elapsed, unit="row")
            warm.detail = f"{rows:,} rows in {elapsed:.1f} s from process start to state=ready (includes start-up and sweep); {cpu}"
            finished = _last_log_line(self.cache.log_path, "warm finished")
            if finished:
                warm.detail += f"; cache log: `{finished}`"
        except Exception as exc:
            warm.error = _short(exc)
            log.exception("warm phase failed")
            return

        try:
            values = self._sample_cached_values()
        except Exception as exc:
            ceiling.error = client_ceiling.error = _short(exc)
            log.exception("sampling cached values failed")
            return
        mean_size = sum(len(value) for value in values) / len(values)
        try:
            typical = min(values, key=lambda value: abs(len(value) - mean_size))
            rate = ceilings.redis_benchmark_cas_rate("127.0.0.1", self.stack.redis.port, CEILING_DB, typical, rows)
            ceiling.value = warm.ceiling_value = rate
            ceiling.detail = f"{rows:,} calls on 4 connections pipelining 100 each, random keys, one cached row of {len(typical)} bytes as the value"
        except Exception as exc:
            ceiling.error = _short(exc)
            log.exception("redis-benchmark ceiling failed")
        try:
            rate = ceilings.redis_cas_rate(f"{self.stack.redis.url}/{CEILING_DB}", values, rows, WARM_BATCH_SIZE)
            client_ceiling.value = rate
            client_ceiling.detail = f"{rows:,} keys, batches of {WARM_BATCH_SIZE}, values cycled from {len(values)} cached rows of all tables (mean {mean_size:.0f} bytes)"
            if warm.value:
                warm.detail += f"; {warm.value / rate:.2f} of one redis-py client's pipelined rate"
        except Exception as exc:
            client_ceiling.error = _short(exc)
            log.exception("redis-py ceiling failed")

    def generate_stream_load(self) -> None:
        """Create every reader's slot, then commit the single-row transactions they all read."""
        workload.create_slots(self.dsn, [SLOT_RECVLOGICAL, SLOT_RECVLOGICAL_AGAIN, SLOT_BASELINE, SLOT_PUBLISH])
        count = self.size.stream_transactions
        elapsed = workload.run_update_each(self.dsn, 0, count - 1, STREAM_LABEL, count)
        self.end_lsn = workload.current_wal_lsn(self.dsn)
        log.info("committed %d single-row transactions in %.1f s (%.0f/s); end LSN %s", count, elapsed, count / elapsed, self.end_lsn)
        self.report.add_section("Generated load", f"{count:,} single-row UPDATE transactions committed in {elapsed:.1f} s ({count / elapsed:,.0f} transactions/s) by one PL/pgSQL procedure; WAL end {self.end_lsn}.")

    def recvlogical(self) -> None:
        self.recvlogical_row = row = self.report.add(Measurement(RECVLOGICAL_CEILING, "changes/s"))
        try:
            elapsed = ceilings.run_pg_recvlogical(self.dsn, SLOT_RECVLOGICAL, self.end_lsn, TABLES, self.size.phase_timeout_s)
            row.value = self.size.stream_transactions / elapsed
            self.recvlogical_rate = row.value
            row.detail = f"{self.size.stream_transactions:,} transactions in {elapsed:.2f} s, process start to exit at --endpos"
        except Exception as exc:
            row.error = _short(exc)
            log.exception("pg_recvlogical failed")

    def recvlogical_again(self) -> None:
        """Read the same load from a second slot after the measured phases; the ceiling is the mean.

        The speed of these shared machines drifts within minutes, so a ceiling taken on both
        sides of the phases it bounds is fairer to them than one taken before.
        """
        row = self.recvlogical_row
        if row is None or row.value is None:
            return
        try:
            elapsed = ceilings.run_pg_recvlogical(self.dsn, SLOT_RECVLOGICAL_AGAIN, self.end_lsn, TABLES, self.size.phase_timeout_s)
        except Exception as exc:
            log.warning("the second pg_recvlogical run failed; the ceiling is the first run alone: %s", exc)
            return
        first, again = row.value, self.size.stream_transactions / elapsed
        row.value = self.recvlogical_rate = (first + again) / 2
        row.detail = f"mean of {first:,.0f}/s before the cdc phases and {again:,.0f}/s after them, each {self.size.stream_transactions:,} transactions from process start to exit at --endpos"
        for measurement in self.report.measurements:
            if measurement.ceiling_name == "pg_recvlogical":
                measurement.ceiling_value = row.value

    def cdc_publish(self) -> None:
        row = self.report.add(Measurement("ssmd cdc publish (PubAck'd)", "changes/s", ceiling_name="pg_recvlogical", ceiling_value=self.recvlogical_rate))
        daemon = self._cdc("cdc-publish", self.stack.nats_publish.url, PUBLISH_STREAM, SLOT_PUBLISH)
        try:
            started = time.perf_counter()
            daemon.start()
            pids = {"cdc": daemon.pid, "postgres": self.stack.postgres.pid, "nats-server": self.stack.nats_publish.pid}
            rate, first_at, elapsed, cpu = self._time_stream_fill(self.stack.nats_publish.url, PUBLISH_STREAM, daemon, pids)
            row.value = rate
            row.detail = f"{self.size.stream_transactions:,} changes in {elapsed:.2f} s after the first reached the stream; start-up to first message {first_at - started:.1f} s; {cpu}"
        except Exception as exc:
            row.error = _short(exc)
            log.exception("cdc publish phase failed")
        finally:
            self._stop(daemon)
            try:
                self.sampled_messages = asyncio.run(self._sample_messages(self.stack.nats_publish.url, PUBLISH_STREAM))
            except Exception as exc:
                log.warning("sampling messages of stream %s failed: %s", PUBLISH_STREAM, exc)
            asyncio.run(self._delete_stream(self.stack.nats_publish.url, PUBLISH_STREAM))

    def jetstream(self) -> None:
        """Measure JetStream publish and consume rates with the messages ssmd cdc published."""
        publish = self.report.add(Measurement("JetStream publish_async, one client (context)", "msgs/s"))
        consume = self.report.add(Measurement("JetStream pull fetch(500), ack each (context)", "msgs/s"))
        try:
            if not self.sampled_messages:
                raise RuntimeError("no messages of ssmd cdc to publish (its phase failed)")
            count = self.size.stream_transactions
            publish_rate, consume_rate = asyncio.run(ceilings.jetstream_rates(self.stack.nats_publish.url, JETSTREAM_STREAM, self.sampled_messages, count))
            publish.value, consume.value = publish_rate, consume_rate
            mean_size = sum(len(body) for _, body in self.sampled_messages) / len(self.sampled_messages)
            publish.detail = f"{count:,} messages cycled from {len(self.sampled_messages)} that ssmd cdc published (mean body {mean_size:.0f} bytes), window of 4,000 pending PubAcks"
        except Exception as exc:
            publish.error = consume.error = _short(exc)
            log.exception("JetStream phase failed")

    def baseline(self) -> None:
        row = self.report.add(Measurement("baseline: one awaited publish per message", "changes/s", ceiling_name="pg_recvlogical", ceiling_value=self.recvlogical_rate))
        try:
            published, elapsed = asyncio.run(baseline.publish_awaited(self.dsn, SLOT_BASELINE, self.end_lsn, self.stack.nats_publish.url, BASELINE_STREAM, TABLES))
            if published != self.size.stream_transactions:
                raise RuntimeError(f"baseline published {published} changes, expected {self.size.stream_transactions}")
            row.value = published / elapsed
            row.detail = f"{published:,} changes in {elapsed:.1f} s"
        except Exception as exc:
            row.error = _short(exc)
            log.exception("baseline phase failed")
        finally:
            asyncio.run(self._delete_stream(self.stack.nats_publish.url, BASELINE_STREAM))

    def end_to_end(self) -> None:
        row = self.report.add(Measurement("ssmd cdc + cache end to end (commit to Redis)", "changes/s", ceiling_name="pg_recvlogical", ceiling_value=self.recvlogical_rate, target=TARGET_E2E_RATIO, target_kind="ratio_min"))
        try:
            if self.cache is None or not self.cache.running() or not self._cache_ready():
                raise RuntimeError("ssmd cache is not running or not ready (see the warm row)")
            count = self.size.stream_transactions
            last_key = self._market_key(workload.target_ticker(self.dsn, (count - 1) % count))
            last_title = f"{STREAM_LABEL} {count - 1} ".encode()
            self.cdc_e2e = self._cdc("cdc", self.stack.nats_e2e.url, E2E_STREAM, SLOT_E2E)
            started = time.perf_counter()
            self.cdc_e2e.start()
            daemons = (self.cdc_e2e, self.cache)
            first_at = asyncio.run(self._wait_stream_messages(self.stack.nats_e2e.url, E2E_STREAM, 1, daemons))
            pids = {"cdc": self.cdc_e2e.pid, "cache": self.cache.pid, "postgres": self.stack.postgres.pid, "nats-server": self.stack.nats_e2e.pid, "redis-server": self.stack.redis.pid}
            cpu_before = tree_cpu_seconds(pids)
            wait_until(lambda: last_title in (self.redis.get(last_key) or b""), self.size.phase_timeout_s, "the last change in Redis", interval=POLL_S, daemons=daemons)
            done_at = time.perf_counter()
            cpu = describe_cpu(cpu_before, tree_cpu_seconds(pids), count, done_at - first_at)
            row.value = count / (done_at - first_at)
            row.detail = f"{count:,} changes in {done_at - first_at:.2f} s from the first in the stream to the last in Redis; start-up to first message {first_at - started:.1f} s; {cpu}"
        except Exception as exc:
            row.error = _short(exc)
            log.exception("end-to-end phase failed")

    def latency(self) -> None:
        rows = {}
        for rate in LATENCY_RATES:
            target = TARGET_P99_MS_AT_1000 if rate == 1000 else None
            rows[rate] = [
                self.report.add(Measurement(f"latency p50 at {rate:,} changes/s", "ms")),
                self.report.add(Measurement(f"latency p99 at {rate:,} changes/s", "ms", target=target, target_kind="max" if target else None)),
                self.report.add(Measurement(f"latency max at {rate:,} changes/s", "ms")),
            ]
        for rate in LATENCY_RATES:
            p50, p99, maximum = rows[rate]
            try:
                if self.cdc_e2e is None or not self.cdc_e2e.running() or self.cache is None or not self.cache.running():
                    raise RuntimeError("ssmd cdc and ssmd cache are not both running")
                if not self._cache_ready():
                    raise RuntimeError("ssmd cache is not ready")
                summary, detail = self._measure_latency(rate)
                p50.value, p99.value, maximum.value = summary["p50"], summary["p99"], summary["max"]
                p99.detail = detail
            except Exception as exc:
                for measurement in (p50, p99, maximum):
                    measurement.error = _short(exc)
                log.exception("latency phase at %d/s failed", rate)

    def peak_rss(self) -> None:
        cdc_row = self.report.add(Measurement("ssmd cdc peak RSS during one big transaction", "MiB", target=TARGET_RSS_MIB, target_kind="below"))
        cache_row = self.report.add(Measurement("ssmd cache peak RSS during one big transaction", "MiB", target=TARGET_RSS_MIB, target_kind="below"))
        try:
            daemons = (self.cdc_e2e, self.cache)
            if any(daemon is None or not daemon.running() for daemon in daemons):
                raise RuntimeError("ssmd cdc and ssmd cache are not both running")
            if not self._cache_ready():
                raise RuntimeError("ssmd cache is not ready")
            lifetime = {daemon.name: daemon.memory_kib().get("VmHWM", 0) for daemon in daemons}
            reset = all(daemon.reset_peak_rss() for daemon in daemons)
            rows = self.size.big_transaction_rows
            sentinel_key = self._market_key(workload.target_ticker(self.dsn, rows))
            sentinel = f"{BIG_LABEL} done".encode()
            commit_s = workload.run_big_transaction(self.dsn, rows, rows, BIG_LABEL)
            committed_at = time.perf_counter()
            wait_until(lambda: sentinel in (self.redis.get(sentinel_key) or b""), self.size.phase_timeout_s, "the big transaction in Redis", interval=POLL_S, daemons=daemons)
            applied_s = time.perf_counter() - committed_at
            for row, daemon in ((cdc_row, self.cdc_e2e), (cache_row, self.cache)):
                peak = daemon.memory_kib().get("VmHWM", 0)
                row.value = peak / 1024
                scope = "peak reset before the transaction" if reset else "peak since start (reset refused)"
                row.detail = f"{rows + 1:,} changes in one transaction, {scope}; peak since start {max(peak, lifetime[daemon.name]) / 1024:.0f} MiB"
            self.report.add_section("Big transaction", f"One transaction updating {rows:,} rows plus a sentinel row: commit took {commit_s:.1f} s, then {applied_s:.1f} s until the cache held its last change ({(rows + 1) / applied_s:,.0f} changes/s).")
        except Exception as exc:
            cdc_row.error = cache_row.error = _short(exc)
            log.exception("peak RSS phase failed")

    def profiles(self) -> None:
        """Add each profiled daemon's hot files and functions (after the daemons stopped)."""
        for daemon in self.daemons:
            path = self.work_dir / f"{daemon.name}.prof"
            if path.exists():
                self.report.add_section(f"Profile of {daemon.name} (cProfile)", format_profile(path))

    # --- helpers ---------------------------------------------------------------------------

    def _measure_latency(self, rate: int) -> tuple[dict, str]:
        label = f"bench-latency-{rate}"
        ring = min(self.targets, LATENCY_RING_MAX)
        pattern = self.keyspace.namespace_pattern("market")
        reader = subprocess.Popen(
            [sys.executable, "-m", "ssmd.bench.latency", self.cache_url, pattern, label, str(self.size.drain_timeout_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            if reader.stderr.readline().strip() != "ready":
                raise RuntimeError(f"latency reader failed to start: {reader.stderr.read()[-500:]}")
            paced = workload.run_paced_updates(self.dsn, rate=rate, duration_s=self.size.latency_seconds, label=label, ring=ring)
            output, errors = reader.communicate(f"{paced.sent}\n", timeout=self.size.phase_timeout_s)
        except BaseException:
            reader.kill()
            reader.wait()
            raise
        if reader.returncode != 0:
            raise RuntimeError(f"latency reader exited with code {reader.returncode}: {errors[-500:]}")
        result = json.loads(output)
        if not result["latencies_ms"]:
            raise RuntimeError(f"no change reached Redis within the drain time ({paced.sent} sent)")
        summary = summarize(result["latencies_ms"])
        detail = (
            f"{paced.sent:,} transactions offered at {paced.rate:,.0f}/s over {paced.elapsed_s:.1f} s "
            f"(writer at most {paced.max_behind} behind schedule); {summary['count']:,} seen in Redis, "
            f"{result['missing']} not seen within {self.size.drain_timeout_s:.0f} s after the writer stopped"
        )
        return summary, detail

    def _cache_ready(self) -> bool:
        return self.redis.hget("secmaster:meta", "state") == b"ready"

    def _cache_ready_or_failed(self) -> bool:
        """Return True once the warm is done; raise when the cache had to start its warm again.

        A warm that fails is retried by the daemon from the start, so waiting longer would only
        repeat the failure until the phase timeout.
        """
        if self._cache_ready():
            return True
        failure = _last_log_line(self.cache.log_path, "cache session failed")
        if failure is not None:
            raise RuntimeError(f"ssmd cache warm failed and restarted: {failure}")
        return False

    def _market_key(self, ticker: str) -> str:
        return self.keyspace.row_value_key("public", "markets", {"ticker": ticker})

    def _sample_cached_values(self) -> list[bytes]:
        """Return cached rows of every table, in the proportion of the tables' row counts."""
        counts = {"market": self.counts.markets, "event": self.counts.events, "fee": self.counts.series_fees}
        largest = max(counts.values())
        values: list[bytes] = []
        for namespace, count in counts.items():
            wanted = max(1, SAMPLED_VALUES * count // largest) if count else 0
            keys = []
            for key in self.redis.scan_iter(match=self.keyspace.namespace_pattern(namespace), count=1000):
                keys.append(key)
                if len(keys) >= wanted:
                    break
            if keys:
                values += [value for value in self.redis.mget(keys) if value]
        if not values:
            raise RuntimeError("no rows found in the cache to sample values from: the warm wrote none")
        return values

    def _time_stream_fill(self, nats_url: str, stream: str, daemon: Daemon, pids: dict[str, int]) -> tuple[float, float, float, str]:
        """Return the rate, the time of the first message, the fill time and its CPU split."""
        count = self.size.stream_transactions

        async def measure() -> tuple[float, float, float, str]:
            first_at = await self._wait_stream_messages(nats_url, stream, 1, (daemon,))
            cpu_before = tree_cpu_seconds(pids)
            done_at = await self._wait_stream_messages(nats_url, stream, count, (daemon,))
            cpu = describe_cpu(cpu_before, tree_cpu_seconds(pids), count, done_at - first_at)
            return count / (done_at - first_at), first_at, done_at - first_at, cpu

        return asyncio.run(measure())

    async def _wait_stream_messages(self, nats_url: str, stream: str, count: int, daemons: tuple[Daemon, ...]) -> float:
        """Return the perf_counter time at which `count` change messages were in the stream."""
        timeout = self.size.phase_timeout_s
        client = await nats.connect(nats_url, name="ssmd-bench-watch")
        try:
            js = client.jetstream()
            deadline = time.monotonic() + timeout
            while True:
                if await _change_messages(js, stream) >= count:
                    return time.perf_counter()
                for daemon in daemons:
                    daemon.check_running()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {count} messages in stream {stream}")
                await asyncio.sleep(POLL_S)
        finally:
            await client.close()

    async def _sample_messages(self, nats_url: str, stream: str) -> list[tuple[str, bytes]]:
        """Return (subject, body) of the stream's first change messages."""
        client = await nats.connect(nats_url, name="ssmd-bench-sample")
        try:
            js = client.jetstream()
            info = await js.stream_info(stream)
            messages = []
            for seq in range(info.state.first_seq, info.state.last_seq + 1):
                message = await js.get_msg(stream, seq)
                if not message.subject.startswith("cdc._ssmd."):
                    messages.append((message.subject, message.data))
                if len(messages) >= SAMPLED_MESSAGES:
                    break
            return messages
        finally:
            await client.close()

    async def _create_stream(self, nats_url: str, stream: str) -> None:
        client = await nats.connect(nats_url, name="ssmd-bench-setup")
        try:
            await ensure_stream(client.jetstream(), stream, StreamLimits())
        finally:
            await client.close()

    async def _delete_stream(self, nats_url: str, stream: str) -> None:
        client = await nats.connect(nats_url, name="ssmd-bench-setup")
        try:
            await client.jetstream().delete_stream(stream)
        except nats.js.errors.NotFoundError:
            pass
        finally:
            await client.close()

    def _stop(self, daemon: Daemon) -> None:
        code = daemon.stop()
        if code not in (0, None):
            log.warning("%s exited with code %s; log tail:\n%s", daemon.name, code, daemon.log_tail())


async def _change_messages(js, stream: str) -> int:
    """Return how many messages of the stream carry changes (not `cdc._ssmd.*` control messages)."""
    try:
        info = await js.stream_info(stream, subjects_filter="cdc.>")
    except nats.js.errors.NotFoundError:
        return 0
    subjects = info.state.subjects or {}
    return sum(count for subject, count in subjects.items() if not subject.startswith("cdc._ssmd."))


def _last_log_line(path: Path, text: str) -> str | None:
    """Return the message part of the last log line containing `text`, without timestamp and level."""
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if text in line]
    except FileNotFoundError:
        return None
    return lines[-1].split(text, 1)[1].strip() if lines else None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def format_profile(path: Path, top: int = 20) -> str:
    """Return own time summed per source file, then the top functions by own time.

    Time in `select.epoll.poll` is the event loop waiting for I/O, not work, so the per-file
    shares leave it out.
    """
    stats = pstats.Stats(str(path))
    by_file: dict[str, float] = {}
    idle = 0.0
    for (filename, _line, function), (_calls, _primitive, own, _cumulative, _callers) in stats.stats.items():
        if "poll" in function and "epoll" in function:
            idle += own
            continue
        name = _source_name(filename)
        by_file[name] = by_file.get(name, 0.0) + own
    busy = sum(by_file.values()) or 1.0
    lines = [f"Busy {busy:.1f} s, waiting in epoll {idle:.1f} s. Own time by file:", "", "| file | own s | share |", "|---|---|---|"]
    for name, seconds in sorted(by_file.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"| {name} | {seconds:.2f} | {seconds / busy:.0%} |")

    buffer = io.StringIO()
    pstats.Stats(str(path), stream=buffer).sort_stats("tottime").print_stats(top)
    text = buffer.getvalue()
    start = text.find("   ncalls")
    lines += ["", f"Top {top} functions by own time:", "", "```", text[max(start, 0):].rstrip(), "```"]
    return "\n".join(lines)


def _source_name(filename: str) -> str:
    """Shorten a code path to `ssmd/...` or `<package>/...`; built-ins keep their `~` name."""
    marker = "/ssmd/"
    if marker in filename:
        return "ssmd/" + filename.rsplit(marker, 1)[1]
    for anchor in ("/site-packages/", "/lib/python3.11/"):
        if anchor in filename:
            return filename.rsplit(anchor, 1)[1]
    return filename
