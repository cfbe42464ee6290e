"""Reading the gateway's /metrics in tests."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(base_url: str, token: str | None = None) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)]; `token`: server.metrics's bearer token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(base_url + "/metrics", headers=headers, timeout=10)
    r.raise_for_status()
    text = r.text
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(v for l, v in samples.get(name, []) if all(l.get(k) == want for k, want in labels.items()))
