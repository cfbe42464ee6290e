"""Regenerate README's Metrics table from serving/metric_catalog.py.

Usage: .venv/bin/python scripts/metrics_table.py   (tests/test_docs.py checks it is current)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.metric_catalog import CATALOG, MetricSpec  # noqa: E402

START, END = "<!-- metrics-table:start -->", "<!-- metrics-table:end -->"


def _meaning(spec: MetricSpec) -> str:
    closed_sets = [f"{label} ∈ {', '.join(values)}" for label, values in spec.label_values.items()]
    return "; ".join([spec.meaning, *closed_sets])


def table() -> str:
    rows = ["| name | type | labels | meaning |", "|---|---|---|---|"]
    for spec in CATALOG:
        rows.append(f"| `{spec.exposed_name}` | {spec.kind} | {', '.join(spec.labels)} | {_meaning(spec)} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


if __name__ == "__main__":
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))
