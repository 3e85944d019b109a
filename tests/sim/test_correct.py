"""The correct strategy keeps every invariant over a few thousand seeds."""

from sim.world import run_scenario
from tests.sim.helpers import describe

SEEDS = 2000


def test_correct_strategy_has_no_violations():
    failures = [result for result in map(run_scenario, range(SEEDS)) if result.violations]
    assert not failures, "\n\n".join(describe(result) for result in failures[:3])


def test_scenarios_exercise_faults():
    """The seeds above must actually contain the races and faults they are meant to cover."""
    traces = ["\n".join(run_scenario(seed).trace) for seed in range(200)]
    for needle in ("(redelivery)", "PubAck lost", "crashes", "stream gap", "stream recreated", "slot created at", "truncate", "skip", "stale", "duplicate"):
        assert any(needle in trace for trace in traces), needle
