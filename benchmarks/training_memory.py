"""Training memory on CPU: full fine-tuning (AdamW, 8-bit AdamW), GaLore, LoRA and QLoRA.

Each row is its own child process (this script with --child), so its peak RSS
(os.wait4's ru_maxrss) is that row's alone: it builds the row's trainer with the
training code `tuneserve train` uses (training.run.METHODS; full fine-tuning through
training.galore.build_full_trainer with a plain optimizer), trains a few steps on the
same function-calling examples with the same settings (the config defaults, gradient
checkpointing on), and reports RSS after loading, the optimizer state's bytes and
the trainable parameters. Writes benchmarks/results/training_memory.json.

    python benchmarks/training_memory.py [--steps 2 --threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, write_result  # before the project imports: it puts the repo root on sys.path

HF_DIR = Path(os.environ.get("TUNESERVE_DATA_DIR", ROOT / "data")).resolve() / "models" / "smollm2-135m-instruct" / "hf"
MIB = 2**20

# row -> (method, extra config keys, optimizer arguments for a full fine-tune or None)
ROWS: dict[str, tuple[str, dict[str, Any], dict[str, Any] | None]] = {
    "full_adamw": ("galore", {}, {"optim": "adamw_torch"}),
    "full_adamw_8bit": ("galore", {}, {"optim": "adamw_8bit"}),
    "galore_adamw": ("galore", {}, None),  # galore.* defaults: rank 128, .*attn.* and .*mlp.*
    "lora": ("sft", {"quantization.enabled": False}, None),
    "qlora": ("sft", {"quantization.enabled": True}, None),
}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _state_bytes(optimizer: Any) -> int:
    """Bytes of every tensor the optimizer keeps per parameter, GaLore's projections included
    (by storage: a view keeps its whole base allocated)."""
    import torch

    seen: dict[int, int] = {}

    def add(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)
        elif hasattr(value, "ortho_matrix"):  # galore_torch's GaLoreProjector
            add(value.ortho_matrix)

    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        for value in state.values():
            add(value)
    return sum(seen.values())


def child(row: str, data: Path, work: Path, steps: int, threads: int) -> None:
    import torch

    from training.config import load_train_config
    from training.galore import build_full_trainer
    from training.model import load_tokenizer
    from training.run import METHODS

    torch.set_num_threads(threads)
    imported = _rss_mib()
    method, extra, optimizer = ROWS[row]
    config = load_train_config(None, {
        "method": method, "base_model": str(HF_DIR), "output_dir": str(work / row), "data.train": [str(data)],
        "data.eval_ratio": 0, "data.max_length": 256, "optim.batch_size": 2, "optim.max_steps": steps,
        "optim.learning_rate": 1e-4, "optim.warmup_ratio": 0, "run.save_steps": steps + 1, "run.progress_bar": False,
        "run.tensorboard": False, "run.logging_steps": 1, **extra,
    })
    tokenizer = load_tokenizer(str(HF_DIR))
    if optimizer is None:
        built = METHODS[method](config, str(HF_DIR), tokenizer)
    else:
        built = build_full_trainer(config, str(HF_DIR), tokenizer, optimizer)
    trainer = built.trainer
    loaded = _rss_mib()
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    params = list(trainer.model.parameters())
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    print(json.dumps({
        "rss_imported_mib": round(imported, 1),
        "rss_loaded_mib": round(loaded, 1),
        "optimizer_state_mib": round(_state_bytes(trainer.optimizer) / MIB, 1),
        "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        "total_params": sum(p.numel() for p in params),
        "train_s": round(wall, 1),
        "s_per_step": round(wall / steps, 2),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "peak_rss_self_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


def run_row(row: str, data: Path, work: Path, steps: int, threads: int) -> dict[str, Any]:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", row, "--data", str(data),
               "--work", str(work), "--steps", str(steps), "--threads", str(threads)]
    print("+", row, flush=True)
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise SystemExit(f"{row} failed:\n{stderr[-3000:]}")
    measured = json.loads(stdout.strip().splitlines()[-1])
    return {"peak_rss_mib": measured.pop("peak_rss_self_mib"), **measured, "wall_s": round(wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per row (the states exist from the first)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per row (1 on a shared 2-core machine)")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--child", choices=list(ROWS), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data, args.work, args.steps, args.threads)
        return

    from training.datagen.function_calling import generate, write_jsonl

    with tempfile.TemporaryDirectory(prefix="tuneserve-bench-training-memory-") as tmp:
        work = Path(tmp)
        data = work / "train.jsonl"
        write_jsonl(data, generate("train", 16, seed=0))
        rows = {row: run_row(row, data, work, args.steps, args.threads) for row in args.rows}
    full = rows.get("full_adamw")
    if full:
        for row in rows.values():
            row["peak_rss_vs_full_adamw"] = round(row["peak_rss_mib"] / full["peak_rss_mib"], 3)
    write_result("training_memory", {
        "config": (
            f"SmolLM2-135M-Instruct float32 (4-bit NF4 for qlora), {args.steps} optimizer steps of batch 2 over 16 "
            "function-calling examples (166-254 tokens), data.max_length 256, gradient checkpointing on, "
            f"{args.threads} torch thread(s), CPU; lora/qlora: r 16, all-linear; galore: rank 128, "
            "update_proj_gap 200, attention and MLP projections (79% of the weights)"
        ),
        "note": (
            "peak_rss_mib is the child's ru_maxrss: Python and the imported libraries (rss_imported_mib), "
            "the weights, gradients, optimizer state and activations; rss_loaded_mib is the RSS once "
            "the trainer is built, before the first step; optimizer_state_mib counts the tensors the "
            "optimizer holds after the last step"
        ),
        "steps": args.steps,
        "threads": args.threads,
        "rows": rows,
    })


if __name__ == "__main__":
    main()
