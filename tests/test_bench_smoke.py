"""Smoke run of `ssmd bench --size small`: every table row is produced with a number.

This checks the harness, not the speed: no figure is compared with a target here. Two fast
tests at the end check the percentile and target rules the table uses.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import pytest

from ssmd.bench.command import _phase_list, add_arguments, default_output
from ssmd.bench.cpu import describe_cpu, tree_cpu_seconds
from ssmd.bench.latency import percentile
from ssmd.bench.report import Measurement

EXPECTED_ROWS = (
    "ssmd cache warm (markets + events + fees)",
    "redis-benchmark EVALSHA CAS pipelined (ceiling)",
    "Redis EVALSHA CAS, one redis-py client (context)",
    "pg_recvlogical to /dev/null (ceiling)",
    "ssmd cdc publish (PubAck'd)",
    "JetStream publish_async, one client (context)",
    "JetStream pull fetch(500), ack each (context)",
    "baseline: one awaited publish per message",
    "ssmd cdc + cache end to end (commit to Redis)",
    "latency p50 at 1,000 changes/s",
    "latency p99 at 1,000 changes/s",
    "latency max at 1,000 changes/s",
    "latency p50 at 5,000 changes/s",
    "latency p99 at 5,000 changes/s",
    "latency max at 5,000 changes/s",
    "ssmd cdc peak RSS during one big transaction",
    "ssmd cache peak RSS during one big transaction",
)
ROWS_WITH_CEILING = (
    "ssmd cache warm (markets + events + fees)",
    "ssmd cdc publish (PubAck'd)",
    "baseline: one awaited publish per message",
    "ssmd cdc + cache end to end (commit to Redis)",
)


def results_table(markdown: str) -> dict[str, list[str]]:
    """Return the cells of the `## Results` table by measurement name."""
    section = markdown.split("## Results", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| measurement"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split(" | ")]
        rows[cells[0]] = cells
    return rows


def as_number(cell: str) -> float:
    return float(cell.replace(",", ""))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench") / "BENCHMARKS.md"
    result = subprocess.run(
        [sys.executable, "-m", "ssmd", "bench", "--size", "small", "--output", str(output)],
        capture_output=True, text=True, timeout=300,
    )
    return result, output


@pytest.mark.integration
@pytest.mark.slow
def test_small_run_exits_zero(small_run):
    result, _ = small_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.integration
@pytest.mark.slow
def test_small_run_has_every_row(small_run):
    _, output = small_run
    rows = results_table(output.read_text())
    for name in EXPECTED_ROWS:
        assert name in rows, f"row {name!r} missing from the results table"
        assert as_number(rows[name][1]) > 0, f"row {name!r} has no positive value: {rows[name][1]!r}"


@pytest.mark.integration
@pytest.mark.slow
def test_small_run_ratios_use_same_run_ceiling(small_run):
    _, output = small_run
    rows = results_table(output.read_text())
    for name in ROWS_WITH_CEILING:
        ceiling_name, _, ceiling_text = rows[name][3].rpartition(": ")
        assert ceiling_name, f"row {name!r} has no ceiling"
        ratio = as_number(rows[name][4])
        assert ratio == pytest.approx(as_number(rows[name][1]) / as_number(ceiling_text), rel=0.02, abs=0.006)


@pytest.mark.integration
@pytest.mark.slow
def test_small_run_describes_machine(small_run):
    _, output = small_run
    text = output.read_text()
    for item in ("CPUs (nproc)", "CPU model", "memory", "PostgreSQL", "wal2json", "nats-server", "redis-server", "Python package redis"):
        assert f"| {item} |" in text, f"machine item {item!r} missing"
    assert "## Method" in text


def test_percentile_nearest_rank():
    values = [float(number) for number in range(1, 101)]
    assert percentile(values, 0.50) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile([7.0], 0.99) == 7.0


def test_target_met_by_kind():
    ratio = Measurement("end to end", "changes/s", value=30.0, ceiling_value=100.0, target=0.3, target_kind="ratio_min")
    assert ratio.target_met() is True
    ratio.value = 29.0
    assert ratio.target_met() is False
    latency = Measurement("p99", "ms", value=25.0, target=25.0, target_kind="max")
    assert latency.target_met() is True
    memory = Measurement("rss", "MiB", value=300.0, target=300.0, target_kind="below")
    assert memory.target_met() is False
    assert Measurement("failed", "ms", error="timed out", target=1.0, target_kind="max").target_met() is None


def test_phase_list_names_the_unknown_phase():
    assert _phase_list("publish, end-to-end") == ("publish", "end-to-end")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown phase warp.*choose from recvlogical"):
        _phase_list("publish,warp")


def test_cpu_of_a_process_tree_counts_its_children():
    child = subprocess.Popen([sys.executable, "-c", "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\ninput()"], stdin=subprocess.PIPE)
    try:
        before = tree_cpu_seconds({"self": os.getpid()})
        deadline = time.monotonic() + 10
        while tree_cpu_seconds({"self": os.getpid()})["self"] - before["self"] < 0.25 and time.monotonic() < deadline:
            time.sleep(0.05)
        after = tree_cpu_seconds({"self": os.getpid()})
    finally:
        child.communicate(b"\n", timeout=10)
    assert after["self"] - before["self"] >= 0.25
    line = describe_cpu(before, after, count=1000, wall_s=1.0)
    assert line.startswith("CPU µs per change: self ")


def test_only_a_complete_full_run_writes_the_record():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert default_output(parser.parse_args([])) == "BENCHMARKS.md"
    assert default_output(parser.parse_args(["--size", "small"])) == "bench-trial.md"
    assert default_output(parser.parse_args(["--phases", "publish"])) == "bench-trial.md"
    assert default_output(parser.parse_args(["--transactions", "1000", "--markets", "2000"])) == "bench-trial.md"
    assert default_output(parser.parse_args(["--profile"])) == "bench-trial.md"
