"""Benchmark results: one row per measurement, printed as a table and written as Markdown.

Every figure that has a ceiling is shown with the ceiling measured in the same run and the
ratio between them. The machines this runs on are shared, and their speed varies from run to
run more than the ratio does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Measurement:
    """One table row: a value in its unit, optionally against a ceiling and a target.

    `target_kind` selects the comparison: "ratio_min" (ratio >= target), "max" (value <=
    target) or "below" (value < target). `error` replaces the value when the measurement failed.
    """

    name: str
    unit: str
    value: float | None = None
    ceiling_name: str | None = None
    ceiling_value: float | None = None
    target: float | None = None
    target_kind: str | None = None
    detail: str = ""
    error: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.ceiling_value:
            return None
        return self.value / self.ceiling_value

    def target_text(self) -> str:
        if self.target is None:
            return ""
        if self.target_kind == "ratio_min":
            return f"ratio >= {self.target:g}"
        if self.target_kind == "max":
            return f"<= {self.target:g} {self.unit}"
        return f"< {self.target:g} {self.unit}"

    def target_met(self) -> bool | None:
        """Return whether the target is met, or None without a target or a value."""
        if self.target is None or self.value is None:
            return None
        if self.target_kind == "ratio_min":
            ratio = self.ratio
            return None if ratio is None else ratio >= self.target
        if self.target_kind == "max":
            return self.value <= self.target
        return self.value < self.target


@dataclass
class Report:
    """Everything a run produced, in the order the sections are written."""

    size: str
    started_at: str
    machine: list[tuple[str, str]]
    measurements: list[Measurement] = field(default_factory=list)
    sections: list[tuple[str, str]] = field(default_factory=list)
    duration_s: float = 0.0

    def add(self, measurement: Measurement) -> Measurement:
        self.measurements.append(measurement)
        return measurement

    def add_section(self, title: str, text: str) -> None:
        self.sections.append((title, text.strip() + "\n"))

    def failed(self) -> list[Measurement]:
        return [measurement for measurement in self.measurements if measurement.error is not None or measurement.value is None]


def format_number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table_rows(report: Report) -> list[list[str]]:
    """Return the results table as text cells, header first."""
    rows = [["measurement", "value", "unit", "ceiling (same run)", "ratio", "target", "met"]]
    for measurement in report.measurements:
        if measurement.error is not None:
            value = f"failed: {measurement.error}"
        else:
            value = format_number(measurement.value)
        ceiling = ""
        if measurement.ceiling_name:
            ceiling = f"{measurement.ceiling_name}: {format_number(measurement.ceiling_value)}"
        ratio = measurement.ratio
        met = measurement.target_met()
        met_text = ""
        if met is not None:
            met_text = "yes" if met else "NO"
        rows.append([
            measurement.name,
            value,
            measurement.unit,
            ceiling,
            "" if ratio is None else f"{ratio:.2f}",
            measurement.target_text(),
            met_text,
        ])
    return rows


def format_console_table(report: Report) -> str:
    rows = table_rows(report)
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_markdown_table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(_escape_cell(cell) for cell in rows[0]) + " |"]
    lines.append("|" + "|".join("---" for _ in rows[0]) + "|")
    for row in rows[1:]:
        lines.append("| " + " | ".join(_escape_cell(cell) for cell in row) + " |")
    return "\n".join(lines)


def render_markdown(report: Report, method: str, kept_analysis: str | None) -> str:
    """Return BENCHMARKS.md: results, machine, method, extra sections, then any kept analysis."""
    parts = [
        "# ssmd benchmarks\n",
        f"Written by `ssmd bench`, size {report.size}, run started {report.started_at}, "
        f"took {report.duration_s / 60:.1f} min. Every rate sits beside a ceiling measured in the "
        "same run on the same servers, because the shared 2-core machines this ran on vary in "
        "speed from run to run more than the ratios do. Targets are reported, never asserted by tests.\n",
        "## Results\n",
        format_markdown_table(table_rows(report)) + "\n",
    ]
    details = [(m.name, m.detail) for m in report.measurements if m.detail]
    if details:
        parts.append("Details:\n")
        parts += [f"- {name}: {detail}" for name, detail in details]
        parts.append("")
    parts.append("## Machine\n")
    parts.append(format_markdown_table([["item", "value"], *[[item, value] for item, value in report.machine]]) + "\n")
    parts.append(method.strip() + "\n")
    for title, text in report.sections:
        parts.append(f"## {title}\n")
        parts.append(text)
    if kept_analysis:
        parts.append(kept_analysis.strip() + "\n")
    return "\n".join(parts)


ANALYSIS_HEADING = "## Analysis"


def kept_analysis(path: Path) -> str | None:
    """Return the hand-written `## Analysis` section of an existing report, to carry it over."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    start = text.find("\n" + ANALYSIS_HEADING)
    return text[start + 1:] if start >= 0 else None


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
