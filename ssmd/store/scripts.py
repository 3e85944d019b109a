"""The versioned Lua scripts and a pipelined runner that loads them on demand.

Each script touches the value key and the version key of one cached row, which share a Redis
Cluster hash slot; anything else a script needs (a truncate floor, the snapshot point) arrives
in ARGV. Scripts run by EVALSHA. A server that lost its script cache (restart, SCRIPT FLUSH,
fail-over) answers NOSCRIPT; the runner then loads the scripts again and reruns the whole
batch, which is safe because every script is idempotent at a given version.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from dataclasses import dataclass
from enum import Enum
from importlib import resources

import redis
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from ssmd.core.errors import DependencyError

log = logging.getLogger(__name__)


class Script(str, Enum):
    """The scripts under `ssmd/store/lua/`; the value is the file name without `.lua`."""

    APPLY_WRITE = "apply_write"
    APPLY_DELETE = "apply_delete"
    APPLY_MERGE = "apply_merge"
    SWEEP_ONE = "sweep_one"


# Script results (see the comment at the top of each .lua file).
APPLIED = 1
STALE = 0
BELOW_FLOOR = -1
CHANGED_SINCE_READ = -2


def script_source(script: Script) -> str:
    return resources.files("ssmd.store").joinpath("lua", f"{script.value}.lua").read_text()


_SOURCES = {script: script_source(script) for script in Script}
_SHAS = {script: hashlib.sha1(source.encode()).hexdigest() for script, source in _SOURCES.items()}
_SHA_BYTES = {script: sha.encode() for script, sha in _SHAS.items()}


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One script invocation: its two keys (value key, version key) and its arguments."""

    script: Script
    keys: tuple[str, str]
    args: tuple[str | bytes, ...]


def pack_calls(calls: list[ScriptCall]) -> bytes:
    """Return the RESP arrays of `EVALSHA <sha> 2 <keys> <args>` for every call, in order."""
    return b"".join([_pack_command((b"EVALSHA", _SHA_BYTES[call.script], b"2", *call.keys, *call.args)) for call in calls])


def _pack_command(arguments: tuple[str | bytes, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(arguments)]
    for argument in arguments:
        if isinstance(argument, str):
            argument = argument.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(argument), argument))
    return b"".join(parts)


class ScriptRunner:
    """Runs batches of script calls in one pipeline round trip.

    redis-py's pipeline packs each command's arguments one by one and keeps an object per
    command; the cache applies one script call per changed key, so the runner packs the RESP
    arrays of a batch itself (`pack_calls`) and reads the replies on one pooled connection.
    """

    def __init__(self, client: Redis) -> None:
        self._client = client

    async def load(self) -> None:
        """Load every script into the server's script cache (SCRIPT LOAD)."""
        try:
            for script, source in _SOURCES.items():
                sha = await self._client.script_load(source)
                if sha != _SHAS[script]:
                    raise DependencyError(f"Redis returned sha {sha} for script {script.value}, expected {_SHAS[script]}")
        except RedisError as exc:
            raise DependencyError(f"loading Lua scripts into Redis failed: {exc}") from exc

    async def run(self, calls: list[ScriptCall]) -> list[int]:
        """Run `calls` in order in one pipeline and return each script's result."""
        if not calls:
            return []
        results = await self._run_once(calls)
        if any(isinstance(result, NoScriptError) for result in results):
            log.warning("Redis script cache is missing ssmd's scripts; loading them and rerunning batch size=%d", len(calls))
            await self.load()
            results = await self._run_once(calls)

        errors = [result for result in results if isinstance(result, Exception)]
        if errors:
            raise DependencyError(f"Redis rejected {len(errors)} of {len(calls)} script calls, first: {errors[0]}")
        return [int(result) for result in results]

    async def _run_once(self, calls: list[ScriptCall]) -> list:
        # The replies are read on the connection directly, like a pipeline without redis-py's
        # per-command objects, and an error reply becomes that call's result. The socket timeout
        # bounds the whole batch, because a timeout context per reply took about 4 % of the
        # cache's CPU in a profile.
        # NOTE: a redis-py release without the `math.inf` case (8.2.0 has it) still enters an
        # unbounded timeout context per reply: correct, only without the saving.
        packed = pack_calls(calls)
        pool = self._client.connection_pool
        try:
            connection = await pool.get_connection()
        except (RedisError, OSError) as exc:
            raise DependencyError(f"Redis pipeline of {len(calls)} script calls failed: {exc}") from exc
        try:
            await connection.send_packed_command([packed])
            results: list = []
            async with asyncio.timeout(connection.socket_timeout):
                for _ in calls:
                    try:
                        results.append(await connection.read_response(disable_decoding=True, timeout=math.inf))
                    except ResponseError as exc:
                        results.append(exc)
            return results
        except BaseException as exc:
            # Replies of this batch may be left on the socket (an error or a cancelled task).
            await connection.disconnect()
            if isinstance(exc, (RedisError, OSError)):
                raise DependencyError(f"Redis pipeline of {len(calls)} script calls failed: {exc}") from exc
            raise
        finally:
            await pool.release(connection)


class BlockingScriptRunner:
    """`ScriptRunner` on a blocking client, for the warm's worker thread.

    redis-py's blocking pipeline costs a fraction of the asyncio one per command (no timeout
    and future per response), and the warm sends one script call per row.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def load(self) -> None:
        try:
            for source in _SOURCES.values():
                self._client.script_load(source)
        except RedisError as exc:
            raise DependencyError(f"loading Lua scripts into Redis failed: {exc}") from exc

    def run(self, calls: list[ScriptCall]) -> list[int]:
        """Run `calls` in order in one pipeline and return each script's result."""
        if not calls:
            return []
        results = self._run_once(calls)
        if any(isinstance(result, NoScriptError) for result in results):
            log.warning("Redis script cache is missing ssmd's scripts; loading them and rerunning batch size=%d", len(calls))
            self.load()
            results = self._run_once(calls)

        errors = [result for result in results if isinstance(result, Exception)]
        if errors:
            raise DependencyError(f"Redis rejected {len(errors)} of {len(calls)} script calls, first: {errors[0]}")
        return [int(result) for result in results]

    def _run_once(self, calls: list[ScriptCall]) -> list:
        pool = self._client.connection_pool
        try:
            connection = pool.get_connection()
        except (RedisError, OSError) as exc:
            raise DependencyError(f"Redis pipeline of {len(calls)} script calls failed: {exc}") from exc
        try:
            connection.send_packed_command([pack_calls(calls)])
            results: list = []
            for _ in calls:
                try:
                    results.append(connection.read_response(disable_decoding=True))
                except ResponseError as exc:
                    results.append(exc)
            return results
        except BaseException as exc:
            connection.disconnect()
            if isinstance(exc, (RedisError, OSError)):
                raise DependencyError(f"Redis pipeline of {len(calls)} script calls failed: {exc}") from exc
            raise
        finally:
            pool.release(connection)


class WarmWriteStream:
    """`apply_write` calls for many rows of one version, sent with one batch always in flight.

    The warm writes millions of rows through one script with two keys each. redis-py's pipeline
    builds a command object and packs its arguments one by one per call, which costs more than
    Redis spends running the script, so this class writes the RESP arrays of a batch itself
    (`EVALSHA <sha> 2 <value key> {<value key>}:v <version> <row> <floor>`) and sends them on
    one connection of the client's pool. `send` hands a batch to the socket and then reads the
    replies of the batch before it, so Redis runs one batch while the caller reads and encodes
    the next.

    A NOSCRIPT reply (the server lost its script cache) makes it read the replies of the batch
    still in flight, load the scripts and rerun both batches, which is safe because
    `apply_write` is idempotent at a given version.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._connection = None
        self._head = b"*8\r\n$7\r\nEVALSHA\r\n$40\r\n" + _SHAS[Script.APPLY_WRITE].encode() + b"\r\n$1\r\n2\r\n"
        self._in_flight: list[tuple[bytes, int]] = []

    def __enter__(self) -> WarmWriteStream:
        try:
            self._connection = self._client.connection_pool.get_connection()
        except (RedisError, OSError) as exc:
            raise DependencyError(f"connecting to Redis for the warm failed: {exc}") from exc
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if exc_type is not None or self._in_flight:
            # Replies may still be unread, so the connection cannot serve another command.
            connection.disconnect()
        self._in_flight = []
        self._client.connection_pool.release(connection)

    def send(self, rows: list[tuple[bytes, bytes]], version: bytes, floor: bytes) -> list[int]:
        """Send one batch of (value key, row JSON); return the results of earlier batches now complete."""
        packed = self._pack(rows, version, floor)
        self._write(packed)
        self._in_flight.append((packed, len(rows)))
        if len(self._in_flight) < 2:
            return []
        return self._complete_first()

    def finish(self) -> list[int]:
        """Read and return the results of every batch still in flight."""
        results: list[int] = []
        while self._in_flight:
            results += self._complete_first()
        return results

    def _pack(self, rows: list[tuple[bytes, bytes]], version: bytes, floor: bytes) -> bytes:
        head = self._head
        version_part = b"$%d\r\n%s\r\n" % (len(version), version)
        floor_part = b"$%d\r\n%s\r\n" % (len(floor), floor)
        return b"".join(
            [
                b"%s$%d\r\n%s\r\n$%d\r\n{%s}:v\r\n%s$%d\r\n%s\r\n%s" % (head, len(key), key, len(key) + 4, key, version_part, len(value), value, floor_part)
                for key, value in rows
            ]
        )

    def _complete_first(self) -> list[int]:
        packed, count = self._in_flight.pop(0)
        results = self._read(count)
        if not any(isinstance(result, NoScriptError) for result in results):
            return self._check(results, count)

        log.warning("Redis script cache is missing ssmd's scripts; loading them and rerunning batch size=%d", count)
        rerun = [(packed, count)] + self._in_flight
        for _, later_count in self._in_flight:
            self._read(later_count)
        self._in_flight = []
        self._load()
        results = []
        for packed, count in rerun:
            self._write(packed)
            results += self._check(self._read(count), count)
        return results

    def _write(self, packed: bytes) -> None:
        try:
            self._connection.send_packed_command([packed], check_health=False)
        except (RedisError, OSError) as exc:
            raise DependencyError(f"sending a warm batch to Redis failed: {exc}") from exc

    def _read(self, count: int) -> list:
        read = self._connection.read_response
        results: list = []
        try:
            for _ in range(count):
                try:
                    results.append(read(disable_decoding=True))
                except ResponseError as exc:
                    results.append(exc)
        except (RedisError, OSError) as exc:
            raise DependencyError(f"reading the replies of a warm batch from Redis failed: {exc}") from exc
        return results

    @staticmethod
    def _check(results: list, count: int) -> list[int]:
        errors = [result for result in results if isinstance(result, Exception)]
        if errors:
            raise DependencyError(f"Redis rejected {len(errors)} of {count} script calls, first: {errors[0]}")
        return results

    def _load(self) -> None:
        # Nothing is in flight on the connection here, so each reply is SCRIPT LOAD's.
        try:
            for source in _SOURCES.values():
                self._connection.send_command("SCRIPT", "LOAD", source)
                self._connection.read_response()
        except (RedisError, OSError) as exc:
            raise DependencyError(f"loading Lua scripts into Redis failed: {exc}") from exc
