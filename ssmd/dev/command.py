"""`ssmd dev up` and `ssmd dev down`: a throwaway PostgreSQL, NATS and Redis stack on loopback.

`up` starts the three servers under DIR (default `.ssmd-dev`), creates the `secmaster` database
with the sample schema, and writes DIR/env with `export DATABASE_URL=... NATS_URL=...
REDIS_URL=...` lines that it also prints. Running `up` again reuses servers that still run.
`down` stops them by the pids recorded under DIR, from any process.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from ssmd.config import DATABASE_URL, NATS_URL, REDIS_URL
from ssmd.dev.sample import apply_schema, load_sample
from ssmd.dev.servers import NatsServer, PostgresServer, RedisServer, ServerProcess

DEFAULT_DIR = ".ssmd-dev"
DATABASE_NAME = "secmaster"
ENV_FILE = "env"


@dataclass
class DevStack:
    """The three running servers of one stack directory."""

    root: Path
    postgres: PostgresServer
    nats: NatsServer
    redis: RedisServer

    @property
    def database_url(self) -> str:
        return self.postgres.url_for(DATABASE_NAME)

    def env(self) -> dict[str, str]:
        """Environment for ssmd processes using this stack: no password, loopback URLs only."""
        return {DATABASE_URL.env: self.database_url, NATS_URL.env: self.nats.url, REDIS_URL.env: self.redis.url}

    def servers(self) -> tuple[ServerProcess, ...]:
        return (self.postgres, self.nats, self.redis)

    def stop(self) -> None:
        """Stop the servers in reverse order of start."""
        for server in reversed(self.servers()):
            server.stop()


def start_stack(root: Path, *, die_with_parent: bool = False, report=None) -> DevStack:
    """Start (or reuse) the servers under `root`, create the database and write `root/env`.

    If one server fails to start, the servers this call started are stopped again.
    """
    root = Path(root).absolute()
    started: list[ServerProcess] = []
    servers: dict[str, ServerProcess] = {}
    try:
        for server_class, options in ((PostgresServer, {}), (NatsServer, {"monitor": True}), (RedisServer, {})):
            server = server_class.attach(root)
            if server is None:
                server = server_class.start(root, die_with_parent=die_with_parent, **options)
                started.append(server)
                action = "started"
            else:
                action = "reused"
            if report is not None:
                report(f"{server.name}: {action}, pid {server.pid}, {server.url}")
            servers[server.name] = server
        stack = DevStack(root=root, postgres=servers["postgres"], nats=servers["nats"], redis=servers["redis"])
        _create_database(stack.postgres, DATABASE_NAME)
        apply_schema(stack.database_url)
    except BaseException:
        for server in reversed(started):
            server.stop()
        raise

    (root / ENV_FILE).write_text(format_env(stack.env()))
    return stack


def stop_stack(root: Path, *, report=None) -> int:
    """Stop every server recorded under `root` that still runs; return how many were stopped."""
    root = Path(root).absolute()
    stopped = 0
    for server_class in (RedisServer, NatsServer, PostgresServer):
        server = server_class.attach(root)
        state_file = root / f"{server_class.name}.json"
        if server is None:
            state_file.unlink(missing_ok=True)
            continue
        server.stop()
        stopped += 1
        if report is not None:
            report(f"{server.name}: stopped pid {server.pid}")
    (root / ENV_FILE).unlink(missing_ok=True)
    return stopped


def format_env(env: dict[str, str]) -> str:
    # The URLs contain no characters a POSIX shell treats specially, so they need no quoting.
    return "".join(f"export {name}={value}\n" for name, value in env.items())


def _create_database(server: PostgresServer, name: str) -> None:
    with psycopg.connect(server.url, autocommit=True) as connection:
        exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists is None:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="dev_action", metavar="ACTION", required=True)
    up = actions.add_parser("up", help="start the stack (or reuse running servers) and write DIR/env")
    up.add_argument("--dir", default=DEFAULT_DIR, help=f"directory for the servers' data, logs and env file (default {DEFAULT_DIR})")
    up.add_argument("--sample", type=int, default=0, metavar="MARKETS", help="load this many sample markets into empty tables (default 0)")
    down = actions.add_parser("down", help="stop the servers recorded under DIR")
    down.add_argument("--dir", default=DEFAULT_DIR, help=f"directory given to `ssmd dev up` (default {DEFAULT_DIR})")


def run(args: argparse.Namespace) -> int:
    root = Path(args.dir)
    if args.dev_action == "up":
        stack = start_stack(root, report=_report)
        if args.sample:
            counts = load_sample(stack.database_url, markets=args.sample)
            _report("sample rows loaded: " + ", ".join(f"{table}={count}" for table, count in counts.as_dict().items()))
        print(format_env(stack.env()), end="")
        _report(f"to use it: . {root / ENV_FILE}")
        return 0

    if stop_stack(root, report=_report) == 0:
        _report(f"no running servers recorded under {root}")
    return 0


def _report(line: str) -> None:
    # Progress goes to stderr, so stdout contains only the export lines (`eval "$(ssmd dev up)"`).
    print(line, file=sys.stderr)
