"""Fault suite: the whole pipeline on real servers under crashes, restarts, data loss and poison.

Each scenario runs `ssmd cdc` and `ssmd cache` as subprocesses, drives the seeded dev workload,
injects its fault, stops the workload and requires `ssmd verify` to report no violation while
both daemons still run. The randomness of a scenario (fault times, workload) comes from one seed,
shown in the summary table at the end of the run and in every failure message. Set
SSMD_FAULT_SEED to replay a run: scenario number i uses seed SSMD_FAULT_SEED + i.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
import urllib.request

import nats
import psycopg
import pytest
import redis

from ssmd.core.changes import Change, Op
from ssmd.core.envelope import encode_change
from ssmd.core.jsontext import JsonNumber
from ssmd.core.lsn import Lsn
from ssmd.core.position import Position
from ssmd.dev.servers import free_port
from tests.integration.faults_support import (
    RESULTS, TABLES, BackgroundWorkload, Pipeline, ScenarioResult, SummaryPlugin, Verdict, load_rows, pause, read_meta,
    slot_active, slot_exists, wait_until,
)

pytestmark = pytest.mark.faults

BASE_SEED = int(os.environ.get("SSMD_FAULT_SEED") or random.SystemRandom().randrange(1, 1_000_000))
SCENARIO_INDEX = {
    name: index for index, name in enumerate((
        "cdc_sigkill", "cache_sigkill_warm", "cache_sigkill_streaming", "nats_restart", "redis_restart_empty",
        "redis_flushall", "postgres_restart", "stream_overflow", "slot_dropped", "poison_messages", "verify_during_warm",
    ))
}
VERIFY_TIMEOUT_S = 60
SAMPLE_MARKETS = 300


@pytest.fixture(scope="module", autouse=True)
def summary_table(request):
    """Register the plugin that prints the results table once pytest finishes."""
    manager = request.config.pluginmanager
    if manager.get_plugin("ssmd-fault-summary") is None:
        manager.register(SummaryPlugin(), "ssmd-fault-summary")
    yield


@pytest.fixture
def pipeline(ssmd_env, tmp_path):
    env = {**ssmd_env, "CDC_TABLES": TABLES}
    pipe = Pipeline(env, tmp_path)
    yield pipe
    pipe.kill_all()


class Scenario:
    """Seed, workload and result record of one scenario run."""

    def __init__(self, name: str, pipe: Pipeline) -> None:
        self.name = name
        self.seed = BASE_SEED + SCENARIO_INDEX[name]
        self.rng = random.Random(self.seed)
        self.pipe = pipe
        self.result = ScenarioResult(name, self.seed, changes=0, violations=None)
        self.workload: BackgroundWorkload | None = None

    def start_workload(self) -> None:
        self.workload = BackgroundWorkload(self.pipe.env["DATABASE_URL"], self.seed).start()

    def stop_workload(self) -> None:
        assert self.workload is not None
        self.result.changes = self.workload.stop()
        self.result.notes += self.workload.errors

    def fault(self) -> None:
        self.result.faults += 1

    def verify(self, verdict: Verdict | None = None) -> None:
        """Run verify (or take its finished verdict) and fail with both daemon logs when it reports anything."""
        if verdict is None:
            verdict = self.pipe.verify(VERIFY_TIMEOUT_S)
        # Exit 1 lists violations; any other failure (exit 2: fence not reached) gives no verdict.
        self.result.violations = len(verdict.violations) if verdict.returncode in (0, 1) else None
        assert verdict.returncode == 0, f"{self.context()}\n{verdict.describe()}\n{self.pipe.history(verdict.keys())}\n{self.pipe.logs()}"
        assert verdict.violations == [], self.context()

    def context(self) -> str:
        return f"scenario {self.name} seed {self.seed} (replay: SSMD_FAULT_SEED={BASE_SEED})"


@contextlib.contextmanager
def scenario(name: str, pipe: Pipeline, markets: int = SAMPLE_MARKETS):
    run = Scenario(name, pipe)
    print(f"{run.context()}")
    load_rows(pipe.env["DATABASE_URL"], markets, run.seed)
    try:
        yield run
    finally:
        if run.workload is not None and run.workload._thread.is_alive():
            run.workload.stop()
        RESULTS.append(run.result)


def _restart_cdc(pipe: Pipeline) -> None:
    # PostgreSQL releases the slot only when its walsender notices the killed client. Because
    # `ssmd cdc` rejects a slot that another process still streams from, wait for the release.
    wait_until(lambda: not slot_active(pipe.env), 30, "the walsender of the killed ssmd cdc to release the slot")
    pipe.start_cdc()


def _key_count(env: dict[str, str]) -> int:
    with redis.Redis.from_url(env["REDIS_URL"]) as client:
        return client.dbsize()


def _log_lines(text: str, pattern: str) -> list[str]:
    return [line for line in text.splitlines() if re.search(pattern, line)]


def test_cdc_sigkill_repeatedly(pipeline):
    with scenario("cdc_sigkill", pipeline) as run:
        pipeline.start()
        run.start_workload()
        for _ in range(3):
            pause(run.rng, 0.5, 2.5)
            pipeline.cdc.kill()
            run.fault()
            pause(run.rng, 0.0, 1.0)
            _restart_cdc(pipeline)
        pause(run.rng, 0.5, 1.5)
        run.stop_workload()
        run.verify()


def test_cache_sigkill_during_warm(pipeline):
    # 4000 markets plus their events and fees make about six warm batches of 1000 rows, so a
    # 400 ms pause after each keeps the warm open for about 2.5 s.
    with scenario("cache_sigkill_warm", pipeline, markets=4000) as run:
        pipeline.start_cdc()
        run.start_workload()
        for attempt in range(2):
            pipeline.start_cache("--warm-delay-ms", "400", wait_ready=False)
            # The log is shared by every start, so wait for this start's own snapshot line.
            wait_until(lambda: len(_log_lines(pipeline.cache.log_text(), r"created warm snapshot")) > attempt, 60,
                       "the warm snapshot", pipeline.cache)
            pause(run.rng, 0.2, 1.2)
            assert not _log_lines(pipeline.cache.log_text(), r"cache ready"), f"warm finished before the kill; {run.context()}"
            pipeline.cache.kill()
            run.fault()
            pause(run.rng, 0.0, 1.0)
        pipeline.start_cache()
        pause(run.rng, 1.0, 2.0)
        run.stop_workload()
        run.verify()
        assert len(_log_lines(pipeline.cache.log_text(), r"warming the cache")) >= 3


def test_cache_sigkill_while_streaming(pipeline):
    with scenario("cache_sigkill_streaming", pipeline) as run:
        pipeline.start()
        run.start_workload()
        for _ in range(2):
            pause(run.rng, 1.0, 2.5)
            pipeline.cache.kill()
            run.fault()
            pause(run.rng, 0.0, 1.0)
            pipeline.start_cache()
        pause(run.rng, 0.5, 1.5)
        run.stop_workload()
        run.verify()


def test_nats_restart_keeps_file_store(pipeline, nats_server):
    with scenario("nats_restart", pipeline) as run:
        pipeline.start()
        run.start_workload()
        pause(run.rng, 1.0, 2.5)
        nats_server.restart()
        run.fault()
        pause(run.rng, 2.0, 3.0)
        run.stop_workload()
        run.verify()
        assert pipeline.cdc.alive()
        assert pipeline.cache.alive()
        # The stream survived in the file store, so the cache had no reason to warm again.
        assert len(_log_lines(pipeline.cache.log_text(), r"warming the cache")) == 1, pipeline.cache.log_tail()


def test_redis_restart_without_data(pipeline, redis_server):
    with scenario("redis_restart_empty", pipeline) as run:
        pipeline.start()
        run.start_workload()
        pause(run.rng, 1.0, 2.5)
        redis_server.restart(keep_data=False)
        run.fault()
        wait_until(lambda: len(_log_lines(pipeline.cache.log_text(), r"warming the cache")) >= 2, 30,
                   "the cache to notice the lost data and warm again", pipeline.cache)
        pipeline.wait_ready()
        pause(run.rng, 0.5, 1.5)
        run.stop_workload()
        run.verify()
        assert _log_lines(pipeline.cache.log_text(), r"warming the cache .*meta hash missing"), pipeline.cache.log_tail()


def test_redis_flushall_by_administrator(pipeline):
    with scenario("redis_flushall", pipeline) as run:
        pipeline.start()
        run.start_workload()
        pause(run.rng, 1.0, 2.5)
        with redis.Redis.from_url(pipeline.env["REDIS_URL"]) as client:
            client.flushall()
        run.fault()
        wait_until(lambda: len(_log_lines(pipeline.cache.log_text(), r"warming the cache")) >= 2, 30,
                   "the cache to notice FLUSHALL and warm again", pipeline.cache)
        pipeline.wait_ready()
        pause(run.rng, 0.5, 1.5)
        run.stop_workload()
        run.verify()
        assert _log_lines(pipeline.cache.log_text(), r"warming the cache .*meta hash"), pipeline.cache.log_tail()


def test_postgres_restart(pipeline, pg_server):
    with scenario("postgres_restart", pipeline) as run:
        pipeline.start()
        run.start_workload()
        pause(run.rng, 1.0, 2.5)
        pg_server.restart()
        run.fault()
        wait_until(lambda: slot_active(pipeline.env), 60, "ssmd cdc to stream again after the restart", pipeline.cdc)
        pause(run.rng, 1.0, 2.0)
        run.stop_workload()
        run.verify()
        assert pipeline.cdc.alive()
        assert pipeline.cache.alive()


async def _stream_state(url: str, stream: str) -> tuple[int, int]:
    client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        info = await client.jetstream().stream_info(stream)
        return info.state.first_seq, info.state.last_seq
    finally:
        await client.close()


def test_stream_overflow_while_cache_stopped(pipeline):
    pipeline.cdc_flags = ("--stream-max-messages", "150")
    with scenario("stream_overflow", pipeline) as run:
        pipeline.start()
        run.start_workload()
        pause(run.rng, 0.5, 1.5)
        assert pipeline.cache.stop() == 0
        applied_seq = int(read_meta(pipeline.env)["stream_seq"])
        env = pipeline.env
        wait_until(lambda: asyncio.run(_stream_state(env["NATS_URL"], env["NATS_STREAM"]))[0] > applied_seq + 1, 60,
                   f"the stream to discard messages past stream_seq {applied_seq}", pipeline.cdc, interval=0.5)
        run.fault()
        pipeline.start_cache()
        pause(run.rng, 0.5, 1.5)
        run.stop_workload()
        run.verify()
        assert _log_lines(pipeline.cache.log_text(), r"warming the cache .*stream discarded messages"), pipeline.cache.log_tail()


def test_slot_dropped_by_administrator(pipeline):
    with scenario("slot_dropped", pipeline) as run:
        pipeline.start()
        run.start_workload()
        pause(run.rng, 0.5, 1.5)
        assert pipeline.cdc.stop() == 0
        wait_until(lambda: not slot_active(pipeline.env), 30, "the slot to be released")
        with psycopg.connect(pipeline.env["DATABASE_URL"], autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (pipeline.env["REPLICATION_SLOT"],))
        run.fault()
        assert not slot_exists(pipeline.env)
        pause(run.rng, 0.5, 1.5)  # the workload keeps committing changes no slot records
        pipeline.start_cdc()
        wait_until(lambda: _log_lines(pipeline.cache.log_text(), r"warming the cache .*publisher created slot"), 30,
                   "the cache to warm again after the slot_created message", pipeline.cache)
        pipeline.wait_ready()
        pause(run.rng, 0.5, 1.5)
        run.stop_workload()
        run.verify()
        created = _log_lines(pipeline.cdc.log_text(), r"created replication slot")
        assert len(created) == 2, pipeline.cdc.log_tail()  # first start, then after the drop


def _poison_bodies() -> list[tuple[str, bytes, str]]:
    """Return (subject, body, kind) of messages that the cache must terminate."""
    unknown_table = Change(
        op=Op.INSERT, schema="public", table="nosuch", position=Position(Lsn.parse("FF/0"), 0), xid=1,
        key={"id": JsonNumber("1")}, data={"id": JsonNumber("1")}, commit_time="2026-01-01 00:00:00+00",
    )
    unknown = encode_change(unknown_table)
    wrong_types = (
        b'{"commit_time":"2026-01-01 00:00:00+00","data":{"ticker":"POISON-1"},"key":{"ticker":"POISON-1"},'
        b'"lsn":12345,"op":"insert","schema":"public","seq":"first","table":"markets","xid":"x"}'
    )
    key_not_object = (
        b'{"commit_time":"2026-01-01 00:00:00+00","data":{"ticker":"POISON-2"},"key":["POISON-2"],'
        b'"lsn":"FF/10","op":"insert","schema":"public","seq":0,"table":"markets","xid":7}'
    )
    # nats-server's default max_payload is 1 MiB; stay just below it with the headers included.
    huge = b'{"lsn":"FF/20","pad":"' + b"x" * (1024 * 1024 - 4096) + b'"}'
    return [
        ("cdc.markets.insert", b"{not json", "invalid JSON"),
        (unknown.subject, unknown.body, "unknown table"),
        ("cdc.markets.insert", wrong_types, "wrong types"),
        ("cdc.markets.insert", key_not_object, "key not an object"),
        ("cdc.markets.update", huge, "huge payload"),
        ("cdc._ssmd.slot_created", b'{"slot":1}', "bad control message"),
    ]


async def _publish_poison(url: str, stream: str) -> list[tuple[int, str, str]]:
    client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = client.jetstream()
        published = []
        for subject, body, kind in _poison_bodies():
            ack = await js.publish(subject, body, stream=stream, timeout=10)
            published.append((ack.seq, subject, kind))
        return published
    finally:
        await client.close()


def _terminated_count(port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(r"^ssmd_cache_messages_terminated_total (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_poison_messages_terminated(pipeline):
    metrics_port = free_port()
    with scenario("poison_messages", pipeline) as run:
        pipeline.start_cdc()
        pipeline.start_cache("--metrics-port", str(metrics_port))
        run.start_workload()
        pause(run.rng, 0.5, 1.5)
        published = asyncio.run(_publish_poison(pipeline.env["NATS_URL"], pipeline.env["NATS_STREAM"]))
        run.fault()
        wait_until(lambda: _terminated_count(metrics_port) >= len(published), 30, "every poison message to be terminated", pipeline.cache)
        pause(run.rng, 1.0, 2.0)  # real changes after the poison must still land
        run.stop_workload()
        run.verify()

        assert _terminated_count(metrics_port) == len(published)
        log = pipeline.cache.log_text()
        for seq, subject, kind in published:
            lines = _log_lines(log, rf"terminated poison message .*subject={re.escape(subject)} stream_seq={seq}\b")
            assert len(lines) == 1, f"{kind} (stream seq {seq}) not logged once as terminated:\n{pipeline.cache.log_tail()}"
        assert pipeline.cache.alive()


def test_verify_while_cache_warms(pipeline):
    # An operator runs verify while the cache is down; the cache then starts and warms. The
    # verify fence commits before the warm's snapshot point, so the snapshot contains it.
    with scenario("verify_during_warm", pipeline) as run:
        pipeline.start()
        run.start_workload()
        pause(run.rng, 1.0, 2.0)
        run.stop_workload()
        assert pipeline.cache.stop() == 0
        with redis.Redis.from_url(pipeline.env["REDIS_URL"]) as client:
            client.flushdb()  # the cache lost its data while it was down, so it must warm
        run.fault()

        env = pipeline.env
        last_seq = asyncio.run(_stream_state(env["NATS_URL"], env["NATS_STREAM"]))[1]
        verify = pipeline.start_verify(VERIFY_TIMEOUT_S)
        wait_until(lambda: asyncio.run(_stream_state(env["NATS_URL"], env["NATS_STREAM"]))[1] > last_seq, 30,
                   "the verify fence to reach the stream", pipeline.cdc, interval=0.3)
        pipeline.start_cache()
        run.verify(pipeline.finish_verify(verify, VERIFY_TIMEOUT_S))
