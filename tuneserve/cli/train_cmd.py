"""`tuneserve train CONFIG.yaml`: fine-tune a (Q)LoRA adapter; every key is also a flag.

The gateway settings (data_dir, model paths, adapter limits) come from
TUNESERVE_CONFIG / TUNESERVE_* as for every command: they give the default base
model and the adapter store that --publish writes to.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tuneserve.cli.options import add_model_arguments

EXIT_INTERRUPTED = 130


def register(sub: argparse._SubParsersAction) -> None:
    from training.config import TrainConfig

    parser = sub.add_parser(
        "train",
        help="fine-tune a QLoRA/LoRA adapter: sft on chat data, dpo from an SFT adapter, orpo on "
        "preference pairs, cpt on raw text",
        description="Fine-tune a LoRA adapter. --method sft (chat/alpaca/text lines), dpo "
        "(prompt/chosen/rejected, from dpo.sft_adapter), orpo (prompt/chosen/rejected, SFT and "
        "preference in one stage, no SFT adapter needed) or cpt (continued pre-training on "
        "{\"text\"} lines, packed; the report compares base and adapter perplexity on held-out "
        "text). Data is validated before anything trains; the run "
        "dir gets adapter/ (PEFT; --method galore, full-parameter sft with GaLore's low-rank "
        "optimizer states: model/, a whole HF model), checkpoints/, tensorboard/ and training_report.json. "
        "Ctrl-C saves a checkpoint and stops; --resume continues it.",
    )
    parser.add_argument("config", metavar="CONFIG.yaml", nargs="?", type=Path, help="training config (YAML)")
    group = parser.add_argument_group(
        "training config", "every key of CONFIG.yaml, as --dotted.key VALUE (values parse as YAML; flags win)"
    )
    keys = add_model_arguments(group, TrainConfig)
    parser.set_defaults(handler=run, train_keys=keys)


def run(args: argparse.Namespace) -> int:
    from training.config import load_train_config
    from training.run import run_training
    from tuneserve.config import load_settings

    overrides = {k: v for k, v in vars(args).items() if k in set(args.train_keys)}
    config = load_train_config(args.config, overrides)
    report = run_training(config, load_settings())
    summary = {
        "status": report.status,
        "steps": report.steps,
        "final_loss": report.final_loss,
        "eval_perplexity": report.eval_perplexity,
        "tokens_per_s": report.tokens_per_s,
        "adapter_dir": str(report.adapter_dir) if report.adapter_dir else None,
        "model_dir": str(report.model_dir) if report.model_dir else None,
        "published": report.published.engine_name if report.published else None,
    }
    print(json.dumps(summary, indent=2))
    if report.interrupted:
        print(
            f"tuneserve train: interrupted at step {report.steps}; continue with --resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    return 0
