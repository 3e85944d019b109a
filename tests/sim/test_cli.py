"""`ssmd sim` exit codes and output."""

from ssmd.cli import main
from sim.strategies import STRATEGIES


def test_list_strategies(capsys):
    assert main(["sim", "--list-strategies"]) == 0
    assert capsys.readouterr().out.split() == list(STRATEGIES)


def test_correct_seeds_exit_zero(capsys):
    assert main(["sim", "--seeds", "20", "--start", "100"]) == 0
    out = capsys.readouterr().out
    assert "20 scenarios of strategy correct, 0 with violations" in out
    assert "scenarios/s" in out


def test_violation_exits_one_with_replay(capsys):
    assert main(["sim", "--seeds", "5", "--strategy", "namespace-mismatch"]) == 1
    out = capsys.readouterr().out
    assert "seed 0 (namespace-mismatch) violates: convergence" in out
    assert "replay: ssmd sim --seed 0 --strategy namespace-mismatch --trace" in out
    assert "violated invariants: convergence" in out


def test_one_seed_trace(capsys):
    assert main(["sim", "--seed", "4", "--trace"]) == 0
    out = capsys.readouterr().out
    assert "quiesce" in out
    assert "1 scenarios of strategy correct" in out
