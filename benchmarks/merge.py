"""Merge overhead: `tuneserve merge` against `mergekit-yaml` on the same config.

Two full models (the prepared base with a random LoRA merged in, each) are merged
linearly, alternating the two tools, `--repeats` times each. Wall time and peak RSS
(os.wait4's ru_maxrss of that one child) are taken per run; medians are compared.
Goal: tuneserve <= 1.1x mergekit-yaml in time and in memory. Writes
benchmarks/results/merge.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, write_result  # before the project imports: it puts the repo root on sys.path

BIN = Path(sys.executable).parent
HF_DIR = Path(os.environ.get("TUNESERVE_DATA_DIR", ROOT / "data")).resolve() / "models" / "smollm2-135m-instruct" / "hf"
SHARD = "1B"


def run(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{command[:3]} failed:\n{process.stderr.read().decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import yaml

    sys.path.insert(0, str(ROOT))
    from tests.support.adapters import make_adapter

    work = Path(tempfile.mkdtemp(prefix="tuneserve-bench-merge-"))
    try:
        data = work / "data"
        models = []
        for seed in (1, 2):
            make_adapter(work / f"adapter{seed}", seed=seed)
            config = work / f"fold{seed}.yaml"
            config.write_text(yaml.safe_dump({"operation": "merge_adapter", "base": str(HF_DIR), "adapter": str(work / f"adapter{seed}")}))
            run([str(BIN / "tuneserve"), "merge", str(config), "--out", str(work / f"full{seed}"), "--data_dir", str(data)])
            models.append(work / f"full{seed}")
        config = work / "linear.yaml"
        config.write_text(yaml.safe_dump({
            "merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models],
        }))
        runs: dict[str, list[tuple[float, float]]] = {"tuneserve": [], "mergekit": []}
        for i in range(args.repeats):
            for tool in ("mergekit", "tuneserve"):
                out = work / f"out-{tool}-{i}"
                if tool == "tuneserve":
                    command = [str(BIN / "tuneserve"), "merge", str(config), "--out", str(out), "--shard-size", SHARD, "--data_dir", str(data)]
                else:
                    # The options tuneserve passes to mergekit, spelled as mergekit-yaml flags.
                    command = [str(BIN / "mergekit-yaml"), str(config), str(out), "--lazy-unpickle", "--out-shard-size", SHARD, "--copy-tokenizer", "--quiet"]
                runs[tool].append(run(command))
                shutil.rmtree(out)
        med = {tool: {"wall_s": statistics.median(w for w, _ in r), "peak_rss_mib": statistics.median(m for _, m in r)} for tool, r in runs.items()}
        result = {
            "machine": machine(),
            "config": "linear merge of two float32 SmolLM2-135M models (538 MB each)",
            "repeats": args.repeats,
            "runs": {tool: [{"wall_s": round(w, 2), "peak_rss_mib": round(m, 1)} for w, m in r] for tool, r in runs.items()},
            "median": med,
            "time_ratio": med["tuneserve"]["wall_s"] / med["mergekit"]["wall_s"],
            "memory_ratio": med["tuneserve"]["peak_rss_mib"] / med["mergekit"]["peak_rss_mib"],
            "goal": "<= 1.1x time and memory",
        }
        result["met"] = result["time_ratio"] <= 1.1 and result["memory_ratio"] <= 1.1
        print(write_result("merge", result))
        print({k: result[k] for k in ("median", "time_ratio", "memory_ratio", "met")})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
