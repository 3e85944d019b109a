"""Same seed, same trace; different seeds, different traces."""

from sim.world import run_scenario


def test_same_seed_same_trace():
    for seed in (0, 7, 12345):
        first = run_scenario(seed)
        second = run_scenario(seed)
        assert first.trace == second.trace
        assert first.violations == second.violations


def test_same_seed_same_trace_for_bad_strategy():
    assert run_scenario(3, "blind-set").trace == run_scenario(3, "blind-set").trace


def test_different_seeds_different_traces():
    traces = {tuple(run_scenario(seed).trace) for seed in range(20)}
    assert len(traces) == 20
