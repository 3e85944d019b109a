"""Settings shared by the daemons: each has an environment name and a command-line flag.

A flag wins over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from ssmd.core.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    env: str
    default: str | None
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.env.lower().replace("_", "-")

    @property
    def dest(self) -> str:
        return self.env.lower()


DATABASE_URL = Setting("DATABASE_URL", None, "PostgreSQL connection URL or conninfo")
NATS_URL = Setting("NATS_URL", "nats://localhost:4222", "NATS server URL(s), comma-separated")
REDIS_URL = Setting("REDIS_URL", "redis://localhost:6379", "Redis URL (redis:// or rediss://)")
REPLICATION_SLOT = Setting("REPLICATION_SLOT", "ssmd_cdc", "logical replication slot name")
CDC_TABLES = Setting("CDC_TABLES", "events,markets,series_fees", "comma-separated tables to follow, optionally schema-qualified")
NATS_STREAM = Setting("NATS_STREAM", "SECMASTER_CDC", "JetStream stream name")
CONSUMER_NAME = Setting("CONSUMER_NAME", "ssmd-cache", "durable JetStream consumer name")
POLL_INTERVAL_MS = Setting("POLL_INTERVAL_MS", "500", "polling-mode interval in milliseconds")
CACHE_NAMESPACES = Setting(
    "CACHE_NAMESPACES",
    "markets=market,events=event,series_fees=fee",
    "table=namespace pairs for Redis keys; other tables use their own name",
)
METRICS_PORT = Setting("METRICS_PORT", "0", "port for /metrics, /healthz and /readyz on 127.0.0.1; 0 disables")
LOG_LEVEL = Setting("LOG_LEVEL", "INFO", "log level: DEBUG, INFO, WARNING or ERROR")


def add_settings(parser: argparse.ArgumentParser, *settings: Setting) -> None:
    """Add one flag per setting, defaulting to the environment and then to the built-in default."""
    for setting in settings:
        default = os.environ.get(setting.env, setting.default)
        default_text = "required" if setting.default is None else f"default {setting.default!r}"
        parser.add_argument(setting.flag, dest=setting.dest, default=default, help=f"{setting.help} (env {setting.env}; {default_text})")


def require(value: str | None, setting: Setting) -> str:
    """Return a required setting's value or raise a ConfigError that names the fix."""
    if not value:
        raise ConfigError(f"{setting.env} is not set: export {setting.env}=... or pass {setting.flag}")
    return value


def parse_int(value: str, setting: Setting, *, minimum: int = 0) -> int:
    """Parse an integer setting, naming the value and the setting when it is invalid."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"invalid {setting.env} {value!r}: expected a whole number") from None
    if number < minimum:
        raise ConfigError(f"invalid {setting.env} {value!r}: must be at least {minimum}")
    return number


def parse_tables(value: str) -> list[str]:
    """Split CDC_TABLES into names, rejecting empty or malformed entries."""
    tables = [part.strip() for part in value.split(",") if part.strip()]
    if not tables:
        raise ConfigError(f"invalid CDC_TABLES {value!r}: name at least one table, e.g. 'events,markets'")
    for table in tables:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?", table):
            raise ConfigError(f"invalid table name {table!r} in CDC_TABLES: use name or schema.name")
    return tables


def parse_namespaces(value: str) -> dict[str, str]:
    """Parse `table=namespace` pairs."""
    pairs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        table, sep, namespace = item.partition("=")
        if not sep or not table.strip() or not namespace.strip():
            raise ConfigError(f"invalid CACHE_NAMESPACES entry {item!r}: expected table=namespace")
        pairs[table.strip()] = namespace.strip()
    return pairs


_PASSWORD_IN_CONNINFO = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """Return a URL or conninfo string with any password replaced by `***`."""
    if "://" not in url:
        return _PASSWORD_IN_CONNINFO.sub(r"\1***", url)
    redacted = []
    for part in url.split(","):
        try:
            split = urlsplit(part.strip())
        except ValueError:
            redacted.append("<invalid url>")
            continue
        netloc = split.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{host}" if ":" in userinfo else f"{'***' if _looks_like_token(user, split.scheme) else user}@{host}"
        query = _PASSWORD_IN_CONNINFO.sub(r"\1***", split.query.replace("&", " ")).replace(" ", "&")
        redacted.append(urlunsplit((split.scheme, netloc, split.path, query, split.fragment)))
    return ",".join(redacted)


def _looks_like_token(user: str, scheme: str) -> bool:
    # NATS URLs carry a bare token as the user part (nats://TOKEN@host).
    return scheme.startswith(("nats", "tls"))
