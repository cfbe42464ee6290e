"""Draw the Grafana dashboard's panels from a running Prometheus into one PNG.

Every panel of deploy/grafana/dashboards/tuneserve.json is drawn from range queries
of its own PromQL (template variables = All), so the picture shows exactly what
Grafana would. Dev-only: needs matplotlib, which this script installs when missing
(it is not in requirements/cpu.lock). benchmarks/load.py --dashboard-png calls it at
the end of a soak; by hand:

    python scripts/dashboard_png.py http://127.0.0.1:9090 docs/dashboard.png --minutes 15
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "tuneserve.json"
MATPLOTLIB = "matplotlib==3.11.2"
SCALE = {"percentunit": (100, "%"), "s": (1000, "ms"), "bool_on_off": (1, "up")}


def ensure_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", MATPLOTLIB], check=True)


def expr_for(target: dict[str, Any], rate_window: str) -> str:
    expr = target["expr"].replace("$__rate_interval", rate_window)
    for var in ("tenant", "adapter", "backend"):
        expr = expr.replace(f"${var}", ".*")
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt)


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    params = {"query": expr, "start": start, "end": end, "step": step}
    body = httpx.get(url + "/api/v1/query_range", params=params, timeout=60).json()
    if body["status"] != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def render(url: str, out: Path, start: float, end: float, rate_window: str = "1m", title: str = "") -> Path:
    ensure_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    from datetime import datetime

    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    board = json.loads(DASHBOARD.read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 5.2, rows * 2.6), squeeze=False)
    step = max(1.0, (end - start) / 200)
    for ax, panel in zip(axes.flat, panels):
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        factor, suffix = SCALE.get(unit, (1, unit))
        drawn = 0
        for target in panel["targets"]:
            for series in query_range(url, expr_for(target, rate_window), start, end, step):
                points = [(float(t), float(v) * factor) for t, v in series["values"] if v != "NaN"]
                if not points:
                    continue
                ax.plot([datetime.fromtimestamp(t) for t, _ in points], [v for _, v in points],
                        linewidth=1.2, label=legend(target["legendFormat"], series["metric"])[:40])
                drawn += 1
        ax.set_title(panel["title"], fontsize=9, loc="left")
        ax.set_ylabel(suffix, fontsize=7)
        ax.tick_params(labelsize=6)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M"))
        ax.grid(alpha=0.3)
        ax.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
        if drawn:
            ax.legend(fontsize=5, loc="upper left", ncol=2 if drawn > 4 else 1, framealpha=0.6)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=8, color="grey")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title or "tuneserve dashboard", fontsize=11, x=0.01, ha="left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prometheus_url")
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=15)
    parser.add_argument("--rate-window", default="1m")
    args = parser.parse_args()
    end = time.time()
    print(render(args.prometheus_url, args.out, end - args.minutes * 60, end, args.rate_window))


if __name__ == "__main__":
    main()
