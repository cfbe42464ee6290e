"""Shared bits of the benchmark scripts: machine description, percentiles, paired rounds, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))


# The vector extensions that set CPU inference speed; VMs named alike ("AMD EPYC") differ in them.
SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")


def machine() -> dict[str, Any]:
    cpu, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "simd": [flag for flag in SIMD_FLAGS if flag in flags],
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(latencies_s: list[float]) -> dict[str, float]:
    ms = [v * 1000 for v in latencies_s]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 3),
        "p90_ms": round(percentile(ms, 90), 3),
        "p99_ms": round(percentile(ms, 99), 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


def alternating_rounds(
    runs: dict[str, Callable[[], Any]], rounds: int, rate: Callable[[Any], float] = float
) -> tuple[list[dict[str, Any]], float]:
    """Rounds of one run of each of two targets, adjacent and in alternating order.

    Returns the rounds, each with the ratio second/first of `rate(result)`, and the median
    ratio. These VMs' speed drifts by a fifth to a third between minutes, more than the
    gaps measured, so only adjacent runs are compared.
    """
    first, second = runs
    results = []
    for index in range(rounds):
        order = (first, second) if index % 2 == 0 else (second, first)
        result: dict[str, Any] = {name: runs[name]() for name in order}
        result["ratio"] = round(rate(result[second]) / rate(result[first]), 4)
        results.append(result)
    return results, statistics.median(r["ratio"] for r in results)


def write_result(name: str, result: dict[str, Any], path: Path | None = None) -> Path:
    """Write `benchmarks/results/<name>.json` (or `path`, for a run that must not replace it)."""
    path = path or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), **result}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload, indent=2))
    return path
