"""The versioned Lua scripts and a pipelined runner that loads them on demand.

Each script touches the value key and the version key of one cached row, which share a Redis
Cluster hash slot; anything else a script needs (a truncate floor, the snapshot point) arrives
in ARGV. Scripts run by EVALSHA. A server that lost its script cache (restart, SCRIPT FLUSH,
fail-over) answers NOSCRIPT; the runner then loads the scripts again and reruns the whole
batch, which is safe because every script is idempotent at a given version.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from enum import Enum
from importlib import resources

import redis
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

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


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One script invocation: its two keys (value key, version key) and its arguments."""

    script: Script
    keys: tuple[str, str]
    args: tuple[str | bytes, ...]


class ScriptRunner:
    """Runs batches of script calls in one pipeline round trip."""

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
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for call in calls:
                    pipe.evalsha(_SHAS[call.script], 2, *call.keys, *call.args)
                return await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            raise DependencyError(f"Redis pipeline of {len(calls)} script calls failed: {exc}") from exc


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
        try:
            with self._client.pipeline(transaction=False) as pipe:
                for call in calls:
                    pipe.evalsha(_SHAS[call.script], 2, *call.keys, *call.args)
                return pipe.execute(raise_on_error=False)
        except (RedisError, OSError) as exc:
            raise DependencyError(f"Redis pipeline of {len(calls)} script calls failed: {exc}") from exc
