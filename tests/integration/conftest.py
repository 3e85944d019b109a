"""Fixtures for tests on real servers: one PostgreSQL, NATS and Redis per pytest session.

The servers start on free 127.0.0.1 ports in a temporary directory and die with the pytest
process. Each test gets its own database, slot name, stream name and Redis logical database,
so tests never see each other's tables, slots, streams or keys. A missing server binary fails
the fixture with the Debian package to install; nothing is skipped.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
import signal
import tempfile
import time
import uuid
import warnings
from pathlib import Path

import pytest

from ssmd.core.errors import ConfigError
from ssmd.dev.servers import NatsServer, PostgresServer, RedisServer, ServerStartError

_HERE = Path(__file__).parent
_REDIS_DATABASES = 16  # redis-server's default `databases` setting
_counter = itertools.count(1)


def pytest_collection_modifyitems(config, items):
    # A conftest hook sees every collected item, so mark only the ones under this directory.
    for item in items:
        if _HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


def _start(start, *args, **kwargs):
    try:
        return start(*args, **kwargs)
    except (ConfigError, ServerStartError) as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _end_leftover_processes():
    """Terminate child processes that tests left running, after every server has stopped.

    A daemon subprocess that outlives its test would otherwise keep retrying its connections
    after the session ends, and could keep CI's output open.
    """
    yield
    leftovers = _child_processes(os.getpid())
    for pid in leftovers:
        _terminate(pid)
    if leftovers:
        warnings.warn(f"terminated {len(leftovers)} process(es) that tests left running: {leftovers}", stacklevel=1)


def _child_processes(parent: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        # After the command name come the state and then the parent pid; zombies are skipped.
        if int(fields[1]) == parent and fields[0] != b"Z":
            children.append(int(entry.name))
    return sorted(children)


def _terminate(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            finished, _ = os.waitpid(pid, os.WNOHANG)
            if finished:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


@pytest.fixture(scope="session")
def stack_root():
    """A /tmp directory for the session's servers; mode 0755 so the postgres OS user can enter it."""
    root = Path(tempfile.mkdtemp(prefix="ssmd-test-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server(stack_root):
    server = _start(PostgresServer.start, stack_root, die_with_parent=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_server(stack_root):
    server = _start(NatsServer.start, stack_root, monitor=True, die_with_parent=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(stack_root):
    server = _start(RedisServer.start, stack_root, die_with_parent=True)
    yield server
    server.stop()


def _unique_name(prefix: str, request, limit: int) -> str:
    test = re.sub(r"[^a-z0-9]+", "_", request.node.name.lower()).strip("_")
    return f"{prefix}{next(_counter)}_{test}"[:limit].rstrip("_")


@pytest.fixture
def fresh_database(pg_server, request):
    """URL of a new empty database; dropped after the test together with its replication slots."""
    name = _unique_name("t", request, 63)
    url = pg_server.create_database(name)
    yield url
    pg_server.drop_database(name)


@pytest.fixture
def fresh_slot_name(request):
    """A replication slot name no other test uses (slot names are cluster-wide, not per database)."""
    return _unique_name("slot", request, 50) + "_" + uuid.uuid4().hex[:8]


@pytest.fixture
def fresh_stream_name(nats_server):
    """A JetStream stream name no other test uses; every stream is deleted after the test.

    Streams in one account cannot share subjects, so a stream left behind on `cdc.>` would make
    every later test's stream fail to be created. The session's NATS server belongs to this
    session alone, so any stream found on it before or after the test is a leftover: it is
    deleted, and a warning names it.
    """
    name = f"T{next(_counter)}_{uuid.uuid4().hex[:8].upper()}"
    leftovers = asyncio.run(_delete_streams(nats_server.url))
    if leftovers:
        warnings.warn(f"deleted JetStream streams left by an earlier test: {', '.join(leftovers)}", stacklevel=1)
    yield name
    leftovers = [stream for stream in asyncio.run(_delete_streams(nats_server.url)) if stream != name]
    if leftovers:
        warnings.warn(f"deleted JetStream streams the test did not name: {', '.join(leftovers)}", stacklevel=1)


async def _delete_streams(url: str) -> list[str]:
    """Delete every stream on the server and return their names."""
    import nats
    from nats.js.errors import NotFoundError

    client = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        jetstream = client.jetstream()
        names = [info.config.name for info in await jetstream.streams_info()]
        for name in names:
            try:
                await jetstream.delete_stream(name)
            except NotFoundError:
                pass  # a process of the test deleted it meanwhile
    finally:
        await client.close()
    return sorted(names)


@pytest.fixture
def redis_db(redis_server):
    """URL of a Redis logical database, flushed before the test (databases are reused in turn)."""
    import redis

    index = next(_counter) % _REDIS_DATABASES
    url = redis_server.url_for(index)
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest.fixture
def ssmd_env(fresh_database, nats_server, redis_db, fresh_stream_name, fresh_slot_name):
    """Environment for running `ssmd` subprocesses against this test's database, stream and keys."""
    return {
        "DATABASE_URL": fresh_database,
        "NATS_URL": nats_server.url,
        "REDIS_URL": redis_db,
        "NATS_STREAM": fresh_stream_name,
        "REPLICATION_SLOT": fresh_slot_name,
    }
