"""Start-up errors of `ssmd cdc`, `ssmd cache` and `ssmd verify` against real servers.

Every bad setting must end the process with a non-zero status and exactly one error line on
stderr that names the bad value and the fix, without a traceback. INFO log lines written before
the check (the daemon's "starting" line) are allowed. Warnings count as extra lines, because a
daemon that retries a hopeless start-up prints them forever.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import nats
import psycopg
import pytest
import redis
from psycopg import sql

from ssmd.dev.sample import apply_schema
from ssmd.dev.servers import free_port
from tests.integration.faults_support import ConfiguredNats, ConfiguredRedis, PasswordPostgres

REPOSITORY = Path(__file__).resolve().parents[2]
EXIT_WITHIN_S = 6  # seconds within which a start-up error must end the process
PASSWORD = "s3cret-" + uuid.uuid4().hex[:12]


def run_ssmd(command: str, env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    """Run `python -m ssmd <command>` and kill it if it still runs after EXIT_WITHIN_S."""
    full_env = {key: value for key, value in os.environ.items() if key != "LOG_LEVEL"}
    full_env.update(env)
    process = subprocess.Popen(
        [sys.executable, "-m", "ssmd", command, *flags], env=full_env, cwd=REPOSITORY,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=EXIT_WITHIN_S)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
        return subprocess.CompletedProcess(process.args, None, stdout, stderr)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def error_lines(stderr: str) -> list[str]:
    """Return stderr lines other than INFO and DEBUG log records."""
    return [line for line in stderr.splitlines() if line.strip() and not _is_quiet_log_line(line)]


def _is_quiet_log_line(line: str) -> bool:
    parts = line.split(" ", 3)
    return len(parts) >= 3 and parts[2] in ("INFO", "DEBUG")


def assert_one_error(result: subprocess.CompletedProcess, command: str, *mentions: str) -> None:
    """Check the start-up error contract: exited, non-zero, one error line naming value and fix."""
    shown = f"exit {result.returncode}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode is not None, f"ssmd {command} still ran after {EXIT_WITHIN_S} s instead of exiting:\n{shown}"
    assert result.returncode != 0, shown
    assert "Traceback" not in result.stderr, shown
    lines = error_lines(result.stderr)
    assert len(lines) == 1, f"expected exactly one error line:\n{shown}"
    assert lines[0].startswith(f"ssmd {command}: error: "), shown
    for mention in mentions:
        assert mention in lines[0], f"error line does not mention {mention!r}:\n{shown}"
    assert PASSWORD not in result.stderr + result.stdout


@pytest.fixture
def env(ssmd_env):
    apply_schema(ssmd_env["DATABASE_URL"])
    return {**ssmd_env, "CDC_TABLES": "events,markets,series_fees"}


def closed_port() -> int:
    """Return a 127.0.0.1 port that nothing listens on (free a moment ago)."""
    return free_port()


# --- bad values in settings and flags ---------------------------------------------------------

FLAG_CASES = [
    # (command, environment overrides, flags, words the error line must contain)
    ("cdc", {"DATABASE_URL": ""}, (), ("DATABASE_URL is not set", "--database-url")),
    ("cache", {"DATABASE_URL": ""}, (), ("DATABASE_URL is not set", "--database-url")),
    ("verify", {"DATABASE_URL": ""}, (), ("DATABASE_URL is not set", "--database-url")),
    ("cdc", {"POLL_INTERVAL_MS": "soon"}, (), ("POLL_INTERVAL_MS", "'soon'", "whole number")),
    ("cdc", {"REPLICATION_SLOT": "Bad-Slot"}, (), ("REPLICATION_SLOT", "'Bad-Slot'")),
    ("cdc", {"CDC_TABLES": "markets;drop"}, (), ("CDC_TABLES", "'markets;drop'")),
    ("cache", {"CDC_TABLES": " , "}, (), ("CDC_TABLES",)),
    ("cache", {"CACHE_NAMESPACES": "markets"}, (), ("CACHE_NAMESPACES", "'markets'", "table=namespace")),
    ("cdc", {"METRICS_PORT": "http"}, (), ("METRICS_PORT", "'http'")),
    ("cdc", {}, ("--max-in-flight", "0"), ("--max-in-flight", "0", "at least 1")),
    ("cdc", {}, ("--stream-max-messages", "-5"), ("--stream-max-messages", "-5", "negative")),
    ("cache", {}, ("--max-deliver", "0"), ("--max-deliver", "0", "at least 1")),
    ("cache", {}, ("--ack-wait", "0"), ("--ack-wait", "0", "positive")),
    ("cdc", {"LOG_LEVEL": "LOUD"}, (), ("LOG_LEVEL", "'LOUD'")),
    ("cache", {"LOG_LEVEL": "LOUD"}, (), ("LOG_LEVEL", "'LOUD'")),
    ("verify", {"LOG_LEVEL": "LOUD"}, (), ("LOG_LEVEL", "'LOUD'")),
    ("verify", {}, ("--timeout", "-1"), ("--timeout", "-1")),
    ("cache", {"REDIS_URL": "memcached://127.0.0.1:1"}, (), ("REDIS_URL", "memcached://", "rediss://")),
    ("verify", {"REDIS_URL": "memcached://127.0.0.1:1"}, (), ("REDIS_URL", "memcached://", "rediss://")),
    ("cdc", {"DATABASE_URL": "host=127.0.0.1 port=notaport dbname=x"}, (), ("DATABASE_URL", "port")),
    ("cdc", {"NATS_URL": "http://127.0.0.1:1"}, (), ("NATS_URL", "http://127.0.0.1:1", "nats://")),
    ("cache", {"NATS_URL": "http://127.0.0.1:1"}, (), ("NATS_URL", "http://127.0.0.1:1", "nats://")),
]


@pytest.mark.parametrize(("command", "overrides", "flags", "mentions"), FLAG_CASES, ids=lambda value: str(value)[:40])
def test_bad_setting_one_line(env, command, overrides, flags, mentions):
    result = run_ssmd(command, {**env, **overrides}, *flags, *(("--timeout", "3") if command == "verify" and not flags else ()))
    assert_one_error(result, command, *mentions)


@pytest.mark.parametrize("command", ["cdc", "cache"])
def test_flag_type_error_names_value(env, command):
    # argparse rejects a value of the wrong type itself: it prints its usage, then one error line.
    result = run_ssmd(command, env, "--ack-timeout" if command == "cdc" else "--ack-wait", "soon")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("usage: ssmd")
    errors = [line for line in lines if "error:" in line]
    assert errors == [lines[-1]]
    assert "'soon'" in lines[-1]
    assert "invalid float value" in lines[-1]


# --- database objects ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["cdc", "cache"])
def test_unknown_table_named(env, command):
    result = run_ssmd(command, {**env, "CDC_TABLES": "markets,nosuch"}, *(("--timeout", "3") if command == "verify" else ()))
    assert_one_error(result, command, "nosuch", "CDC_TABLES")


def test_verify_unknown_table_named(env):
    # verify compares only after the cache reached its fence, but a table that does not exist
    # is a setting error it can report at once.
    result = run_ssmd("verify", {**env, "CDC_TABLES": "markets,nosuch"}, "--timeout", "3")
    assert_one_error(result, "verify", "nosuch", "CDC_TABLES")


def test_table_without_key_rejected(env):
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute("CREATE TABLE keyless (id int, note text)")
    result = run_ssmd("cdc", {**env, "CDC_TABLES": "markets,keyless"})
    assert_one_error(result, "cdc", "keyless", "REPLICA IDENTITY")


@pytest.fixture
def limited_role(env, pg_server):
    """A LOGIN role without REPLICATION and without SELECT on the tables; dropped afterwards."""
    role = f"h7_limited_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    database = env["DATABASE_URL"].rsplit("/", 1)[1]
    yield role, f"postgresql://{role}@127.0.0.1:{pg_server.port}/{database}"
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        conn.execute(sql.SQL("REVOKE ALL ON markets, events, series_fees FROM {}").format(sql.Identifier(role)))
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_cdc_without_replication_privilege(env, limited_role):
    role, url = limited_role
    result = run_ssmd("cdc", {**env, "DATABASE_URL": url})
    assert_one_error(result, "cdc", role, "REPLICATION", "ALTER ROLE")


def create_stream(env: dict[str, str]) -> None:
    """Create the change stream as `ssmd cdc` would, because the cache waits for it before warming."""
    from ssmd.bus.stream import StreamLimits, ensure_stream

    async def create() -> None:
        client = await nats.connect(env["NATS_URL"], connect_timeout=5, max_reconnect_attempts=0)
        try:
            await ensure_stream(client.jetstream(), env["NATS_STREAM"], StreamLimits())
        finally:
            await client.close()

    asyncio.run(create())


def test_cache_without_replication_privilege(env, limited_role):
    role, url = limited_role
    create_stream(env)
    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        for name in ("markets", "events", "series_fees"):
            conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(name), sql.Identifier(role)))
    result = run_ssmd("cache", {**env, "DATABASE_URL": url})
    assert_one_error(result, "cache", role, "REPLICATION")


def test_cache_without_select_privilege(env, limited_role, pg_server):
    role, url = limited_role
    with psycopg.connect(pg_server.url, autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} REPLICATION").format(sql.Identifier(role)))
    create_stream(env)
    result = run_ssmd("cache", {**env, "DATABASE_URL": url})
    assert_one_error(result, "cache", "events", "GRANT SELECT")


def test_unknown_role_named(env, pg_server):
    database = env["DATABASE_URL"].rsplit("/", 1)[1]
    url = f"postgresql://nosuchrole@127.0.0.1:{pg_server.port}/{database}"
    for command in ("cdc", "cache", "verify"):
        result = run_ssmd(command, {**env, "DATABASE_URL": url}, *(("--timeout", "3") if command == "verify" else ()))
        assert_one_error(result, command, "nosuchrole", "DATABASE_URL")


# --- unreachable servers (a closed 127.0.0.1 port) ---------------------------------------------

UNREACHABLE = [
    ("cdc", "DATABASE_URL", "postgresql://postgres@127.0.0.1:{port}/postgres"),
    ("cdc", "NATS_URL", "nats://127.0.0.1:{port}"),
    ("cache", "DATABASE_URL", "postgresql://postgres@127.0.0.1:{port}/postgres"),
    ("cache", "NATS_URL", "nats://127.0.0.1:{port}"),
    ("cache", "REDIS_URL", "redis://127.0.0.1:{port}"),
    ("verify", "DATABASE_URL", "postgresql://postgres@127.0.0.1:{port}/postgres"),
    ("verify", "REDIS_URL", "redis://127.0.0.1:{port}"),
]


@pytest.mark.parametrize(("command", "setting", "template"), UNREACHABLE, ids=[f"{c}-{s}" for c, s, _ in UNREACHABLE])
def test_unreachable_server_exits(env, command, setting, template):
    port = closed_port()
    result = run_ssmd(command, {**env, setting: template.format(port=port)}, *(("--timeout", "3") if command == "verify" else ()))
    assert_one_error(result, command, f"127.0.0.1:{port}")


# --- bad credentials ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def password_servers():
    """PostgreSQL with a SCRAM role, NATS with a user and password, Redis with an ACL user."""
    # Under /tmp with mode 0755, because PostgreSQL runs as the postgres OS user under root.
    root = Path(tempfile.mkdtemp(prefix="ssmd-auth-", dir="/tmp"))
    root.chmod(0o755)
    postgres = PasswordPostgres.start(root, die_with_parent=True)
    nats_server = ConfiguredNats.start_with(root, f'authorization {{ user: "ssmd", password: "{PASSWORD}" }}\n')
    redis_server = ConfiguredRedis.start_with(root)
    try:
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE ROLE ssmd_app LOGIN REPLICATION PASSWORD {}").format(sql.Literal(PASSWORD)))
            conn.execute("CREATE DATABASE secmaster OWNER ssmd_app")
        apply_schema(postgres.url_for("secmaster"))
        with psycopg.connect(postgres.url_for("secmaster"), autocommit=True) as conn:
            conn.execute("GRANT SELECT ON ALL TABLES IN SCHEMA public TO ssmd_app")
        with redis.Redis(host="127.0.0.1", port=redis_server.port) as client:
            client.execute_command("ACL", "SETUSER", "ssmd", "on", f">{PASSWORD}", "~*", "+@all")
        yield postgres, nats_server, redis_server
    finally:
        for server in (redis_server, nats_server, postgres):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _auth_env(password_servers, pg_password=PASSWORD, nats_password=PASSWORD, redis_password=PASSWORD) -> dict[str, str]:
    postgres, nats_server, redis_server = password_servers
    return {
        "DATABASE_URL": postgres.app_url("secmaster", pg_password),
        "NATS_URL": nats_server.url,
        "NATS_USER": "ssmd",
        "NATS_PASSWORD": nats_password,
        "REDIS_URL": f"redis://ssmd:{redis_password}@127.0.0.1:{redis_server.port}/0",
        "NATS_STREAM": "AUTHTEST",
        "REPLICATION_SLOT": "h7_auth",
        "CDC_TABLES": "events,markets,series_fees",
    }


@pytest.mark.parametrize("command", ["cdc", "cache", "verify"])
def test_wrong_database_password(password_servers, command):
    wrong = "wrong-" + PASSWORD
    result = run_ssmd(command, _auth_env(password_servers, pg_password=wrong), *(("--timeout", "3") if command == "verify" else ()))
    assert_one_error(result, command, "ssmd_app", "password", "DATABASE_URL")
    assert wrong not in result.stderr


@pytest.mark.parametrize("command", ["cdc", "cache"])
def test_wrong_nats_password(password_servers, command):
    wrong = "wrong-" + PASSWORD
    result = run_ssmd(command, _auth_env(password_servers, nats_password=wrong))
    assert_one_error(result, command, "NATS", "password")
    assert wrong not in result.stderr


@pytest.mark.parametrize("command", ["cache", "verify"])
def test_wrong_redis_password(password_servers, command):
    wrong = "wrong-" + PASSWORD
    result = run_ssmd(command, _auth_env(password_servers, redis_password=wrong), *(("--timeout", "3") if command == "verify" else ()))
    assert_one_error(result, command, "REDIS_URL", "password")
    assert wrong not in result.stderr
