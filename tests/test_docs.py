"""README stays true: every config key, every metric and its closed label sets are documented."""

from __future__ import annotations

import re

from prometheus_client import generate_latest

from scripts import config_table, metrics_table
from serving.engines.replica_events import ReplicaState
from serving.errors import FALLBACK_REASONS
from serving.limits import LimitsHealth
from serving.metric_catalog import CATALOG
from serving.metrics import GatewayMetrics
from tests.support.servers import ROOT
from tuneserve.config import env_name, iter_fields

README = (ROOT / "README.md").read_text()


def test_config_table_is_current() -> None:
    """Regenerate with: .venv/bin/python scripts/config_table.py"""
    assert config_table.render(README) == README
    for key, _ in iter_fields():
        assert f"`{key}`" in README, key
        assert env_name(key) in README, key


def _exported_names() -> list[str]:
    metrics = GatewayMetrics(["m"])
    metrics.watch_engines(lambda: [])
    # Families that exist only with their part configured: shared limits, vLLM replicas.
    metrics.watch_limits(LimitsHealth("redis", "fail_closed"))
    metrics.watch_replicas(lambda: [ReplicaState("http://replica:8000", True, 0.0)])
    return re.findall(r"^# TYPE (\S+) ", generate_latest(metrics.registry).decode(), re.M)


def test_every_metric_is_in_readme() -> None:
    names = _exported_names()
    assert len(names) >= 10
    for name in names:
        assert f"`{name}`" in README, name


def test_metrics_table_is_current() -> None:
    """Regenerate with: .venv/bin/python scripts/metrics_table.py"""
    assert metrics_table.render(README) == README
    # The catalog the table comes from is what /metrics exports, no more and no less.
    assert sorted(spec.exposed_name for spec in CATALOG) == sorted(_exported_names())
    fallbacks = next(line for line in README.splitlines() if "`tuneserve_fallbacks_total`" in line)
    assert all(reason in fallbacks for reason in FALLBACK_REASONS)
