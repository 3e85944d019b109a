"""Error tree: one root, split by who has to act."""

from __future__ import annotations


class SsmdError(Exception):
    """Root of every error ssmd raises on purpose."""


class InputError(SsmdError):
    """Bad input or configuration: the user has to change something."""


class DecodeError(InputError):
    """A wal2json record or a stream message that cannot be decoded."""

    def __init__(self, message: str, *, lsn: str | None = None, table: str | None = None) -> None:
        where = ", ".join(part for part in (f"lsn {lsn}" if lsn else "", f"table {table}" if table else "") if part)
        super().__init__(f"{message} ({where})" if where else message)
        self.lsn = lsn
        self.table = table


class ConfigError(InputError):
    """An invalid setting, flag or database object found at start-up."""


class DependencyError(SsmdError):
    """A server ssmd depends on is unreachable or failed; retrying may help."""


class InternalError(SsmdError):
    """A broken assumption inside ssmd itself: a bug to report."""
