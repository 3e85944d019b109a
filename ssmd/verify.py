"""`ssmd verify`: compare every followed table with the Redis cache.

The database and the cache are compared at a fence: verify writes a transactional logical
message (`pg_logical_emit_message(true, 'ssmd', token)`), which `ssmd cdc` forwards as
`cdc._ssmd.mark`; once the cache's meta `applied_lsn` reaches the message's LSN, every change
committed before the fence is in Redis. Verify then reads the tables (the warm's snapshot reader
and encoder, so the bytes are comparable) and the namespaces (SCAN), and runs the invariants
checker. Writes that keep landing after the fence can make one comparison differ, so it is
repeated, with a new fence each time, until it passes or `--timeout` runs out.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time

import psycopg

from ssmd import config
from ssmd.core.errors import ConfigError, DependencyError
from ssmd.core.invariants import CacheState, DatabaseState, Violation, check
from ssmd.core.keys import KeySpace
from ssmd.core.lsn import Lsn
from ssmd.core.tables import TableInfo
from ssmd.logs import setup_logging
from ssmd.pg.catalog import check_readable, load_tables
from ssmd.pg.connect import connect
from ssmd.pg.snapshot import SnapshotReader
from ssmd.store.cache_store import CacheStore, connect_redis, ping

_SETTINGS = (config.DATABASE_URL, config.REDIS_URL, config.CDC_TABLES, config.CACHE_NAMESPACES, config.LOG_LEVEL)
POLL_S = 0.2
RETRY_PAUSE_S = 0.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_settings(parser, *_SETTINGS)
    parser.add_argument("--timeout", type=float, default=60, help="seconds to wait for the fence and for the cache to match (default 60)")


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    if not args.timeout > 0:
        raise ConfigError(f"invalid --timeout {args.timeout}: give a positive number of seconds")
    keyspace = KeySpace(namespaces=config.parse_namespaces(args.cache_namespaces))
    violations = asyncio.run(
        verify(
            config.require(args.database_url, config.DATABASE_URL),
            config.require(args.redis_url, config.REDIS_URL),
            config.parse_tables(args.cdc_tables),
            keyspace,
            timeout=args.timeout,
        )
    )
    if not violations:
        print("ssmd verify: cache matches the database")
        return 0
    for violation in violations:
        print(f"{violation.invariant}\t{violation.table_or_namespace}\t{violation.key or ''}\t{violation.detail}")
    print(f"ssmd verify: {len(violations)} violation(s)", file=sys.stderr)
    return 1


async def verify(dsn: str, redis_url: str, table_names: list[str], keyspace: KeySpace, *, timeout: float) -> list[Violation]:
    """Return the violations of the last comparison (empty when the cache matches)."""
    deadline = time.monotonic() + timeout
    # Unknown tables or a missing privilege fail here, before verify waits for a fence.
    await asyncio.to_thread(check_tables, dsn, table_names)
    client = connect_redis(redis_url, name="ssmd-verify")
    try:
        await ping(client, redis_url)
        store = CacheStore(client, keyspace)
        violations: list[Violation] | None = None
        while True:
            fence = await asyncio.to_thread(emit_fence, dsn)
            try:
                await wait_for_fence(store, fence, deadline)
            except DependencyError:
                if violations is None:
                    raise
                return violations  # out of time for a new fence: report the last comparison
            database, tables = await asyncio.to_thread(read_database, dsn, table_names)
            namespaces = {table_label(table): keyspace.namespace(table.schema, table.name) for table in tables}
            cache = await read_cache(store, set(namespaces.values()))
            violations = check(database, cache, namespaces)
            if not violations or time.monotonic() >= deadline:
                return violations
            await asyncio.sleep(RETRY_PAUSE_S)
    finally:
        await client.aclose()


def emit_fence(dsn: str) -> Lsn:
    """Write the fence message and return its LSN."""
    token = f"verify:{secrets.token_hex(8)}"
    try:
        with connect(dsn, application_name="ssmd-verify") as conn:
            (lsn_text,) = conn.execute("SELECT pg_logical_emit_message(true, 'ssmd', %s)::text", (token,)).fetchone()
    except psycopg.Error as exc:
        raise DependencyError(f"writing the verify fence failed: {exc}") from exc
    return Lsn.parse(lsn_text)


def check_tables(dsn: str, table_names: list[str]) -> None:
    """Raise ConfigError naming the first followed table that is missing or unreadable."""
    with connect(dsn, application_name="ssmd-verify") as conn:
        check_readable(conn, load_tables(conn, table_names))


def fence_reached(meta: dict[str, str], fence: Lsn) -> bool:
    """Return whether the cache contains everything committed before `fence`.

    Either the cache applied the fence message itself, or it warmed from a snapshot whose
    consistent point lies past the fence: every transaction that committed before the fence
    was written is then inside that snapshot.
    """
    if meta.get("state") != "ready":
        return False
    applied = meta.get("applied_lsn")
    snapshot = meta.get("snapshot_lsn")
    if applied and Lsn.parse(applied) >= fence:
        return True
    return bool(snapshot) and Lsn.parse(snapshot) > fence


async def wait_for_fence(store: CacheStore, fence: Lsn, deadline: float) -> None:
    """Wait until the cache contains everything committed before `fence`."""
    while True:
        meta = await store.read_meta()
        applied = meta.get("applied_lsn")
        if fence_reached(meta, fence):
            return
        if time.monotonic() >= deadline:
            raise DependencyError(
                f"timed out waiting for the cache to apply fence {fence} (state {meta.get('state')!r}, applied_lsn {applied}): "
                "check that ssmd cdc and ssmd cache are running"
            )
        await asyncio.sleep(POLL_S)


def table_label(table: TableInfo) -> str:
    return table.name if table.schema == "public" else table.qualified_name


def read_database(dsn: str, table_names: list[str]) -> tuple[DatabaseState, list[TableInfo]]:
    """Read every followed table in one REPEATABLE READ snapshot, encoded as warm encodes it."""
    with SnapshotReader(dsn, export=False, application_name="ssmd-verify") as reader:
        tables = [reader.table_info(name) for name in table_names]
        state = {table_label(table): {row.key: row.value for row in reader.rows(table)} for table in tables}
    return state, tables


async def read_cache(store: CacheStore, namespaces: set[str]) -> CacheState:
    """Read every value key of the followed namespaces with its version."""
    cache: dict[str, dict[str, tuple[bytes | None, str | None]]] = {}
    for namespace in sorted(namespaces):
        values = await store.read_namespace(namespace)
        versions = await store.read_versions(list(values))
        prefix = f"{store.keyspace.prefix}:{namespace}:"
        cache[namespace] = {key[len(prefix) :]: (value, versions.get(key)) for key, value in values.items()}
    return cache
