"""Helpers for the fault suite: the two daemons as subprocesses, a live workload, verify, a summary.

Every scenario follows one shape: start `ssmd cdc` and `ssmd cache` against the session's
servers, drive the workload from a background thread, inject faults, stop the workload, then run
`ssmd verify`, whose exit status and violation lines are the verdict. Results are collected in
`RESULTS` and printed as a table at the end of the pytest run.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nats
import psycopg
import redis

from ssmd.dev.sample import load_sample
from ssmd.dev.servers import NatsServer, PostgresServer, RedisServer, require_binary
from ssmd.dev.workload import Workload

REPOSITORY = Path(__file__).resolve().parents[2]
TABLES = "events,markets,series_fees"

# Faster continuity checks and redelivery than the defaults, so a scenario heals in seconds.
CACHE_FLAGS = ("--check-interval", "1", "--ack-wait", "3", "--fetch-batch", "200")
WORKLOAD_RATE = 25.0  # steps per second; one step is one or two transactions
BURST_S = 0.5  # the workload thread checks its stop event between bursts of this length


class Daemon:
    """One `python -m ssmd <command>` subprocess; stdout and stderr go to a log file."""

    def __init__(self, command: str, env: dict[str, str], log_path: Path, *flags: str) -> None:
        self.command = command
        self.log_path = log_path
        full_env = {**os.environ, **env, "LOG_LEVEL": os.environ.get("SSMD_FAULT_LOG_LEVEL", "INFO")}
        with open(log_path, "ab") as log:
            log.write(f"--- start ssmd {command} {' '.join(flags)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ssmd", command, *flags], env=full_env, cwd=REPOSITORY,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL this process (by its pid) and reap it."""
        if self.alive():
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM this process and wait; SIGKILL it when it does not stop within `timeout`."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"ssmd {self.command} did not stop within {timeout} s after SIGTERM:\n{self.log_tail()}") from None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, characters: int = 4000) -> str:
        return self.log_text()[-characters:]


@dataclass
class Pipeline:
    """`ssmd cdc` and `ssmd cache` for one test, with helpers to kill and restart them."""

    env: dict[str, str]
    directory: Path
    cdc_flags: tuple[str, ...] = ()
    cache_flags: tuple[str, ...] = CACHE_FLAGS
    cdc: Daemon | None = None
    cache: Daemon | None = None

    @property
    def cdc_log(self) -> Path:
        return self.directory / "cdc.log"

    @property
    def cache_log(self) -> Path:
        return self.directory / "cache.log"

    def start_cdc(self, *extra_flags: str) -> Daemon:
        self.cdc = Daemon("cdc", self.env, self.cdc_log, *self.cdc_flags, *extra_flags)
        wait_until(lambda: slot_active(self.env), 30, "the replication slot to become active", self.cdc)
        return self.cdc

    def start_cache(self, *extra_flags: str, wait_ready: bool = True) -> Daemon:
        """Start `ssmd cache`; wait until this instance finished its warm or resumed the stream."""
        before = self.cache_ready_lines()
        self.cache = Daemon("cache", self.env, self.cache_log, *self.cache_flags, *extra_flags)
        if wait_ready:
            # The meta hash of a stopped instance can still say `ready`, so the log decides.
            wait_until(lambda: self.cache_ready_lines() > before, 60, "the new ssmd cache to become ready", self.cache)
            self.wait_ready()
        return self.cache

    def cache_ready_lines(self) -> int:
        if not self.cache_log.exists():
            return 0
        text = self.cache_log.read_text(errors="replace")
        return sum(1 for line in text.splitlines() if " cache ready " in line or " resuming from the stream " in line)

    def wait_ready(self, timeout: float = 60) -> dict[str, str]:
        return wait_until(lambda: (m := read_meta(self.env)).get("state") == "ready" and m, timeout, "cache state ready", self.cache)

    def start(self) -> None:
        self.start_cdc()
        self.start_cache()

    def stop(self) -> None:
        for daemon in (self.cache, self.cdc):
            if daemon is not None and daemon.alive():
                daemon.stop()

    def kill_all(self) -> None:
        for daemon in (self.cache, self.cdc):
            if daemon is not None:
                daemon.kill()

    def verify(self, timeout: float = 60) -> Verdict:
        """Run `ssmd verify --timeout` while both daemons run."""
        for daemon in (self.cdc, self.cache):
            assert daemon is not None and daemon.alive(), f"ssmd {daemon.command if daemon else '?'} is not running before verify"
        return self.finish_verify(self.start_verify(timeout), timeout)

    def start_verify(self, timeout: float = 60) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "ssmd", "verify", "--timeout", str(timeout)],
            env={**os.environ, **self.env}, cwd=REPOSITORY, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    def finish_verify(self, process: subprocess.Popen, timeout: float = 60) -> Verdict:
        stdout, stderr = process.communicate(timeout=timeout + 60)
        violations = [line for line in stdout.splitlines() if line.count("\t") >= 3]
        return Verdict(process.returncode, violations, stdout, stderr)

    def history(self, keys: list[str], limit: int = 10) -> str:
        """Return the stream messages and Redis version of each key, for a violation report."""
        from tests.integration.cdc_support import read_stream

        try:
            messages = read_stream(self.env["NATS_URL"], self.env["NATS_STREAM"])
        except Exception as exc:  # a diagnostic must not hide the failure it describes
            return f"stream unavailable ({exc!r})"
        lines = []
        for key in keys[:limit]:
            needle = key.encode()
            lines.append(f"== stream messages with {key!r}:")
            lines += [f"  seq={m.seq} id={m.msg_id} {m.subject} {m.data[:600]!r}" for m in messages if needle in m.data]
            with redis.Redis.from_url(self.env["REDIS_URL"]) as client:
                for name in client.scan_iter(match=f"*{key}*"):
                    lines.append(f"  redis {name!r} = {client.get(name)!r}"[:800])
        return "\n".join(lines)

    def logs(self) -> str:
        parts = [f"== meta {read_meta(self.env)}", f"== consumer {consumer_state(self.env)}", f"== slot {slot_state(self.env)}"]
        for path in (self.cdc_log, self.cache_log):
            if path.exists():
                parts.append(f"== {path.name} (tail)\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)


@dataclass
class Verdict:
    returncode: int
    violations: list[str]
    stdout: str
    stderr: str

    def describe(self) -> str:
        return f"ssmd verify exit {self.returncode}\nstdout:\n{self.stdout[-4000:]}\nstderr:\n{self.stderr[-4000:]}"

    def keys(self) -> list[str]:
        """Return the key text of each violation line (invariant, namespace, key, detail)."""
        return [line.split("\t")[2] for line in self.violations if line.split("\t")[2]]


class BackgroundWorkload:
    """The dev workload in a thread, in short bursts until `stop()`; survives a PostgreSQL restart.

    A burst that fails on a lost connection is dropped and the next burst opens new connections
    and reads the committed keys again, so an unknown outcome of the failed commit does not
    matter. Each burst uses its own seed derived from the scenario's seed.
    """

    def __init__(self, dsn: str, seed: int, rate: float = WORKLOAD_RATE) -> None:
        self.dsn = dsn
        self.seed = seed
        self.rate = rate
        self.changes = 0
        self.failed_bursts = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"workload-{seed}", daemon=True)

    def start(self) -> BackgroundWorkload:
        self._thread.start()
        return self

    def stop(self) -> int:
        """Stop after the current burst and return the row changes committed."""
        self._stop.set()
        self._thread.join(60)
        assert not self._thread.is_alive(), "workload thread did not stop within 60 s"
        return self.changes

    def _run(self) -> None:
        burst = 0
        while not self._stop.is_set():
            burst += 1
            try:
                with Workload(self.dsn, seed=self.seed * 1000 + burst) as workload:
                    while not self._stop.is_set():
                        before = workload.counts.changes
                        workload.run(seconds=BURST_S, rate=self.rate)
                        self.changes += workload.counts.changes - before
            except psycopg.Error as exc:
                # Changes of the failed transaction may or may not have committed; the counts
                # stay a lower bound, which is all the summary needs.
                self.failed_bursts += 1
                self.errors.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
                self._stop.wait(0.3)


def load_rows(dsn: str, markets: int, seed: int) -> None:
    load_sample(dsn, markets=markets, seed=seed)


def consumer_state(env: dict[str, str]) -> str:
    """Return the durable consumer's and the stream's state as text, for failure messages."""

    async def read() -> str:
        client = await nats.connect(env["NATS_URL"], connect_timeout=5, max_reconnect_attempts=0)
        try:
            js = client.jetstream()
            stream = (await js.stream_info(env["NATS_STREAM"])).state
            info = await js.consumer_info(env["NATS_STREAM"], env.get("CONSUMER_NAME", "ssmd-cache"))
            return (
                f"stream first_seq={stream.first_seq} last_seq={stream.last_seq} messages={stream.messages}; "
                f"consumer delivered={info.delivered.stream_seq} ack_floor={info.ack_floor.stream_seq} "
                f"num_ack_pending={info.num_ack_pending} num_redelivered={info.num_redelivered} "
                f"num_waiting={info.num_waiting} num_pending={info.num_pending}"
            )
        finally:
            await client.close()

    try:
        return asyncio.run(read())
    except Exception as exc:  # a diagnostic must not hide the failure it describes
        return f"unavailable ({exc!r})"


def slot_state(env: dict[str, str]) -> str:
    """Return the slot's row and the server's current WAL position as text, for failure messages."""
    try:
        with psycopg.connect(env["DATABASE_URL"], autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT active_pid, confirmed_flush_lsn::text, pg_current_wal_lsn()::text FROM pg_replication_slots WHERE slot_name = %s",
                (env["REPLICATION_SLOT"],),
            ).fetchone()
    except psycopg.Error as exc:
        return f"unavailable ({exc!r})"
    if row is None:
        return "missing"
    return f"active_pid={row[0]} confirmed_flush_lsn={row[1]} current_wal_lsn={row[2]}"


def slot_active(env: dict[str, str]) -> bool:
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        row = conn.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (env["REPLICATION_SLOT"],)).fetchone()
    return row is not None and row[0] is not None


def slot_exists(env: dict[str, str]) -> bool:
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        return conn.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (env["REPLICATION_SLOT"],)).fetchone() is not None


def read_meta(env: dict[str, str]) -> dict[str, str]:
    try:
        with redis.Redis.from_url(env["REDIS_URL"], protocol=2, socket_timeout=5) as client:
            return {key.decode(): value.decode() for key, value in client.hgetall("secmaster:meta").items()}
    except redis.ConnectionError:
        return {}  # Redis is restarting


def wait_until(predicate, timeout: float, what: str, daemon: Daemon | None = None, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if daemon is not None and not daemon.alive():
            raise AssertionError(f"ssmd {daemon.command} exited with {daemon.process.returncode} while waiting for {what}:\n{daemon.log_tail()}")
        if time.monotonic() > deadline:
            tail = f"\n{daemon.log_tail()}" if daemon is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{tail}")
        time.sleep(interval)


def pause(rng: random.Random, low: float, high: float) -> float:
    """Sleep a random time in [low, high) seconds and return it."""
    seconds = rng.uniform(low, high)
    time.sleep(seconds)
    return seconds


# --- results table ---------------------------------------------------------------------------


@dataclass
class ScenarioResult:
    scenario: str
    seed: int
    changes: int
    violations: int | None  # None when verify gave no verdict or never ran
    faults: int = 0
    notes: list[str] = field(default_factory=list)


RESULTS: list[ScenarioResult] = []


def summary_lines(results: list[ScenarioResult]) -> list[str]:
    """Return the summary table: one row per scenario, runs and seeds aggregated."""
    rows: dict[str, list[ScenarioResult]] = {}
    for result in results:
        rows.setdefault(result.scenario, []).append(result)
    header = f"{'scenario':<28} {'runs':>4} {'faults':>6} {'changes written':>15} {'violations':>10}  seeds"
    lines = [header, "-" * len(header)]
    for scenario, runs in rows.items():
        violations = ["no verdict" if run.violations is None else run.violations for run in runs]
        shown = sum(v for v in violations if isinstance(v, int)) if all(isinstance(v, int) for v in violations) else "/".join(map(str, violations))
        lines.append(
            f"{scenario:<28} {len(runs):>4} {sum(run.faults for run in runs):>6} {sum(run.changes for run in runs):>15} "
            f"{shown!s:>10}  {','.join(str(run.seed) for run in runs)}"
        )
    return lines


class SummaryPlugin:
    """Prints the fault suite's table in pytest's terminal summary, also without `-s`."""

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not RESULTS:
            return
        terminalreporter.section("fault suite")
        for line in summary_lines(RESULTS):
            terminalreporter.write_line(line)


# --- servers with passwords and TLS, for the security and start-up error tests ----------------


@dataclass
class PasswordPostgres(PostgresServer):
    """PostgreSQL where the role `ssmd_app` must log in with a SCRAM password over 127.0.0.1.

    The superuser `postgres` keeps trust authentication, so the test can set the role up.
    """

    def _write_settings(self) -> None:
        super()._write_settings()
        conf = self.data_directory / "postgresql.auto.conf"
        self._write_owned(conf, conf.read_text() + "password_encryption = 'scram-sha-256'\n")
        hba = (
            "local all all trust\n"
            "local replication all trust\n"
            "host all ssmd_app 127.0.0.1/32 scram-sha-256\n"
            "host replication ssmd_app 127.0.0.1/32 scram-sha-256\n"
            "host all postgres 127.0.0.1/32 trust\n"
            "host replication postgres 127.0.0.1/32 trust\n"
        )
        self._write_owned(self.data_directory / "pg_hba.conf", hba)

    def app_url(self, database: str, password: str, query: str = "") -> str:
        return f"postgresql://ssmd_app:{password}@127.0.0.1:{self.port}/{database}{query}"


@dataclass
class ConfiguredNats(NatsServer):
    """nats-server started with a configuration file (authorization, TLS) next to its store."""

    config_text: str = ""
    scheme: str = "nats"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @classmethod
    def start_with(cls, root: Path, config_text: str, *, scheme: str = "nats") -> ConfiguredNats:
        require_binary("nats-server", "nats-server")
        return cls._start(root, True, config_text=config_text, scheme=scheme)

    def _prepare(self) -> None:
        super()._prepare()
        (self.directory / "server.conf").write_text(self.config_text)

    def _command(self) -> list[str]:
        return [*super()._command(), "-c", str(self.directory / "server.conf")]

    def _ready(self) -> bool:
        # With TLS the INFO line still comes in clear text before the handshake.
        try:
            return b"Server is ready" in self.log_path.read_bytes()[self._log_offset:]
        except FileNotFoundError:
            return False


@dataclass
class ConfiguredRedis(RedisServer):
    """redis-server with extra command-line options (TLS port, ACL users set after start)."""

    extra_args: tuple[str, ...] = ()

    @classmethod
    def start_with(cls, root: Path, *extra_args: str) -> ConfiguredRedis:
        require_binary("redis-server", "redis-server")
        return cls._start(root, True, extra_args=tuple(extra_args))

    def _command(self) -> list[str]:
        return [*super()._command(), *self.extra_args]


def make_certificates(directory: Path) -> dict[str, Path]:
    """Create a throwaway CA, a server certificate for 127.0.0.1 and a client certificate with the openssl CLI."""
    directory.mkdir(parents=True, exist_ok=True)
    names = ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt", "client.key", "client.csr", "client.crt", "san.cnf")
    paths = {name: directory / name for name in names}
    paths["san.cnf"].write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=ssmd test CA",
            "-keyout", str(paths["ca.key"]), "-out", str(paths["ca.crt"]))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(paths["server.key"]), "-out", str(paths["server.csr"]))
    openssl("x509", "-req", "-in", str(paths["server.csr"]), "-CA", str(paths["ca.crt"]), "-CAkey", str(paths["ca.key"]),
            "-CAcreateserial", "-days", "2", "-extfile", str(paths["san.cnf"]), "-out", str(paths["server.crt"]))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=ssmd test client",
            "-keyout", str(paths["client.key"]), "-out", str(paths["client.csr"]))
    openssl("x509", "-req", "-in", str(paths["client.csr"]), "-CA", str(paths["ca.crt"]), "-CAkey", str(paths["ca.key"]),
            "-CAcreateserial", "-days", "2", "-out", str(paths["client.crt"]))
    for path in paths.values():
        path.chmod(0o644)
    return paths
