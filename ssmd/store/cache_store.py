"""Redis connections and the cache's key-level operations: meta hash, SCAN, sweep.

Nothing here uses KEYS, FLUSHALL or FLUSHDB, so the cache runs under an ACL user without
them. Namespaces are walked with SCAN MATCH until the cursor returns to 0.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping, Sequence

import redis
from redis.asyncio import Redis
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from ssmd.config import redact_url
from ssmd.core.errors import ConfigError, DependencyError
from ssmd.core.keys import KeySpace
from ssmd.core.position import Position
from ssmd.store.scripts import BlockingScriptRunner, Script, ScriptCall, ScriptRunner

log = logging.getLogger(__name__)

SCAN_COUNT = 1000
SWEEP_BATCH = 1000
# The warm's sweep walks every key once, so a larger COUNT saves round trips. Redis runs each
# SCAN call alone, and COUNT bounds how long one call delays the consumer's writes.
SWEEP_SCAN_COUNT = 5000


def connect_redis(url: str, *, name: str = "ssmd") -> Redis:
    """Return an asyncio client for `url` (redis://, rediss://, with user:password if any).

    RESP2 and no library name: redis-py 8 otherwise sends `CLIENT SETINFO` and
    `CLIENT MAINT_NOTIFICATIONS` on every new connection, which Redis 7.0 rejects with errors
    that redis-py ignores but the server logs and counts.
    """
    try:
        return Redis.from_url(
            url, protocol=2, driver_info=None, client_name=name,
            health_check_interval=30, socket_keepalive=True,
        )
    except ValueError as exc:
        raise ConfigError(f"invalid REDIS_URL {redact_url(url)!r}: {exc}") from None


def connect_redis_blocking(url: str, *, name: str = "ssmd") -> redis.Redis:
    """Return a blocking client with the same settings as `connect_redis` (for worker threads)."""
    try:
        return redis.Redis.from_url(url, protocol=2, driver_info=None, client_name=name, socket_keepalive=True)
    except ValueError as exc:
        raise ConfigError(f"invalid REDIS_URL {redact_url(url)!r}: {exc}") from None


async def ping(client: Redis, url: str) -> None:
    """Check the connection and credentials, raising an error that names the server."""
    try:
        await client.ping()
    except AuthenticationError as exc:
        raise ConfigError(f"Redis at {redact_url(url)} rejected the credentials: check the user and password in REDIS_URL") from exc
    except (RedisError, OSError) as exc:
        raise DependencyError(f"cannot connect to Redis at {redact_url(url)}: {exc}; check that redis-server runs there or fix REDIS_URL") from exc


class CacheStore:
    """The cache's Redis operations under one key space."""

    def __init__(self, client: Redis, keyspace: KeySpace) -> None:
        self.client = client
        self.keyspace = keyspace
        self.scripts = ScriptRunner(client)
        self.meta_key = f"{keyspace.prefix}:meta"

    # --- meta hash ---------------------------------------------------------------------

    async def read_meta(self) -> dict[str, str]:
        """Return the meta hash (empty when Redis has none, e.g. after it lost its data)."""
        raw = await self._call(self.client.hgetall(self.meta_key), "HGETALL meta")
        return {key.decode(): value.decode() for key, value in raw.items()}

    async def write_meta(self, fields: Mapping[str, str | int | float]) -> None:
        await self._call(self.client.hset(self.meta_key, mapping={key: str(value) for key, value in fields.items()}), "HSET meta")

    # --- namespaces ----------------------------------------------------------------------

    async def scan(self, pattern: str) -> AsyncIterator[bytes]:
        """Yield every key matching `pattern` by SCAN (a key may be yielded twice)."""
        cursor = 0
        while True:
            cursor, keys = await self._call(self.client.scan(cursor, match=pattern, count=SCAN_COUNT), "SCAN")
            for key in keys:
                yield key
            if cursor == 0:
                return

    async def sweep(self, namespace: str, threshold: Position) -> int:
        """Remove every entry of `namespace` older than `threshold`, tombstones included."""
        packed = threshold.pack()
        pending: list[ScriptCall] = []
        removed = 0
        value_prefix = f"{self.keyspace.prefix}:{namespace}:"
        for pattern in (self.keyspace.namespace_pattern(namespace), "{" + value_prefix + "*}:v"):
            async for raw in self.scan(pattern):
                key = raw.decode()
                value_key = key[1:-3] if key.startswith("{") else key
                if not value_key.startswith(value_prefix):
                    continue
                pending.append(ScriptCall(Script.SWEEP_ONE, (value_key, self.keyspace.version_key_of(value_key)), (packed,)))
                if len(pending) >= SWEEP_BATCH:
                    removed += sum(await self.scripts.run(pending))
                    pending = []
        removed += sum(await self.scripts.run(pending))
        return removed

    async def read_namespace(self, namespace: str) -> dict[str, bytes]:
        """Return every value key of `namespace` with its value (for verify)."""
        keys = [raw async for raw in self.scan(self.keyspace.namespace_pattern(namespace))]
        values: dict[str, bytes] = {}
        for start in range(0, len(keys), SCAN_COUNT):
            chunk = keys[start : start + SCAN_COUNT]
            found = await self._call(self.client.mget(chunk), "MGET")
            for key, value in zip(chunk, found):
                if value is not None:
                    values[key.decode()] = value
        return values

    async def read_versions(self, value_keys: list[str]) -> dict[str, str]:
        """Return the stored version of each value key that has one."""
        versions: dict[str, str] = {}
        for start in range(0, len(value_keys), SCAN_COUNT):
            chunk = value_keys[start : start + SCAN_COUNT]
            found = await self._call(self.client.mget([self.keyspace.version_key_of(key) for key in chunk]), "MGET")
            versions.update({key: value.decode() for key, value in zip(chunk, found) if value is not None})
        return versions

    async def _call(self, awaitable, what: str):
        try:
            return await awaitable
        except ResponseError as exc:
            if "NOPERM" in str(exc) or "no permissions" in str(exc).lower():
                raise ConfigError(f"Redis user lacks a permission for {what}: {exc}; grant it with ACL SETUSER") from exc
            raise DependencyError(f"Redis {what} failed: {exc}") from exc
        except (RedisError, OSError) as exc:
            raise DependencyError(f"Redis {what} failed: {exc}") from exc


def sweep_blocking(client: redis.Redis, keyspace: KeySpace, namespaces: str | Sequence[str], threshold: Position) -> int:
    """Remove every entry of the namespaces older than `threshold`, on a blocking client.

    One SCAN pass over the key space serves every namespace, matching value keys and version
    keys under the prefix. One MGET of the version keys per SCAN reply leaves out the entries
    at or above the threshold, because a stored version never goes down. Only the rest go
    through the sweep script, which decides again atomically.
    """
    if isinstance(namespaces, str):
        namespaces = [namespaces]
    packed = threshold.pack().encode()
    value_prefixes = _value_prefixes(keyspace, namespaces)
    scripts = BlockingScriptRunner(client)
    removed = 0
    try:
        for keys in _scan_blocking(client, f"*{keyspace.prefix}:*", SWEEP_SCAN_COUNT):
            value_keys = _namespace_value_keys(keys, value_prefixes)
            if not value_keys:
                continue
            versions = _read_versions(client, value_keys)
            candidates = [key.decode() for key, version in zip(value_keys, versions) if version is None or version < packed]
            calls = [ScriptCall(Script.SWEEP_ONE, (key, keyspace.version_key_of(key)), (packed.decode(),)) for key in candidates]
            removed += sum(scripts.run(calls))
    except (RedisError, OSError) as exc:
        raise DependencyError(f"Redis sweep of namespaces {', '.join(namespaces)} failed: {exc}") from exc
    return removed


def has_entries_blocking(client: redis.Redis, keyspace: KeySpace, namespaces: Sequence[str]) -> bool:
    """Return whether any value key or version key of the namespaces exists (SCAN until the first)."""
    value_prefixes = _value_prefixes(keyspace, namespaces)
    try:
        return any(_namespace_value_keys(keys, value_prefixes) for keys in _scan_blocking(client, f"*{keyspace.prefix}:*", SWEEP_SCAN_COUNT))
    except (RedisError, OSError) as exc:
        raise DependencyError(f"Redis scan of namespaces {', '.join(namespaces)} failed: {exc}") from exc


def _value_prefixes(keyspace: KeySpace, namespaces: Sequence[str]) -> tuple[bytes, ...]:
    return tuple(keyspace.value_key(namespace, "").encode() for namespace in namespaces)


def _namespace_value_keys(keys: list[bytes], value_prefixes: tuple[bytes, ...]) -> list[bytes]:
    """Return the value keys of the namespaces that `keys` name; a version key `{<value key>}:v` names its value key."""
    value_keys = {key[1:-3] if key[:1] == b"{" and key[-3:] == b"}:v" else key for key in keys}
    return [key for key in value_keys if key.startswith(value_prefixes)]


def _read_versions(client: redis.Redis, value_keys: list[bytes]) -> list[bytes | None]:
    # One MGET of the version keys, packed here: redis-py would encode each argument in Python.
    packed = b"*%d\r\n$4\r\nMGET\r\n%s" % (len(value_keys) + 1, b"".join([b"$%d\r\n{%s}:v\r\n" % (len(key) + 4, key) for key in value_keys]))
    pool = client.connection_pool
    connection = pool.get_connection()
    try:
        connection.send_packed_command([packed])
        return connection.read_response(disable_decoding=True)
    except BaseException:
        connection.disconnect()
        raise
    finally:
        pool.release(connection)


def _scan_blocking(client: redis.Redis, pattern: str, count: int):
    cursor = 0
    while True:
        cursor, keys = client.scan(cursor, match=pattern, count=count)
        if keys:
            yield keys
        if cursor == 0:
            return
