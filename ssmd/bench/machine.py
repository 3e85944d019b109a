"""Description of the machine and software a benchmark ran on."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from importlib import metadata

from ssmd.dev.servers import PG_BINDIR

PYTHON_PACKAGES = ("psycopg", "psycopg-binary", "nats-py", "redis", "hiredis", "orjson")


def describe_machine() -> list[tuple[str, str]]:
    """Return (item, value) pairs: CPUs, CPU model, memory, load, server and package versions."""
    items = [
        ("CPUs (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU model", _cpu_model()),
        ("memory", _memory_total()),
        ("kernel", platform.release()),
        ("load average at start (1/5/15 min)", " / ".join(f"{load:.2f}" for load in os.getloadavg())),
        ("PostgreSQL", _command_output([str(PG_BINDIR / "postgres"), "--version"])),
        ("wal2json", _debian_package_version("postgresql-15-wal2json")),
        ("nats-server", _command_output(["nats-server", "--version"])),
        ("redis-server", _redis_version()),
        ("Python", sys.version.split()[0]),
    ]
    items += [(f"Python package {name}", _package_version(name)) for name in PYTHON_PACKAGES]
    return items


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total() -> str:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    kib = int(line.split()[1])
                    return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def _command_output(command: list[str]) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (result.stdout or result.stderr).strip()
    if not text:
        return "unknown"
    return text.splitlines()[0]


def _redis_version() -> str:
    # `redis-server --version` prints one long line; the version is its `v=` field.
    text = _command_output(["redis-server", "--version"])
    match = re.search(r"v=(\S+)", text)
    return match.group(1) if match else text


def _debian_package_version(package: str) -> str:
    text = _command_output(["dpkg-query", "-W", "-f", "${Version}", package])
    return f"{text} (Debian package {package})" if text and not text.startswith("unknown") and "no packages" not in text else "unknown"


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
