"""Start-up checks of `ssmd cdc`: each failure is one ConfigError naming the problem and the fix.

They run on a normal (not replication) pinned connection before the daemon touches the slot,
so a misconfigured server is reported at once instead of as a driver traceback later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

from ssmd.core.errors import ConfigError, DependencyError
from ssmd.core.lsn import Lsn
from ssmd.core.tables import TableInfo
from ssmd.pg.catalog import load_tables

log = logging.getLogger(__name__)

PLUGIN = "wal2json"


class SlotInUseError(ConfigError):
    """Another server process streams from the slot.

    At start-up this is a configuration problem. After a lost connection it is usually this
    daemon's own walsender, which PostgreSQL has not noticed is gone yet, so the daemon retries.
    """


@dataclass(frozen=True)
class SlotState:
    """A row of pg_replication_slots that matters to the publisher."""

    name: str
    plugin: str | None
    database: str | None
    active_pid: int | None
    confirmed_flush: Lsn | None


def check_wal_level(conn: psycopg.Connection) -> None:
    level = conn.execute("SHOW wal_level").fetchone()[0]
    if level != "logical":
        raise ConfigError(f"wal_level is {level!r}, logical decoding needs 'logical': set wal_level = logical in postgresql.conf and restart PostgreSQL")


def check_replication_privilege(conn: psycopg.Connection) -> None:
    user, allowed = conn.execute(
        "SELECT current_user, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if not allowed:
        raise ConfigError(f"user {user} lacks the REPLICATION privilege: run ALTER ROLE {user} REPLICATION as a superuser")


def read_slot(conn: psycopg.Connection, slot: str) -> SlotState | None:
    row = conn.execute(
        "SELECT slot_name, plugin, database, active_pid, confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    if row is None:
        return None
    name, plugin, database, active_pid, confirmed = row
    return SlotState(name, plugin, database, active_pid, Lsn.parse(confirmed) if confirmed else None)


def check_slot(conn: psycopg.Connection, state: SlotState) -> None:
    """Reject a slot of another plugin, another database, or one another process streams from."""
    database = conn.execute("SELECT current_database()").fetchone()[0]
    if state.plugin != PLUGIN:
        raise ConfigError(
            f"replication slot {state.name} uses plugin {state.plugin or '(physical slot)'}, not {PLUGIN}: "
            f"set REPLICATION_SLOT to another name, or drop the slot if nothing else uses it"
        )
    if state.database != database:
        raise ConfigError(f"replication slot {state.name} belongs to database {state.database}, not {database}: set REPLICATION_SLOT to another name")
    if state.active_pid is not None:
        raise SlotInUseError(
            f"replication slot {state.name} is in use by server process {state.active_pid}: stop the other ssmd cdc "
            f"(or pg_terminate_backend({state.active_pid})), or set REPLICATION_SLOT to another name"
        )


def create_slot(conn: psycopg.Connection, slot: str) -> Lsn:
    """Create the logical slot with wal2json and return its consistent point."""
    try:
        row = conn.execute("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, %s)", (slot, PLUGIN)).fetchone()
    except psycopg.Error as exc:
        raise classify_plugin_error(exc, slot) from exc
    return Lsn.parse(row[0])


def classify_plugin_error(exc: psycopg.Error, slot: str) -> Exception:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "could not access file" in text and PLUGIN in text:
        return ConfigError(f"the {PLUGIN} output plugin is not installed on the PostgreSQL server ({text}): install it, e.g. apt-get install postgresql-15-wal2json")
    if "all replication slots are in use" in text:
        return ConfigError(f"cannot create replication slot {slot}: {text}; raise max_replication_slots or drop an unused slot")
    if getattr(exc, "sqlstate", None) == "42710":
        return DependencyError(f"replication slot {slot} was created concurrently ({text}); retrying")
    if isinstance(exc, psycopg.OperationalError):
        return DependencyError(f"creating replication slot {slot} failed: {text}")
    return ConfigError(f"cannot create replication slot {slot}: {text}")


def run_startup_checks(conn: psycopg.Connection, slot: str, table_names: list[str]) -> tuple[list[TableInfo], SlotState | None]:
    """Run every check; return the followed tables and the slot (None when it does not exist yet)."""
    check_wal_level(conn)
    check_replication_privilege(conn)
    tables = load_tables(conn, table_names)
    state = read_slot(conn, slot)
    if state is not None:
        check_slot(conn, state)
    return tables, state
