"""`ssmd sim`: run the deterministic simulator over a range of seeds and check every invariant."""

from __future__ import annotations

import argparse
import time

from sim.strategies import CORRECT, STRATEGIES
from sim.world import Result, run_scenario

SHOWN_FAILURES = 3
SHOWN_SEEDS = 20
TRACE_TAIL = 40


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=1000, help="number of scenarios to run (default 1000)")
    parser.add_argument("--start", type=int, default=0, help="first seed of the range (default 0)")
    parser.add_argument("--seed", type=int, help="run this one seed only")
    parser.add_argument(
        "--strategy", default=CORRECT, choices=STRATEGIES, metavar="NAME", help="logic to simulate (default correct)"
    )
    parser.add_argument("--trace", action="store_true", help="print the whole trace of each scenario run")
    parser.add_argument("--list-strategies", action="store_true", help="print the strategy names and exit")


def run(args: argparse.Namespace) -> int:
    if args.list_strategies:
        print("\n".join(STRATEGIES))
        return 0

    seeds = range(args.seed, args.seed + 1) if args.seed is not None else range(args.start, args.start + args.seeds)
    failures: list[Result] = []
    started = time.perf_counter()
    for seed in seeds:
        result = run_scenario(seed, args.strategy)
        if args.trace:
            print("\n".join(result.trace))
        if result.violations:
            failures.append(result)
            if len(failures) <= SHOWN_FAILURES:
                _print_failure(result, full_trace=args.trace)
    elapsed = time.perf_counter() - started

    rate = len(seeds) / elapsed if elapsed > 0 else float("inf")
    print(
        f"ssmd sim: {len(seeds)} scenarios of strategy {args.strategy}, {len(failures)} with violations, "
        f"{rate:.0f} scenarios/s ({rate * 60:.0f}/min)"
    )
    if failures:
        names = sorted({name for result in failures for name in result.invariants})
        print(f"violated invariants: {', '.join(names)}")
        listed = " ".join(str(result.seed) for result in failures[:SHOWN_SEEDS])
        more = f" (first {SHOWN_SEEDS} of {len(failures)})" if len(failures) > SHOWN_SEEDS else ""
        print(f"failing seeds{more}: {listed}")
        if len(failures) > SHOWN_FAILURES:
            print(f"traces shown for the first {SHOWN_FAILURES} failing seeds only")
        return 1
    return 0


def _print_failure(result: Result, full_trace: bool) -> None:
    print(f"seed {result.seed} ({result.strategy}) violates: {', '.join(result.invariants)}")
    distinct = list(dict.fromkeys(str(violation) for violation in result.violations))
    for line in distinct[:5]:
        print(f"  {line}")
    if len(distinct) > 5:
        print(f"  ... and {len(distinct) - 5} more")
    if not full_trace:
        print(f"  last {TRACE_TAIL} of {len(result.trace)} trace lines:")
        for line in result.trace[-TRACE_TAIL:]:
            print(f"    {line}")
    print(f"  replay: ssmd sim --seed {result.seed} --strategy {result.strategy} --trace")
