"""Regenerate README's Metrics table from serving/metric_catalog.py.

Usage: .venv/bin/python scripts/metrics_table.py   (tests/test_docs.py checks it is current)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts import readme_section  # noqa: E402
from serving.metric_catalog import CATALOG, MetricSpec  # noqa: E402


def _meaning(spec: MetricSpec) -> str:
    closed_sets = [f"{label} ∈ {', '.join(values)}" for label, values in spec.label_values.items()]
    return "; ".join([spec.meaning, *closed_sets])


def table() -> str:
    rows = ["| name | type | labels | meaning |", "|---|---|---|---|"]
    for spec in CATALOG:
        rows.append(f"| `{spec.exposed_name}` | {spec.kind} | {', '.join(spec.labels)} | {_meaning(spec)} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    return readme_section.render(readme, "metrics-table", table())


if __name__ == "__main__":
    readme_section.update("metrics-table", table())
