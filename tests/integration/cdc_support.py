"""Helpers for the `ssmd cdc` tests: run the daemon as a subprocess, read the stream back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nats
import psycopg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from ssmd.core.jsontext import loads
from ssmd.core.lsn import Lsn

REPOSITORY = Path(__file__).resolve().parents[2]

MARKETS_SCHEMA = """
CREATE TABLE markets (
    ticker text PRIMARY KEY,
    event_ticker text NOT NULL,
    status text NOT NULL,
    price numeric,
    volume bigint,
    notes text
);
CREATE TABLE events (event_ticker text PRIMARY KEY, title text);
CREATE TABLE series_fees (
    series_ticker text, effective_from date, fee numeric,
    PRIMARY KEY (series_ticker, effective_from)
);
"""


@dataclass
class StreamMessage:
    seq: int
    subject: str
    msg_id: str | None
    data: bytes

    @property
    def body(self) -> dict:
        return loads(self.data)


class CdcProcess:
    """`python -m ssmd cdc` with the test's environment; stderr goes to a log file."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str, extra_env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        full_env = {**os.environ, **env, "CDC_TABLES": env.get("CDC_TABLES", "markets,events,series_fees"), **(extra_env or {})}
        full_env.setdefault("LOG_LEVEL", "INFO")
        self._log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ssmd", "cdc", *args], env=full_env, cwd=REPOSITORY,
            stdout=self._log, stderr=subprocess.STDOUT,
        )

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def terminate(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        return self.wait(10)

    def peak_rss_kib(self) -> int | None:
        """Return VmHWM of the running process in KiB."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except FileNotFoundError:
            return None
        return None


def read_metric(port: int, name: str) -> float:
    """Return one sample from a daemon's /metrics on 127.0.0.1, or 0.0 when it is not listed."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return next((float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")), 0.0)


def run_sql(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def slot_state(url: str, slot: str) -> tuple[Lsn | None, int | None]:
    """Return (confirmed_flush_lsn, active_pid) of a slot."""
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT confirmed_flush_lsn::text, active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    if row is None:
        return None, None
    return (Lsn.parse(row[0]) if row[0] else None), row[1]


def current_wal_lsn(url: str) -> Lsn:
    with psycopg.connect(url, autocommit=True) as conn:
        return Lsn.parse(conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0])


def wait_until(condition, timeout: float, description: str, process: CdcProcess | None = None, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.process.poll() is not None:
            raise AssertionError(f"ssmd cdc exited with {process.process.returncode} while waiting for {description}:\n{process.log_text()[-3000:]}")
        time.sleep(interval)
    log = process.log_text()[-3000:] if process else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {description}\n{log}")


def wait_streaming(url: str, slot: str, process: CdcProcess, timeout: float = 30) -> None:
    wait_until(lambda: slot_state(url, slot)[1] is not None, timeout, f"slot {slot} to become active", process)


async def _read_stream(url: str, stream: str, subject: str | None) -> list[StreamMessage]:
    client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = client.jetstream()
        info = await js.stream_info(stream)
        if info.state.messages == 0:
            return []
        # No acks: an ephemeral consumer with explicit acks stops at max_ack_pending (1000).
        config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
        subscription = await js.pull_subscribe(subject or ">", stream=stream, config=config)
        messages: list[StreamMessage] = []
        while True:
            try:
                batch = await subscription.fetch(1000, timeout=1)
            except nats.errors.TimeoutError:
                break
            for message in batch:
                messages.append(StreamMessage(message.metadata.sequence.stream, message.subject, (message.headers or {}).get("Nats-Msg-Id"), message.data))
            if messages and messages[-1].seq >= info.state.last_seq:
                break
        await subscription.unsubscribe()
        return messages
    finally:
        await client.close()


def read_stream(url: str, stream: str, subject: str | None = None) -> list[StreamMessage]:
    """Return every message stored in the stream (optionally one subject filter), in order."""
    return asyncio.run(_read_stream(url, stream, subject))


async def _stream_count(url: str, stream: str) -> int:
    client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        try:
            return (await client.jetstream().stream_info(stream)).state.messages
        except nats.js.errors.NotFoundError:
            return 0
    finally:
        await client.close()


def stream_count(url: str, stream: str) -> int:
    return asyncio.run(_stream_count(url, stream))


def changes(messages: list[StreamMessage]) -> list[StreamMessage]:
    """Return the row-change messages, without `cdc._ssmd.*` control messages."""
    return [message for message in messages if not message.subject.startswith("cdc._ssmd.")]


def announcements(url: str, stream: str) -> list[StreamMessage]:
    """Return the stream's `cdc._ssmd.slot_created` messages, in order."""
    return read_stream(url, stream, "cdc._ssmd.slot_created")


def wait_announced(env: dict[str, str], process: CdcProcess, count: int = 1, timeout: float = 30) -> list[StreamMessage]:
    """Wait until the stream holds `count` slot announcements; the daemon publishes them after it starts streaming."""
    return wait_until(lambda: (found := announcements(env["NATS_URL"], env["NATS_STREAM"])) and len(found) >= count and found,
                      timeout, f"{count} slot_created message(s)", process, interval=0.2)
