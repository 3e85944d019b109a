"""The servers one benchmark run starts for itself, and the daemons it runs against them.

Two NATS servers keep the phases apart. ssmd's stream takes every subject under `cdc.>`, and
JetStream rejects a second stream whose subjects overlap. So the publish-only and baseline
phases use their own server, while the end-to-end stream stays in place on the other.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ssmd.dev.servers import NatsServer, PostgresServer, RedisServer

log = logging.getLogger(__name__)

DATABASE = "ssmd_bench"
STOP_TIMEOUT_S = 30.0


@dataclass
class BenchStack:
    """PostgreSQL, two NATS servers and Redis under one temporary root, stopped together."""

    root: Path
    postgres: PostgresServer
    nats_e2e: NatsServer
    nats_publish: NatsServer
    redis: RedisServer
    database_url: str

    @classmethod
    def start(cls, root: Path) -> BenchStack:
        """Start every server on free loopback ports and create the benchmark database."""
        started: list = []
        try:
            postgres = PostgresServer.start(root, die_with_parent=True)
            started.append(postgres)
            nats_e2e = NatsServer.start(root / "e2e", die_with_parent=True)
            started.append(nats_e2e)
            nats_publish = NatsServer.start(root / "publish", die_with_parent=True)
            started.append(nats_publish)
            redis = RedisServer.start(root, die_with_parent=True)
            started.append(redis)
            database_url = postgres.create_database(DATABASE)
        except BaseException:
            for server in reversed(started):
                server.stop()
            raise
        return cls(root, postgres, nats_e2e, nats_publish, redis, database_url)

    def stop(self) -> None:
        for server in (self.redis, self.nats_publish, self.nats_e2e, self.postgres):
            try:
                server.stop()
            except Exception as exc:  # keep stopping the others
                log.warning("stopping %s failed: %s", server.name, exc)


@dataclass
class Daemon:
    """One `ssmd cdc` or `ssmd cache` subprocess, its log file and its memory figures."""

    name: str
    command: list[str]
    environment: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = field(default=None, repr=False)

    @classmethod
    def for_subcommand(cls, subcommand: str, name: str, environment: dict[str, str], directory: Path, *, arguments: tuple[str, ...] = (), profile_path: Path | None = None) -> Daemon:
        """Build `python -m ssmd <subcommand>`, under cProfile when a profile path is given."""
        command = [sys.executable]
        if profile_path is not None:
            command += ["-m", "cProfile", "-o", str(profile_path)]
        command += ["-m", "ssmd", subcommand, *arguments]
        return cls(name, command, environment, directory / f"{name}.log")

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None else 0

    def start(self) -> None:
        environment = {**os.environ, **self.environment}
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(self.command, env=environment, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log.info("started %s pid=%s", self.name, self.process.pid)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check_running(self) -> None:
        """Raise with the log tail when the daemon has exited."""
        if self.process is not None and self.process.poll() is not None:
            tail = self.log_tail()
            log.error("%s exited with code %s; log tail:\n%s", self.name, self.process.returncode, tail)
            last_line = tail.splitlines()[-1] if tail.strip() else "(empty log)"
            raise RuntimeError(f"{self.name} exited with code {self.process.returncode}: {last_line}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Send SIGTERM, wait for a clean exit (SIGKILL after `timeout`), return the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s after SIGTERM; killing pid=%s", self.name, timeout, self.process.pid)
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def memory_kib(self) -> dict[str, int]:
        """Return VmRSS and VmHWM (peak RSS) in KiB from /proc/PID/status."""
        figures: dict[str, int] = {}
        try:
            with open(f"/proc/{self.pid}/status") as handle:
                for line in handle:
                    name, _, rest = line.partition(":")
                    if name in ("VmRSS", "VmHWM"):
                        figures[name] = int(rest.split()[0])
        except (OSError, ValueError, IndexError):
            pass
        return figures

    def reset_peak_rss(self) -> bool:
        """Reset VmHWM to the current RSS (Linux 4.0+ `clear_refs` value 5); False when refused."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as handle:
                handle.write("5")
        except OSError as exc:
            log.warning("cannot reset the peak RSS of %s pid=%s: %s", self.name, self.pid, exc)
            return False
        return True


def wait_until(condition, timeout: float, what: str, *, interval: float = 0.05, daemons: tuple[Daemon, ...] = ()):
    """Poll `condition()` until it returns a true value and return that value.

    Raises TimeoutError naming `what` after `timeout` seconds, and RuntimeError as soon as one of
    `daemons` has exited.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for daemon in daemons:
            daemon.check_running()
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
