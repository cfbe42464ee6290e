"""README stays true: every config key and every metric name is documented."""

from __future__ import annotations

import re

from prometheus_client import generate_latest

from serving.metrics import GatewayMetrics
from scripts import config_table
from tests.support.servers import ROOT
from tuneserve.config import env_name, iter_fields

README = (ROOT / "README.md").read_text()


def test_config_table_is_current() -> None:
    """Regenerate with: .venv/bin/python scripts/config_table.py"""
    assert config_table.render(README) == README
    for key, _ in iter_fields():
        assert f"`{key}`" in README, key
        assert env_name(key) in README, key


def test_every_metric_is_in_readme() -> None:
    metrics = GatewayMetrics(["m"])
    metrics.watch_engines(lambda: [])
    names = re.findall(r"^# TYPE (\S+) ", generate_latest(metrics.registry).decode(), re.M)
    assert len(names) >= 10
    for name in names:
        assert f"`{name}`" in README, name
