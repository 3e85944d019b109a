"""Shared formatting for simulator test failures: every failure shows its seed and trace."""

from sim.world import Result

TRACE_TAIL = 60


def describe(result: Result) -> str:
    lines = [f"seed {result.seed} strategy {result.strategy} violates {result.invariants}"]
    lines += [f"  {violation}" for violation in result.violations[:10]]
    lines += [f"  trace (last {TRACE_TAIL} of {len(result.trace)} lines):"]
    lines += [f"    {line}" for line in result.trace[-TRACE_TAIL:]]
    lines += [f"  replay: ssmd sim --seed {result.seed} --strategy {result.strategy} --trace"]
    return "\n".join(lines)
