"""Passwords, minimal privileges and TLS: the whole pipeline on servers that demand credentials.

The module starts one stack. PostgreSQL has SSL on and a role with a SCRAM password that has
only LOGIN, REPLICATION and SELECT on the followed tables. nats-server has TLS and one user per
daemon, each allowed only the subjects it needs. redis-server has a TLS port and an ACL user
without KEYS, FLUSHALL or FLUSHDB. The pipeline must converge (ssmd verify passes), and no log
line or output may contain any of the passwords.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import psycopg
import pytest
import redis
from psycopg import sql

from ssmd.dev.sample import apply_schema, load_sample
from ssmd.dev.servers import PG_OS_USER, free_port
from tests.integration.faults_support import (
    REPOSITORY, BackgroundWorkload, ConfiguredNats, ConfiguredRedis, Daemon, PasswordPostgres, make_certificates,
    slot_active, wait_until,
)

PG_PASSWORD = "pg-" + uuid.uuid4().hex
CDC_NATS_PASSWORD = "natscdc-" + uuid.uuid4().hex
CACHE_NATS_PASSWORD = "natscache-" + uuid.uuid4().hex
REDIS_PASSWORD = "redis-" + uuid.uuid4().hex
NATS_TOKEN = "token-" + uuid.uuid4().hex
PASSWORDS = (PG_PASSWORD, CDC_NATS_PASSWORD, CACHE_NATS_PASSWORD, REDIS_PASSWORD, NATS_TOKEN)
TABLES = ("events", "markets", "series_fees")

# The minimal grants, also shown in the README.
PG_ROLE_SQL = """
CREATE ROLE ssmd_app LOGIN REPLICATION PASSWORD {password};
GRANT SELECT ON events, markets, series_fees TO ssmd_app;
"""
# Commands allowed to the Redis user: enough for ssmd cache, its Lua scripts and ssmd verify.
REDIS_ACL = (
    "on", f">{REDIS_PASSWORD}", "resetkeys", "~secmaster:*", "~{secmaster:*", "resetchannels", "-@all",
    "+ping", "+hello", "+auth", "+select", "+client|setname", "+info",
    "+get", "+set", "+del", "+unlink", "+exists", "+mget", "+scan",
    "+hget", "+hset", "+hgetall", "+hdel",
    "+evalsha", "+eval", "+script|load", "+script|exists",
)
NATS_CONFIG = """
tls {{
  cert_file: "{cert}"
  key_file: "{key}"
}}
authorization {{
  users = [
    {{ user: "ssmd_cdc", password: "{cdc_password}",
       permissions: {{ publish: ["cdc.>", "$JS.API.>"], subscribe: ["_INBOX.>"] }} }}
    {{ user: "ssmd_cache", password: "{cache_password}",
       permissions: {{ publish: ["$JS.API.>", "$JS.ACK.>"], subscribe: ["_INBOX.>"] }} }}
  ]
}}
"""

# A NATS server that verifies clients: each must present a certificate the CA signed.
CLIENT_CERT_NATS_CONFIG = """
tls {{
  cert_file: "{cert}"
  key_file: "{key}"
  ca_file: "{ca}"
  verify: true
}}
"""


@pytest.fixture(scope="module")
def secured():
    """Start the three secured servers; yield (cdc env, cache env, root directory, servers)."""
    root = Path(tempfile.mkdtemp(prefix="ssmd-secure-", dir="/tmp"))
    root.chmod(0o755)
    certificates = make_certificates(root / "tls")
    servers = []
    try:
        postgres = PasswordPostgres.start(root, die_with_parent=True)
        servers.append(postgres)
        _enable_postgres_ssl(postgres, certificates)

        nats_config = NATS_CONFIG.format(
            cert=certificates["server.crt"], key=certificates["server.key"],
            cdc_password=CDC_NATS_PASSWORD, cache_password=CACHE_NATS_PASSWORD,
        )
        nats_server = ConfiguredNats.start_with(root, nats_config, scheme="tls")
        servers.append(nats_server)

        tls_port = free_port()
        redis_server = ConfiguredRedis.start_with(
            root, "--tls-port", str(tls_port), "--tls-cert-file", str(certificates["server.crt"]),
            "--tls-key-file", str(certificates["server.key"]), "--tls-ca-cert-file", str(certificates["ca.crt"]),
            "--tls-auth-clients", "no",
        )
        servers.append(redis_server)

        with psycopg.connect(postgres.url, autocommit=True) as conn:
            conn.execute("CREATE DATABASE secmaster")
        secmaster = postgres.url_for("secmaster")
        apply_schema(secmaster)
        load_sample(secmaster, markets=200, seed=7)
        with psycopg.connect(secmaster, autocommit=True) as conn:
            conn.execute(sql.SQL(PG_ROLE_SQL).format(password=sql.Literal(PG_PASSWORD)))
        with redis.Redis(host="127.0.0.1", port=redis_server.port) as client:
            client.execute_command("ACL", "SETUSER", "ssmd", *REDIS_ACL)

        common = {
            "DATABASE_URL": postgres.app_url("secmaster", PG_PASSWORD, "?sslmode=verify-full&sslrootcert=" + str(certificates["ca.crt"])),
            "NATS_URL": nats_server.url,
            "NATS_TLS_CA": str(certificates["ca.crt"]),
            "REDIS_URL": f"rediss://ssmd:{REDIS_PASSWORD}@127.0.0.1:{tls_port}/0?ssl_ca_certs={certificates['ca.crt']}",
            "NATS_STREAM": "SECURE",
            "REPLICATION_SLOT": "ssmd_secure",
            "CDC_TABLES": ",".join(TABLES),
        }
        cdc_env = {**common, "NATS_USER": "ssmd_cdc", "NATS_PASSWORD": CDC_NATS_PASSWORD}
        cache_env = {**common, "NATS_USER": "ssmd_cache", "NATS_PASSWORD": CACHE_NATS_PASSWORD}
        yield cdc_env, cache_env, root, (postgres, nats_server, redis_server)
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _enable_postgres_ssl(postgres: PasswordPostgres, certificates: dict[str, Path]) -> None:
    """Copy the server certificate into the data directory (owned by postgres, mode 0600) and turn SSL on."""
    account = pwd.getpwnam(PG_OS_USER) if os.geteuid() == 0 else None
    for name in ("server.crt", "server.key"):
        target = postgres.data_directory / name
        shutil.copyfile(certificates[name], target)
        if account is not None:
            os.chown(target, account.pw_uid, account.pw_gid)
        target.chmod(0o600)
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET ssl = on")
        conn.execute("ALTER SYSTEM SET ssl_cert_file = 'server.crt'")
        conn.execute("ALTER SYSTEM SET ssl_key_file = 'server.key'")
        conn.execute("SELECT pg_reload_conf()")


def _leaks(text: str) -> list[str]:
    return [password[:10] + "…" for password in PASSWORDS if password in text]


def test_pipeline_with_passwords_and_tls(secured):
    cdc_env, cache_env, root, _ = secured
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    cdc = Daemon("cdc", cdc_env, logs / "cdc.log")
    cache = None
    try:
        wait_until(lambda: _slot_active(secured), 30, "the replication slot to become active", cdc)
        cache = Daemon("cache", cache_env, logs / "cache.log", "--check-interval", "1")
        wait_until(lambda: _cache_ready(secured), 60, "cache state ready", cache)

        workload = BackgroundWorkload(_superuser_url(secured), seed=11).start()
        wait_until(lambda: workload.changes >= 100, 30, "100 committed changes")
        assert _ssl_sessions(secured) == (True, True), "ssmd_app sessions without SSL"
        changes = workload.stop()
        assert changes >= 100

        verify = subprocess.run(
            [sys.executable, "-m", "ssmd", "verify", "--timeout", "60"],
            env={**os.environ, **cache_env}, cwd=REPOSITORY, capture_output=True, text=True, timeout=120,
        )
        assert verify.returncode == 0, f"{verify.stdout}\n{verify.stderr}\n{cdc.log_tail()}\n{cache.log_tail()}"
        assert _leaks(verify.stdout + verify.stderr) == []
    finally:
        for daemon in (cache, cdc):
            if daemon is not None:
                daemon.stop()
    for daemon in (cdc, cache):
        text = daemon.log_text()
        assert _leaks(text) == [], f"password found in the ssmd {daemon.command} log"
        assert "Traceback" not in text, daemon.log_tail()
        assert " ERROR " not in text, daemon.log_tail()


def _ssl_sessions(secured) -> tuple[bool, bool]:
    """Return (any ssmd_app session, every ssmd_app session uses SSL), replication included."""
    with psycopg.connect(_superuser_url(secured), autocommit=True) as conn:
        count, all_ssl = conn.execute(
            "SELECT count(*), coalesce(bool_and(s.ssl), false) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) WHERE a.usename = 'ssmd_app'"
        ).fetchone()
    return count > 0, all_ssl


def _superuser_url(secured) -> str:
    postgres = secured[3][0]
    return postgres.url_for("secmaster")


def _slot_active(secured) -> bool:
    return slot_active({"DATABASE_URL": _superuser_url(secured), "REPLICATION_SLOT": secured[0]["REPLICATION_SLOT"]})


def _cache_ready(secured) -> bool:
    redis_server = secured[3][2]
    with redis.Redis(host="127.0.0.1", port=redis_server.port, username="ssmd", password=REDIS_PASSWORD) as client:
        return client.hget("secmaster:meta", "state") == b"ready"


def test_role_is_not_superuser(secured):
    with psycopg.connect(_superuser_url(secured), autocommit=True) as conn:
        superuser, replication = conn.execute("SELECT rolsuper, rolreplication FROM pg_roles WHERE rolname = 'ssmd_app'").fetchone()
        grants = conn.execute(
            "SELECT table_name, privilege_type FROM information_schema.role_table_grants WHERE grantee = 'ssmd_app' ORDER BY 1, 2"
        ).fetchall()
    assert superuser is False
    assert replication is True
    assert grants == [(table, "SELECT") for table in sorted(TABLES)]


@pytest.mark.parametrize("command", ["KEYS", "FLUSHALL", "FLUSHDB"])
def test_redis_user_lacks_command(secured, command):
    redis_server = secured[3][2]
    with redis.Redis(host="127.0.0.1", port=redis_server.port, username="ssmd", password=REDIS_PASSWORD) as client:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(command, *(["*"] if command == "KEYS" else []))


def test_nats_rejects_anonymous_client(secured):
    import asyncio

    import nats

    cdc_env = secured[0]

    async def connect_without_credentials() -> None:
        import ssl

        context = ssl.create_default_context(cafile=cdc_env["NATS_TLS_CA"])
        client = await nats.connect(cdc_env["NATS_URL"], tls=context, connect_timeout=5, max_reconnect_attempts=0, allow_reconnect=False)
        await client.close()

    with pytest.raises(Exception, match="(?i)authorization"):
        asyncio.run(connect_without_credentials())


def test_nats_token_accepted():
    # A server that accepts only a token; the daemons' NATS connection must log in with it.
    root = Path(tempfile.mkdtemp(prefix="ssmd-token-", dir="/tmp"))
    server = ConfiguredNats.start_with(root, f'authorization {{ token: "{NATS_TOKEN}" }}\n')
    try:
        import asyncio

        from ssmd.bus.connect import NatsAuth, connect_nats

        async def connect_and_close() -> None:
            client = await connect_nats(server.url, name="ssmd-test", auth=NatsAuth(token=NATS_TOKEN))
            await client.close()

        asyncio.run(connect_and_close())
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_nats_client_certificate_required():
    # A server that verifies clients: the daemons' NATS connection presents NATS_TLS_CERT/KEY.
    import asyncio

    from ssmd.bus.connect import NatsAuth, connect_nats
    from ssmd.core.errors import ConfigError

    root = Path(tempfile.mkdtemp(prefix="ssmd-mtls-", dir="/tmp"))
    root.chmod(0o755)
    certificates = {name: str(path) for name, path in make_certificates(root / "tls").items()}
    config = CLIENT_CERT_NATS_CONFIG.format(cert=certificates["server.crt"], key=certificates["server.key"], ca=certificates["ca.crt"])
    server = ConfiguredNats.start_with(root, config, scheme="tls")
    with_certificate = NatsAuth(tls_ca_file=certificates["ca.crt"], tls_cert_file=certificates["client.crt"], tls_key_file=certificates["client.key"])

    async def connect_and_flush(auth: NatsAuth) -> None:
        client = await connect_nats(server.url, name="ssmd-test", auth=auth)
        try:
            await client.flush(timeout=5)
        finally:
            await client.close()

    try:
        asyncio.run(connect_and_flush(with_certificate))
        with pytest.raises(ConfigError, match="TLS handshake with NATS at tls://127.0.0.1") as rejected:
            asyncio.run(connect_and_flush(NatsAuth(tls_ca_file=certificates["ca.crt"])))
        assert "NATS_TLS_CERT" in str(rejected.value)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_missing_creds_file_one_line(secured):
    cdc_env = secured[0]
    missing = "/tmp/ssmd-no-such-dir/ssmd.creds"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "ssmd", "cdc", "--nats-creds", missing],
            env={**os.environ, **cdc_env, "REPLICATION_SLOT": "ssmd_creds"}, cwd=REPOSITORY, capture_output=True, text=True, timeout=15,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"ssmd cdc still ran after 15 s with a missing creds file:\n{exc.stderr}") from None
    assert result.returncode not in (0, None)
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert missing in result.stderr.splitlines()[-1], result.stderr[-3000:]
    assert _leaks(result.stderr) == []
