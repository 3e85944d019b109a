"""`ssmd bench`: start a throwaway stack, run every phase, print the table, write BENCHMARKS.md."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from ssmd.bench.machine import describe_machine
from ssmd.bench.method import METHOD
from ssmd.bench.phases import SIZES, BenchRun
from ssmd.bench.report import Report, format_console_table, kept_analysis, render_markdown
from ssmd.bench.stack import BenchStack
from ssmd.logs import setup_logging

log = logging.getLogger(__name__)

# Phases in run order, by their command-line name. Latency and peak RSS use the daemons that
# the end-to-end phase started, so they need it.
PHASE_METHODS = {
    "recvlogical": "recvlogical",
    "publish": "cdc_publish",
    "jetstream": "jetstream",
    "baseline": "baseline",
    "end-to-end": "end_to_end",
    "latency": "latency",
    "rss": "peak_rss",
}
PHASES = tuple(PHASE_METHODS)
RECORD_FILE = "BENCHMARKS.md"
TRIAL_FILE = "bench-trial.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=sorted(SIZES), default="full", help="small: under a minute, for smoke tests; full: 1,000,000 markets and 200,000 transactions, about 5 minutes on two quiet shared cores and longer under load (default full)")
    parser.add_argument("--markets", type=int, help="override the size's number of markets rows (warm table)")
    parser.add_argument("--transactions", type=int, help="override the size's number of single-row transactions and rows of the big transaction")
    parser.add_argument("--output", help=f"Markdown file to write; an existing `## Analysis` section in it is kept (default {RECORD_FILE} for a full run of every phase, else {TRIAL_FILE}, so a trial never replaces the record)")
    parser.add_argument("--phases", type=_phase_list, default=PHASES, help=f"comma-separated phases to run after loading, warming and committing the load, for quicker trials: {','.join(PHASES)} (default all)")
    parser.add_argument("--profile", action="store_true", help="run the daemons under cProfile and add their top functions to the report; rates are then lower")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory with server and daemon logs, and print its path")
    parser.add_argument("--log-level", default="INFO", help="log level of the benchmark itself: DEBUG, INFO, WARNING or ERROR (default INFO)")


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    # SIGTERM unwinds like Ctrl-C, so the daemons and servers this run started are stopped.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    size = SIZES[args.size]
    if args.markets is not None or args.transactions is not None:
        size = size.scaled(markets_rows=args.markets, transactions=args.transactions)
    started = time.perf_counter()
    report = Report(size=size.describe(args.size), started_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), machine=describe_machine())

    # The postgres OS user must be able to enter the directory, hence /tmp and mode 0755.
    root = Path(tempfile.mkdtemp(prefix="ssmd-bench-", dir="/tmp"))
    root.chmod(0o755)
    work_dir = root / "daemons"
    work_dir.mkdir()
    log.info("benchmark size=%s directory=%s", args.size, root)

    stack = BenchStack.start(root)
    bench = BenchRun(stack, size, report, work_dir, profile=args.profile)
    try:
        bench.load_data()
        bench.warm()
        bench.generate_stream_load()
        last_cdc_phase = "end-to-end" if "end-to-end" in args.phases else "publish"
        for phase in PHASES:
            if phase in args.phases:
                getattr(bench, PHASE_METHODS[phase])()
            if phase == last_cdc_phase and "recvlogical" in args.phases:
                bench.recvlogical_again()  # the ceiling brackets the phases it bounds
    finally:
        bench.stop_daemons()
        stack.stop()
        if args.profile:
            bench.profiles()
        if args.keep:
            print(f"kept logs and data in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    report.duration_s = time.perf_counter() - started
    report.machine.append(("load average at end (1/5/15 min)", " / ".join(f"{load:.2f}" for load in os.getloadavg())))
    print(format_console_table(report))
    output = Path(args.output or default_output(args))
    output.write_text(render_markdown(report, METHOD, kept_analysis(output)))
    print(f"wrote {output}")
    failed = report.failed()
    for measurement in failed:
        log.error("measurement failed: %s: %s", measurement.name, measurement.error)
    return 1 if failed else 0


def default_output(args: argparse.Namespace) -> str:
    """Return the report file for a run without --output: the record only for a complete full run."""
    complete = args.size == "full" and args.markets is None and args.transactions is None and tuple(args.phases) == PHASES and not args.profile
    return RECORD_FILE if complete else TRIAL_FILE


def _phase_list(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in PHASES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown phase {','.join(unknown) or repr(text)}: choose from {','.join(PHASES)}")
    return names


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")
