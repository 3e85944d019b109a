"""Connections with pinned session settings and driver errors turned into ssmd errors.

wal2json and the warm path render values with the session's DateStyle, TimeZone,
extra_float_digits, bytea_output and IntervalStyle. Both paths must produce the same text, so
every connection ssmd opens pins them through the startup `options`, which the walsender honours
too.
"""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from ssmd.config import redact_url
from ssmd.core.errors import ConfigError, DependencyError

SESSION_SETTINGS = {
    "DateStyle": "ISO",
    "TimeZone": "UTC",
    "extra_float_digits": "3",
    "bytea_output": "hex",
    "IntervalStyle": "postgres",
}


def session_conninfo(dsn: str, *, application_name: str = "ssmd", **extra: str) -> str:
    """Return `dsn` with the pinned settings appended to its `options`."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(f"invalid DATABASE_URL {redact_url(dsn)!r}: {exc}") from None
    pinned = " ".join(f"-c {name}={value}" for name, value in SESSION_SETTINGS.items())
    params["options"] = f"{params.get('options', '')} {pinned}".strip()
    params.setdefault("application_name", application_name)
    params.update(extra)
    return make_conninfo(**params)


def connect(dsn: str, *, replication: bool = False, autocommit: bool = True, application_name: str = "ssmd") -> psycopg.Connection:
    """Open a pinned connection; `replication=True` opens a logical replication connection."""
    extra = {"replication": "database"} if replication else {}
    conninfo = session_conninfo(dsn, application_name=application_name, **extra)
    try:
        return psycopg.connect(conninfo, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise classify_connect_error(exc, dsn) from exc


async def connect_async(dsn: str, *, autocommit: bool = True, application_name: str = "ssmd") -> psycopg.AsyncConnection:
    """Open a pinned asyncio connection (not for replication)."""
    conninfo = session_conninfo(dsn, application_name=application_name)
    try:
        return await psycopg.AsyncConnection.connect(conninfo, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise classify_connect_error(exc, dsn) from exc


def classify_connect_error(exc: psycopg.OperationalError, dsn: str) -> Exception:
    """Turn a failed connection into a ConfigError (user must act) or DependencyError (retry)."""
    where = describe_target(dsn)
    # libpq's message spans lines ("... failed: Connection refused", then a hint): keep all of it on one line.
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    lowered = str(exc).lower()
    if "connection option" in lowered or "invalid sslmode" in lowered or "invalid value for parameter" in lowered:
        return ConfigError(f"invalid DATABASE_URL for {where}: {text.strip()}; fix the value in DATABASE_URL")
    if "password authentication failed" in lowered or "no password supplied" in lowered:
        return ConfigError(f"authentication failed for {where}: check the user and password in DATABASE_URL")
    if "does not exist" in lowered and ("database" in lowered or "role" in lowered):
        return ConfigError(f"connection to {where} failed: {text}; fix the name in DATABASE_URL")
    if "pg_hba.conf" in lowered:
        return ConfigError(f"server at {where} rejected the connection ({text}); add a pg_hba.conf entry for this user, database and host (replication connections need a 'replication' entry)")
    if "must be superuser or replication role" in lowered or "permission denied to start wal sender" in lowered:
        return ConfigError(f"user at {where} lacks the REPLICATION privilege: run ALTER ROLE <user> REPLICATION")
    return DependencyError(f"cannot connect to PostgreSQL at {where}: {text}")


def describe_target(dsn: str) -> str:
    """Return `user@host:port/dbname` for messages, without the password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<invalid DATABASE_URL>"
    user = params.get("user", "")
    host = params.get("host", "localhost")
    port = params.get("port", "5432")
    database = params.get("dbname", user)
    return f"{user + '@' if user else ''}{host}:{port}/{database}"
