"""The JetStream stream that carries changes: create or update it, and read its identity.

The stream takes every subject under `cdc.>`, stores to file, and discards the oldest messages
at its limits. Discarding old is safe because the cache daemon notices a sequence gap and
re-warms; discarding new would stall the publisher and pin WAL on the database instead.
The duplicate window is how long JetStream remembers a `Nats-Msg-Id`, so it bounds how late a
retried or replayed publish is still dropped by the server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from ssmd.core.errors import ConfigError, DependencyError

log = logging.getLogger(__name__)

SUBJECTS = ["cdc.>"]


@dataclass(frozen=True)
class StreamLimits:
    """Stream settings the operator chooses; 0 for a limit means unlimited."""

    replicas: int = 1
    max_messages: int = 0
    max_bytes: int = 0
    max_age_s: float = 0.0
    duplicate_window_s: float = 120.0


@dataclass(frozen=True)
class StreamState:
    """Stream state read by the cache and `ssmd status`: sequences and creation time."""

    name: str
    created: datetime | None
    first_seq: int
    last_seq: int
    messages: int
    bytes: int


def stream_config(name: str, limits: StreamLimits) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=SUBJECTS,
        storage=StorageType.FILE,
        num_replicas=limits.replicas,
        max_msgs=limits.max_messages or -1,
        max_bytes=limits.max_bytes or -1,
        max_age=limits.max_age_s or 0,
        discard=DiscardPolicy.OLD,
        duplicate_window=limits.duplicate_window_s,
    )


async def ensure_stream(js: JetStreamContext, name: str, limits: StreamLimits) -> StreamState:
    """Create the stream, or update it when its settings differ; return its state."""
    config = stream_config(name, limits)
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        info = None
    except APIError as exc:
        raise DependencyError(f"JetStream stream lookup of {name} failed: {exc}") from exc

    try:
        if info is None:
            info = await js.add_stream(config)
            log.info("created stream stream=%s subjects=%s replicas=%s", name, ",".join(SUBJECTS), limits.replicas)
        elif _differs(info.config, config):
            info = await js.update_stream(config)
            log.info("updated stream settings stream=%s", name)
    except APIError as exc:
        # Typical causes: subjects overlapping another stream, replicas above the cluster size,
        # or a storage type change, which JetStream cannot do in place.
        raise ConfigError(f"cannot create or update JetStream stream {name}: {exc.description or exc}; fix the stream settings or remove the conflicting stream") from exc
    return _state(name, info)


async def read_stream_state(js: JetStreamContext, name: str) -> StreamState | None:
    """Return the stream's first/last sequence and creation time, or None when it does not exist."""
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        return None
    except APIError as exc:
        raise DependencyError(f"JetStream stream lookup of {name} failed: {exc}") from exc
    return _state(name, info)


def _state(name: str, info) -> StreamState:
    created = getattr(info, "created", None)
    if isinstance(created, str):
        created = _parse_time(created)
    state = info.state
    return StreamState(name, created, state.first_seq, state.last_seq, state.messages, state.bytes)


def _parse_time(text: str) -> datetime | None:
    # JetStream sends RFC 3339 with nanoseconds; datetime takes at most microseconds.
    head, dot, rest = text.rstrip("Z").partition(".")
    digits = "".join(c for c in rest if c.isdigit())[:6]
    try:
        return datetime.fromisoformat(f"{head}{'.' + digits if dot and digits else ''}+00:00")
    except ValueError:
        return None


def _differs(current: StreamConfig, wanted: StreamConfig) -> bool:
    fields = ("subjects", "num_replicas", "max_msgs", "max_bytes", "max_age", "discard", "duplicate_window", "storage")
    return any(_normal(getattr(current, field)) != _normal(getattr(wanted, field)) for field in fields)


def _normal(value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if value is None:
        return 0
    return value
