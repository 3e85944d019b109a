"""Logging set-up for the daemons: one line per event, ids as key=value fields, no secrets."""

from __future__ import annotations

import logging
import re
import sys

from ssmd.core.errors import ConfigError

_SECRET_PATTERNS = (
    (re.compile(r"(://[^:/@\s]*:)[^@\s]*@"), r"\1***@"),
    (re.compile(r"(password\s*=\s*)('[^']*'|[^\s&]+)", re.IGNORECASE), r"\1***"),
)


class RedactSecrets(logging.Filter):
    """Replace passwords in URLs and conninfo strings by `***` before a record is written."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        for pattern, replacement in _SECRET_PATTERNS:
            message = pattern.sub(replacement, message)
        record.msg, record.args = message, None
        return True


def fields(**values: object) -> str:
    """Format ids as `key=value` pairs for a log line."""
    return " ".join(f"{key}={value}" for key, value in values.items() if value is not None)


LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def setup_logging(level: str = "INFO") -> None:
    """Log to stderr at `level`; raise ConfigError for a level name outside LEVELS."""
    if str(level).upper() not in LEVELS:
        raise ConfigError(f"invalid LOG_LEVEL {level!r}: use one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handler.addFilter(RedactSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
