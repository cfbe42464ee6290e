"""Fine-tune the tiny model for function calling; measure before/after on held-out phrasings.

Steps, each a real `tuneserve` command in its own process (so peak RSS is per step):
generate data (train/test split by template, English and Korean) and the general
text set; `tuneserve eval` the base; `tuneserve train` a LoRA adapter with replay;
`tuneserve eval` base and adapter side by side; then a few QLoRA steps on the same
data to record QLoRA's tokens/s and peak RSS.

Goals: tool-name accuracy >= 90% and JSON validity >= 98% after training (over the
cases that expect a call), general perplexity up by at most 5%. The data also holds
multi-step examples (call, tool result, text answer) and requests no offered tool fits;
`no_call_accuracy` (text where text is right) is reported beside them.

    python benchmarks/finetune_function_calling.py [--train 600 --test 120 --epochs 2 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, write_result  # before the project imports: it puts the repo root on sys.path

from training.datagen.function_calling import MULTI_STEP, NO_FIT, TOOLS, write_dataset
from training.datagen.general_text import write_general

WORK = ROOT / "data" / "bench" / "finetune_function_calling"


def tuneserve(*args: str) -> None:
    command = [sys.executable, "-m", "tuneserve.cli.main", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=600, help="training examples")
    parser.add_argument("--test", type=int, default=120, help="held-out test examples")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--replay-ratio", type=float, default=0.15, help="share of general text mixed into training")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads; use 1 when other jobs share a 2-core machine (OpenMP stalls)")
    parser.add_argument("--qlora-steps", type=int, default=1, help="QLoRA steps for its throughput (0: skip)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse the LoRA run and eval of an earlier invocation (same data) if present")
    args = parser.parse_args()

    WORK.mkdir(parents=True, exist_ok=True)
    fc = write_dataset(WORK / "fc", args.train, args.test, seed=0)
    general = write_general(WORK / "general")
    threads = ["--threads", str(args.threads)]
    started = time.monotonic()

    run_dir = WORK / "run-lora"
    common = [
        "--data.train", str(fc["train"]), "--data.max_length", "384", "--data.eval_ratio", "0.05",
        "--replay.path", str(general["replay"]), "--replay.ratio", str(args.replay_ratio),
        "--lora.r", "16", "--lora.alpha", "32", "--lora.dropout", "0.05",
        "--optim.batch_size", "4", "--optim.learning_rate", str(args.lr), "--optim.scheduler", "cosine",
        "--optim.warmup_ratio", "0.05", "--optim.gradient_checkpointing", "false",
        "--run.logging_steps", "5", "--run.progress_bar", "false", "--run.threads", str(args.threads),
    ]
    eval_json = WORK / "eval.json"
    reuse = args.reuse and (run_dir / "training_report.json").is_file() and eval_json.is_file()
    if not reuse:
        _clean(run_dir)
        eval_json.unlink(missing_ok=True)
        tuneserve("train", "--output_dir", str(run_dir), "--quantization.enabled", "false",
                  "--optim.epochs", str(args.epochs), "--run.save_steps", "1000", "--run.eval_steps", "1000", *common)
        tuneserve("eval", "--function-calling", str(fc["test"]), "--general", str(general["eval"]),
                  "--adapter", f"function-calling={run_dir / 'adapter'}", "--output", str(eval_json), *threads)
    report = json.loads((run_dir / "training_report.json").read_text())
    evaluation = json.loads(eval_json.read_text())

    qlora: dict[str, Any] | None = None
    if args.qlora_steps:
        qdir = WORK / "run-qlora"
        _clean(qdir)
        tuneserve("train", "--output_dir", str(qdir), "--quantization.enabled", "true",
                  "--optim.max_steps", str(args.qlora_steps), "--run.save_steps", "1000",
                  "--run.eval_steps", "1000", *common, "--data.eval_ratio", "0")  # later flags win
        q = json.loads((qdir / "training_report.json").read_text())
        qlora = {k: q[k] for k in ("steps", "train_tokens", "wall_time_s", "tokens_per_s", "peak_rss_bytes")}

    base, tuned = evaluation["models"]["base"], evaluation["models"]["function-calling"]
    after = tuned["function_calling"]
    goals = {
        "tool_name_accuracy_ge_0.90": after["tool_name_accuracy"] >= 0.90,
        "json_validity_ge_0.98": after["json_validity"] >= 0.98,
        "general_perplexity_up_le_5pct": tuned["perplexity_change_pct"] <= 5.0,
    }
    write_result("finetune_function_calling", {
        "device": "cpu",
        "threads": args.threads,
        "data": {"train": args.train, "test": args.test, "tools": len(TOOLS), "languages": ["en", "ko"],
                 "split": "by template: every third phrasing per tool and language is test-only",
                 "kinds": {"multi_step": MULTI_STEP, "no_fit": NO_FIT,
                           "call": "the rest (tool-name, argument and exact-call scores are over these)"}},
        "method": f"LoRA r=16 alpha=32 all-linear on the float32 base, {args.replay_ratio:.0%} general-text replay",
        "before": {"function_calling": base["function_calling"], "general_perplexity": base["general_perplexity"]},
        "after": {"function_calling": after, "general_perplexity": tuned["general_perplexity"],
                  "perplexity_change_pct": tuned["perplexity_change_pct"]},
        "goals_met": goals,
        "training": {k: report[k] for k in ("steps", "epochs", "train_tokens", "wall_time_s", "tokens_per_s",
                                             "peak_rss_bytes", "eval_loss", "eval_perplexity")}
        | {"first_loss": report["loss_curve"][0]["loss"], "last_loss": report["loss_curve"][-1]["loss"],
           "data": {k: report["data"][k] for k in ("train_examples", "replay_examples", "eval_examples", "truncated", "tokens")}},
        "qlora_cpu_probe": qlora,
        "samples_after": tuned.get("samples", [])[:5],
        "samples_before": base.get("samples", [])[:5],
        "total_wall_s": round(time.monotonic() - started, 1),
    })
    return 0


def _clean(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
