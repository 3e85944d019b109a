"""CPU time of process trees from /proc, to show where a phase's CPU went.

On two shared cores the end-to-end rate is bounded by the CPU that all five processes (both
daemons, PostgreSQL's walsender, nats-server, redis-server) need per change, so the benchmark
reports that split beside the rate.
"""

from __future__ import annotations

import os

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read().decode(errors="replace")
    except OSError:
        return None
    # The command name in parentheses may contain spaces, so the split starts after it.
    return text[text.rfind(")") + 2:].split()


def _tree(children: dict[int, list[int]], pid: int) -> list[int]:
    """Return `pid` and all its descendants."""
    members = [pid]
    for member in members:  # the list grows while it is walked
        members += children.get(member, [])
    return members


def tree_cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """Return user + system CPU seconds per name, summed over each pid and its descendants."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        # Index 0 is the state, so ppid is 1, utime to cstime 11 to 14 (fields 4 and 14 to 17 in
        # proc(5)). cutime and cstime count reaped children, e.g. a finished PostgreSQL backend.
        children.setdefault(int(fields[1]), []).append(int(entry))
        ticks[int(entry)] = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return {name: sum(ticks.get(member, 0) for member in _tree(children, pid)) / _TICKS_PER_S for name, pid in pids.items() if pid}


def describe_cpu(before: dict[str, float], after: dict[str, float], count: int, wall_s: float, unit: str = "change") -> str:
    """Return `name N µs` per `unit` for each process tree, and how many CPUs were busy on average."""
    used = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in before}
    total = sum(used.values())
    parts = ", ".join(f"{name} {seconds / count * 1e6:.0f}" for name, seconds in used.items())
    cpus = os.cpu_count() or 1
    return f"CPU µs per {unit}: {parts}; total {total / count * 1e6:.0f} µs, {total / wall_s:.2f} of {cpus} CPUs busy"
