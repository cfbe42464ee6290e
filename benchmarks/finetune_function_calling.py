"""Fine-tune the tiny model for function calling with each training method; one table.

Every step is a real `tuneserve` command in its own process (so a method's peak RSS is
its own), on the same generated data, the same machine and the same thread count:

- data: train/test split by phrasing template (English and Korean), the test split also
  holds calls of tools training never sees (their schemas only in the prompt), multi-step
  examples (call, tool result, text answer) and requests no offered tool fits; preference
  pairs made from the training examples (the rejected answer is a tuned model's typical
  mistake); the general text set (replay and perplexity) and short factual questions;
- methods: `sft_lora` (LoRA on the float32 base, with replay: the reference run),
  `sft_qlora` (the same on the NF4 base, a short run: bitsandbytes' 4-bit CPU kernels
  ran ~18x slower than float32 LoRA on an AVX2 host, about as fast on an AMX one),
  `sft_dpo` (DPO from the SFT adapter), `orpo` (a fresh adapter, SFT and preference in one
  stage), `sft_grpo` (GRPO from the SFT adapter, function-calling rewards), `galore`
  (every weight, GaLore's projected AdamW, with replay);
- `tuneserve eval` of the base and of each result (`--full-model` for GaLore's model):
  tool-name and exact-call accuracy on seen tools (unseen phrasings) and on unseen tools,
  no-call accuracy, JSON validity, general perplexity change, factual retention.

Goals (issue 20): unseen-tool tool-name accuracy >= 80% for the best method; no-call
accuracy >= 90%; GRPO after SFT beats SFT alone on exact-call accuracy; general perplexity
up <= 5% for every method. And for the SFT LoRA run (earlier goals): tool-name accuracy
>= 90% and JSON validity >= 98% over the lines that expect a call.

With --reuse a step whose outputs exist from an invocation with the same settings is
skipped, so a long run that stopped resumes at its first missing step. A --methods subset
writes its JSON into the work dir (or --out), never over the committed table.

    python benchmarks/finetune_function_calling.py [--train 600 --test 100 --epochs 1 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, write_result  # before the project imports: it puts the repo root on sys.path

from training.datagen.factual import write_factual
from training.datagen.function_calling import (
    MULTI_STEP,
    NO_FIT,
    TOOLS,
    UNSEEN_SHARE,
    UNSEEN_TOOLS,
    preference_pairs,
    write_dataset,
    write_jsonl,
)
from training.datagen.general_text import write_general

WORK = ROOT / "data" / "bench" / "finetune_function_calling"
METHODS = ("sft_lora", "sft_qlora", "sft_dpo", "orpo", "sft_grpo", "galore")
NEEDS_SFT = {"sft_dpo", "sft_grpo"}
# Run dirs keep their earlier names: tool_calling.py serves run-lora's adapter.
RUN_DIRS = {"sft_lora": "run-lora", "sft_qlora": "run-qlora"}


def tuneserve(*args: str) -> None:
    command = [sys.executable, "-m", "tuneserve.cli.main", *args]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def run_dir(method: str) -> Path:
    return WORK / RUN_DIRS.get(method, f"run-{method}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=600, help="training examples")
    parser.add_argument("--test", type=int, default=100, help="held-out test examples")
    parser.add_argument("--epochs", type=float, default=1.0, help="SFT LoRA epochs")
    parser.add_argument("--lr", type=float, default=1e-3, help="SFT LoRA and ORPO learning rate")
    parser.add_argument("--replay-ratio", type=float, default=0.15, help="share of general text mixed into training")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads; use 1 when other jobs share a 2-core machine (OpenMP stalls)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--qlora-steps", type=int, default=30, help="QLoRA steps (a short run)")
    parser.add_argument("--pairs", type=int, default=128, help="preference pairs for DPO (from the SFT adapter)")
    parser.add_argument("--orpo-pairs", type=int, default=300,
                        help="preference pairs for ORPO (a fresh adapter; two answers each)")
    parser.add_argument("--dpo-lr", type=float, default=5e-5)
    parser.add_argument("--grpo-steps", type=int, default=24)
    parser.add_argument("--grpo-lr", type=float, default=1e-4)
    parser.add_argument("--galore-examples", type=int, default=200, help="training examples for GaLore (one epoch)")
    parser.add_argument("--galore-lr", type=float, default=1e-4)
    parser.add_argument("--limit", type=int, help="evaluate the first N test lines (a smoke run)")
    parser.add_argument("--reuse", action="store_true",
                        help="skip the steps an earlier invocation with the same settings completed")
    parser.add_argument("--out", type=Path,
                        help="results JSON (default: benchmarks/results/ for every method; a --methods subset "
                             "writes into the work dir, so it never replaces the committed table)")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)} (choose from {', '.join(METHODS)})")
    if NEEDS_SFT & set(methods) and "sft_lora" not in methods:
        methods.insert(0, "sft_lora")  # DPO and GRPO start from its adapter

    started = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args)
    settings = {k: v for k, v in vars(args).items() if k not in {"reuse", "methods", "out"}}
    threads = ["--threads", str(args.threads)]
    eval_inputs = ["--function-calling", str(data["test"]), "--general", str(data["general_eval"]),
                   "--factual", str(data["factual"]), *threads, *(["--limit", str(args.limit)] if args.limit else [])]

    base_eval = WORK / "eval-base.json"
    if not _reusable(args, base_eval, settings):
        tuneserve("eval", *eval_inputs, "--output", str(base_eval))
        _stamp(base_eval, settings)
    base = json.loads(base_eval.read_text())["models"]["base"]

    rows: dict[str, dict[str, Any]] = {}
    for method in methods:
        out, evaluation = run_dir(method), WORK / f"eval-{method}.json"
        if not (_reusable(args, out / "training_report.json", settings) and _reusable(args, evaluation, settings)):
            shutil.rmtree(out, ignore_errors=True)
            evaluation.unlink(missing_ok=True)
            tuneserve("train", "--output_dir", str(out), *train_args(method, args, data))
            _stamp(out / "training_report.json", settings)
            result = ["--full-model", f"{method}={out / 'model'}"] if method == "galore" else \
                ["--adapter", f"{method}={out / 'adapter'}"]
            tuneserve("eval", *eval_inputs, "--no-base", *result, "--output", str(evaluation))
            _stamp(evaluation, settings)
        report = json.loads((out / "training_report.json").read_text())
        rows[method] = row(method, report, json.loads(evaluation.read_text())["models"][method], base)

    payload = summary(args, methods, base, rows, data)
    payload["total_wall_s"] = round(time.monotonic() - started, 1)
    out = args.out or (None if set(METHODS) <= set(methods) else WORK / f"results-{'+'.join(methods)}.json")
    print(f"results: {write_result('finetune_function_calling', payload, out)}")
    print(format_table(rows))
    return 0


def prepare_data(args: argparse.Namespace) -> dict[str, Path]:
    fc = write_dataset(WORK / "fc", args.train, args.test, seed=0, unseen_tools=UNSEEN_SHARE)
    general = write_general(WORK / "general")
    train = [json.loads(line) for line in fc["train"].read_text(encoding="utf-8").splitlines()]
    pairs = preference_pairs(train, seed=0)
    paths = {"train": fc["train"], "test": fc["test"], "replay": general["replay"], "general_eval": general["eval"],
             "pairs": WORK / "pairs" / "dpo.jsonl", "orpo_pairs": WORK / "pairs" / "orpo.jsonl",
             "galore_train": WORK / "fc" / "galore-train.jsonl"}
    write_jsonl(paths["pairs"], pairs[: args.pairs])
    write_jsonl(paths["orpo_pairs"], pairs[: args.orpo_pairs])
    write_jsonl(paths["galore_train"], train[: args.galore_examples])
    paths["factual"] = write_factual(WORK / "factual")
    return paths


def train_args(method: str, args: argparse.Namespace, data: dict[str, Path]) -> list[str]:
    """One method's `tuneserve train` flags: the shared settings, then the method's (later flags win)."""
    shared = [
        "--data.max_length", "384", "--data.eval_ratio", "0",
        "--lora.r", "16", "--lora.alpha", "32", "--lora.dropout", "0.05",
        "--optim.batch_size", "4", "--optim.scheduler", "cosine", "--optim.warmup_ratio", "0.05",
        "--optim.gradient_checkpointing", "false", "--quantization.enabled", "false",
        "--run.logging_steps", "5", "--run.progress_bar", "false", "--run.threads", str(args.threads),
        "--run.save_steps", "100000", "--run.eval_steps", "100000", "--run.tensorboard", "false",
    ]
    replay = ["--replay.path", str(data["replay"]), "--replay.ratio", str(args.replay_ratio)]
    sft_adapter = str(run_dir("sft_lora") / "adapter")
    per_method = {
        "sft_lora": ["--data.train", str(data["train"]), *replay, "--optim.epochs", str(args.epochs),
                     "--optim.learning_rate", str(args.lr)],
        "sft_qlora": ["--data.train", str(data["train"]), *replay, "--quantization.enabled", "true",
                      "--optim.max_steps", str(args.qlora_steps), "--optim.learning_rate", str(args.lr)],
        "sft_dpo": ["--method", "dpo", "--dpo.sft_adapter", sft_adapter, "--data.train", str(data["pairs"]),
                    "--optim.epochs", "1", "--optim.learning_rate", str(args.dpo_lr)],
        "orpo": ["--method", "orpo", "--data.train", str(data["orpo_pairs"]), "--optim.epochs", "1",
                 "--optim.learning_rate", str(args.lr)],
        "sft_grpo": ["--method", "grpo", "--grpo.sft_adapter", sft_adapter, "--data.train", str(data["train"]),
                     "--optim.max_steps", str(args.grpo_steps), "--optim.batch_size", "2",
                     "--optim.learning_rate", str(args.grpo_lr), "--grpo.num_generations", "4",
                     "--grpo.max_completion_length", "64", "--optim.warmup_ratio", "0", "--run.logging_steps", "1"],
        "galore": ["--method", "galore", "--data.train", str(data["galore_train"]), *replay, "--optim.epochs", "1",
                   "--optim.learning_rate", str(args.galore_lr)],
    }
    return [*shared, *per_method[method]]


def _scores(fc: dict[str, Any], split: str | None) -> dict[str, Any]:
    return fc if split is None else fc.get("by_split", {}).get(split, {})


def row(method: str, report: dict[str, Any], result: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    fc = result["function_calling"]
    seen, unseen, no_call = _scores(fc, "seen_tools"), _scores(fc, "unseen_tools"), _scores(fc, "no_call")
    change = 100 * (result["general_perplexity"] / base["general_perplexity"] - 1)
    return {
        "seen_tool_name": seen.get("tool_name_accuracy"),
        "seen_exact_call": seen.get("exact_call_accuracy"),
        "unseen_tool_name": unseen.get("tool_name_accuracy"),
        "unseen_exact_call": unseen.get("exact_call_accuracy"),
        "no_call": no_call.get("no_call_accuracy"),
        "after_tool_result": _scores(fc, "multi_step").get("no_call_accuracy"),
        "tool_name": fc["tool_name_accuracy"],
        "exact_call": fc["exact_call_accuracy"],
        "json_validity": fc["json_validity"],
        "general_perplexity": result["general_perplexity"],
        "perplexity_change_pct": change,
        "factual_retained": result.get("factual_retained"),
        "training": {k: report.get(k) for k in ("method", "steps", "epochs", "train_tokens", "wall_time_s",
                                                 "tokens_per_s", "peak_rss_bytes")}
        | ({"reward_first": report["reward_curve"][0], "reward_last": report["reward_curve"][-1]}
           if report.get("reward_curve") else {}),
        "function_calling": fc,
        "samples": result.get("samples", [])[:4],
    }


def summary(args: argparse.Namespace, methods: list[str], base: dict[str, Any], rows: dict[str, dict[str, Any]],
            data: dict[str, Path]) -> dict[str, Any]:
    def best(key: str) -> tuple[str | None, float | None]:
        scored = [(m, r[key]) for m, r in rows.items() if r[key] is not None]
        return max(scored, key=lambda s: s[1]) if scored else (None, None)

    goals: dict[str, Any] = {}
    unseen_best = best("unseen_tool_name")
    if unseen_best[1] is not None:
        goals["unseen_tool_name_ge_0.80_best_method"] = {"met": unseen_best[1] >= 0.80, "method": unseen_best[0],
                                                         "value": unseen_best[1]}
    goals["no_call_ge_0.90"] = {m: r["no_call"] is not None and r["no_call"] >= 0.90 for m, r in rows.items()}
    if "sft_grpo" in rows and "sft_lora" in rows:
        goals["grpo_exact_call_gt_sft"] = rows["sft_grpo"]["exact_call"] > rows["sft_lora"]["exact_call"]
    goals["perplexity_up_le_5pct"] = {m: r["perplexity_change_pct"] <= 5.0 for m, r in rows.items()}
    if "sft_lora" in rows:
        goals["sft_lora_tool_name_ge_0.90"] = rows["sft_lora"]["tool_name"] >= 0.90
        goals["sft_lora_json_validity_ge_0.98"] = rows["sft_lora"]["json_validity"] >= 0.98
    return {
        "device": "cpu",
        "threads": args.threads,
        "settings": {k: v for k, v in vars(args).items() if k not in {"reuse"}} | {"methods": methods},
        "data": {"train": args.train, "test": args.test, "tools": len(TOOLS), "unseen_tools": len(UNSEEN_TOOLS),
                 "languages": ["en", "ko"],
                 "split": "by template: every third phrasing per tool and language is test-only; "
                 f"{UNSEEN_SHARE:.0%} of the test lines call a tool training never sees",
                 "kinds": {"multi_step": MULTI_STEP, "no_fit": NO_FIT},
                 "files": {k: str(v.relative_to(ROOT)) for k, v in data.items()}},
        "base": {"function_calling": base["function_calling"], "general_perplexity": base["general_perplexity"],
                 "factual": base.get("factual", {}).get("accuracy")},
        "methods": rows,
        "goals_met": goals,
    }


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}"

    columns = [("method", lambda m, r: m),
               ("seen name", lambda m, r: pct(r["seen_tool_name"])), ("seen exact", lambda m, r: pct(r["seen_exact_call"])),
               ("unseen name", lambda m, r: pct(r["unseen_tool_name"])),
               ("unseen exact", lambda m, r: pct(r["unseen_exact_call"])),
               ("no call", lambda m, r: pct(r["no_call"])), ("json", lambda m, r: pct(r["json_validity"])),
               ("ppl", lambda m, r: f"{r['perplexity_change_pct']:+.1f}%"),
               ("facts kept", lambda m, r: pct(r["factual_retained"])),
               ("tok/s", lambda m, r: str(r["training"]["tokens_per_s"])),
               ("RSS MiB", lambda m, r: str(round(r["training"]["peak_rss_bytes"] / 2**20)))]
    table = [[c[0] for c in columns]] + [[f(m, r) for _, f in columns] for m, r in rows.items()]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)


def _stamp(path: Path, settings: dict[str, Any]) -> None:
    path.with_name(path.name + ".settings").write_text(json.dumps(settings, sort_keys=True, default=str))


def _reusable(args: argparse.Namespace, path: Path, settings: dict[str, Any]) -> bool:
    stamp = path.with_name(path.name + ".settings")
    return bool(args.reuse and path.is_file() and stamp.is_file()
                and stamp.read_text() == json.dumps(settings, sort_keys=True, default=str))


if __name__ == "__main__":
    sys.exit(main())
