"""Each known-bad strategy is caught within 300 seeds, naming the invariant it breaks."""

import pytest

from sim.strategies import EXPECTED, STRATEGIES
from sim.world import run_scenario
from tests.sim.helpers import describe

SEED_LIMIT = 300


def test_strategy_list():
    assert STRATEGIES[0] == "correct"
    assert len(STRATEGIES) == 13


@pytest.mark.parametrize("strategy", sorted(EXPECTED))
def test_bad_strategy_is_caught(strategy):
    expected = EXPECTED[strategy]
    seen = set()
    for seed in range(SEED_LIMIT):
        result = run_scenario(seed, strategy)
        if expected in result.invariants:
            assert result.violations
            return
        seen.update(result.invariants)
    pytest.fail(f"{strategy}: no {expected} violation in {SEED_LIMIT} seeds; saw {sorted(seen)}")


def test_failure_description_names_seed_and_replay():
    result = run_scenario(0, "namespace-mismatch")
    text = describe(result)
    assert "seed 0 strategy namespace-mismatch" in text
    assert "ssmd sim --seed 0 --strategy namespace-mismatch --trace" in text
