"""Run a training job: data, model, HF Trainer, checkpoints, resume, Ctrl-C, report, publish.

Run dir layout (`output_dir`):

    adapter/               the PEFT adapter (adapter_config.json, adapter_model.safetensors)
    checkpoints/           checkpoint-<step>/ for --resume (optimizer, scheduler, RNG, data position)
    tensorboard/           TensorBoard event files
    training_report.json   config, data hash, base, steps, curves, perplexity, speed, memory
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from training import data as D
from training.config import TrainConfig
from training.model import build_model, load_tokenizer, resolve_base
from tuneserve.config import Settings
from tuneserve.errors import ConfigError
from tuneserve.fsutil import staged_dir

logger = logging.getLogger("tuneserve.train")

REPORT_FILE = "training_report.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"


@dataclass
class Prepared:
    """Validated, tokenized data ready for a Trainer."""

    train: Any
    eval: Any | None
    stats: dict[str, Any]
    files: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------- data


def split_eval(items: Sequence[Any], ratio: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out `ratio` of the examples (at least one when ratio > 0), the same ones for a given seed."""
    if ratio <= 0 or len(items) < 2:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(items) - 1, max(1, round(ratio * len(items))))
    held = set(order[:n_eval])
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def mix_replay(task: list[Any], replay: list[Any], ratio: float, seed: int) -> list[Any]:
    """Add replay examples so they make up `ratio` of the mix (drawn again if there are too few)."""
    if not replay or ratio <= 0:
        return task
    wanted = round(len(task) * ratio / (1 - ratio))
    if wanted > len(replay):
        # Measured on the tiny model: a 20-text pool drawn 5x per epoch for 2 epochs is
        # memorized (its perplexity fell 41 -> 1.8) and general perplexity rose 140%.
        logger.warning(
            "replay.ratio=%.2f needs %d replay examples but replay.path has %d: each repeats about %.1f "
            "times per epoch; a small pool is memorized and raises perplexity on other text "
            "(give at least %d texts or lower replay.ratio)",
            ratio, wanted, len(replay), wanted / len(replay), wanted,
        )
    rng = random.Random(seed + 1)
    picked = rng.sample(replay, wanted) if wanted <= len(replay) else [rng.choice(replay) for _ in range(wanted)]
    return task + picked


def prepare_sft_data(config: TrainConfig, tokenizer: Any) -> Prepared:
    """Validate every file and every example, then tokenize; one DataError lists all problems."""
    cfg = config.data
    problems: list[str] = []

    def load(paths: Sequence[Path]) -> list[Any]:
        # Lines that parse are still tokenized, so one report lists every problem.
        examples, found = D.collect_examples(paths)
        problems.extend(found)
        return examples

    def encode(examples: Sequence[Any]) -> tuple[list[D.Encoded], D.DataStats]:
        try:
            return D.encode_all(tokenizer, examples, cfg.max_length, cfg.assistant_only_loss)
        except D.DataError as exc:
            problems.extend(exc.problems)
            return [], D.DataStats()

    train_examples = load(cfg.train)
    eval_examples = load(cfg.eval)
    replay_examples = load([config.replay.path]) if config.replay.path else []
    train, train_stats = encode(train_examples)
    evaluation, eval_stats = encode(eval_examples)
    replay, replay_stats = encode(replay_examples)
    if problems:
        raise D.DataError(problems)
    if not cfg.eval:
        train, evaluation = split_eval(train, cfg.eval_ratio, config.optim.seed)
    task_examples = len(train)
    train = mix_replay(train, replay, config.replay.ratio, config.optim.seed)
    sequences = D.pack(train, cfg.max_length) if cfg.packing else train
    files = [*cfg.train, *cfg.eval, *([config.replay.path] if config.replay.path else [])]
    stats = {
        "train_examples": task_examples,
        "replay_examples": len(train) - task_examples,
        "replay_pool": len(replay),
        "eval_examples": len(evaluation),
        "train_sequences": len(sequences),
        "truncated": train_stats.truncated + eval_stats.truncated + replay_stats.truncated,
        "truncated_examples": (train_stats.truncated_where + eval_stats.truncated_where + replay_stats.truncated_where)[:20],
        "tokens": train_stats.tokens + replay_stats.tokens,
        "trainable_tokens": train_stats.trainable_tokens + replay_stats.trainable_tokens,
        "max_length": cfg.max_length,
        "packing": cfg.packing,
        "assistant_only_loss": cfg.assistant_only_loss,
    }
    return Prepared(
        D.EncodedDataset(sequences), D.EncodedDataset(evaluation) if evaluation else None, stats, files
    )


# ---------------------------------------------------------------- callbacks


def _callbacks_module() -> Any:
    import transformers

    return transformers


class _Hooks:
    """Trainer callbacks, built lazily so importing this module does not import torch."""

    @staticmethod
    def stop_on_signal() -> Any:
        TrainerCallback = _callbacks_module().TrainerCallback

        class StopOnSignal(TrainerCallback):  # type: ignore[misc, valid-type]
            """Ctrl-C (or SIGTERM) finishes the current step, saves a checkpoint and stops.

            A second Ctrl-C aborts at once (the last saved checkpoint stays usable)."""

            def __init__(self) -> None:
                self.requested = False
                self._previous: dict[int, Any] = {}

            def install(self) -> None:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    self._previous[signum] = signal.signal(signum, self._handle)

            def uninstall(self) -> None:
                for signum, handler in self._previous.items():
                    signal.signal(signum, handler)

            def _handle(self, signum: int, frame: Any) -> None:
                if self.requested:
                    raise KeyboardInterrupt
                self.requested = True
                logger.warning("stop requested: saving a checkpoint after this step (Ctrl-C again to abort)")

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if self.requested:
                    control.should_save = True
                    control.should_training_stop = True

        return StopOnSignal()

    @staticmethod
    def progress_log() -> Any:
        TrainerCallback = _callbacks_module().TrainerCallback

        class ProgressLog(TrainerCallback):  # type: ignore[misc, valid-type]
            """One log line per logging step (the progress bar is not in log files), and
            the tokens and time of this session, for tokens/s after a resume too."""

            def __init__(self) -> None:
                self.start_tokens = 0
                self.start_time = time.monotonic()
                self.start_step = 0

            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                self.start_tokens = state.num_input_tokens_seen
                self.start_step = state.global_step
                self.start_time = time.monotonic()

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
                shown = {k: round(v, 5) if isinstance(v, float) else v for k, v in (logs or {}).items()}
                logger.info("step %d/%d: %s", state.global_step, state.max_steps, json.dumps(shown))

        return ProgressLog()


def _trainer_class() -> Any:
    from transformers import Trainer

    class PerplexityTrainer(Trainer):  # type: ignore[misc, valid-type]
        """Adds eval_perplexity = exp(eval_loss) to every eval log (TensorBoard included)."""

        def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "eval_loss" in logs:
                logs["eval_perplexity"] = _perplexity(logs["eval_loss"])
            super().log(logs, *args, **kwargs)

    return PerplexityTrainer


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 50 else float("inf")


# ---------------------------------------------------------------- arguments


def training_arguments(config: TrainConfig, has_eval: bool, args_class: Any = None, **extra: Any) -> Any:
    import torch
    from transformers import TrainingArguments

    out = Path(config.output_dir or ".")
    optim, run = config.optim, config.run
    early = run.early_stopping_patience is not None
    if early and not has_eval:
        raise ConfigError("run.early_stopping_patience: early stopping needs eval data (data.eval or data.eval_ratio > 0)")
    cls = args_class or TrainingArguments
    return cls(
        output_dir=str(out / CHECKPOINT_DIR),
        per_device_train_batch_size=optim.batch_size,
        per_device_eval_batch_size=optim.batch_size,
        gradient_accumulation_steps=optim.grad_accum,
        learning_rate=optim.learning_rate,
        lr_scheduler_type=optim.scheduler if optim.scheduler != "constant" else "constant_with_warmup",
        warmup_steps=optim.warmup_ratio,  # a float < 1 is a share of the steps
        weight_decay=optim.weight_decay,
        max_grad_norm=optim.max_grad_norm,
        num_train_epochs=optim.epochs,
        max_steps=optim.max_steps,
        seed=optim.seed,
        data_seed=optim.seed,
        logging_steps=run.logging_steps,
        save_strategy="steps",
        save_steps=run.save_steps,
        save_total_limit=run.save_total_limit,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=run.eval_steps,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        report_to="none",  # TensorBoard is added as a callback with our own log dir
        disable_tqdm=not run.progress_bar,
        use_cpu=not torch.cuda.is_available(),
        optim="adamw_torch",
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
        **extra,
    )


# ---------------------------------------------------------------- the run


def check_output_dir(config: TrainConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuse to mix runs."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints = Path(config.output_dir or ".") / CHECKPOINT_DIR
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if config.resume:
        if last is None:
            raise ConfigError(f"resume: no checkpoint in {checkpoints} to resume from")
        return Path(last)
    if last is not None:
        raise ConfigError(
            f"output_dir: {config.output_dir} holds checkpoints of an earlier run; pass --resume "
            "to continue it or choose another output_dir"
        )
    return None


@dataclass
class RunResult:
    report: dict[str, Any]
    interrupted: bool
    adapter_dir: Path


def run_training(config: TrainConfig, settings: Settings) -> RunResult:
    """Train per `config`; write the adapter and report; publish when asked."""
    import torch

    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    out = Path(config.output_dir or ".")
    resume_from = check_output_dir(config)
    base = resolve_base(config.base_model, settings)
    tokenizer = load_tokenizer(base)
    if config.method == "dpo":
        from training.dpo import build_dpo_trainer as build
    else:
        build = build_sft_trainer
    # Data first: a typo on line 900 must not wait for the model to load.
    trainer, data_stats, files = build(config, base, tokenizer)
    stop = _Hooks.stop_on_signal()
    progress = _Hooks.progress_log()
    trainer.add_callback(stop)
    trainer.add_callback(progress)
    if config.run.tensorboard:
        from transformers.integrations import TensorBoardCallback

        tensorboard = TensorBoardCallback()
        # Its own dir, also when the writer is reopened for the eval after training.
        tensorboard.logging_dir = str(out / TENSORBOARD_DIR)
        trainer.add_callback(tensorboard)
    if config.run.early_stopping_patience is not None:
        from transformers import EarlyStoppingCallback

        trainer.add_callback(
            EarlyStoppingCallback(config.run.early_stopping_patience, config.run.early_stopping_threshold)
        )

    logger.info(
        "training %s on %s: %s", config.method, base, json.dumps({k: v for k, v in data_stats.items() if k != "truncated_examples"})
    )
    if data_stats.get("truncated"):
        logger.warning("%d example(s) were truncated to data.max_length=%d tokens, e.g. %s",
                       data_stats["truncated"], config.data.max_length, ", ".join(data_stats["truncated_examples"][:3]))
    started = time.monotonic()
    stop.install()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        stop.uninstall()
    wall = time.monotonic() - progress.start_time
    interrupted = stop.requested

    final_eval: dict[str, float] = {}
    if trainer.eval_dataset is not None and not interrupted:
        final_eval = trainer.evaluate()
    adapter_dir = out / ADAPTER_DIR
    with staged_dir(adapter_dir) as staged:
        # Only the trained adapter: a DPO run also holds the frozen reference ("ref").
        trainer.model.save_pretrained(str(staged), selected_adapters=["default"])
    state = trainer.state
    tokens = state.num_input_tokens_seen - progress.start_tokens
    report = {
        "status": "interrupted" if interrupted else "completed",
        "method": config.method,
        "base_model": base,
        "config": config.model_dump(mode="json"),
        "data": {**data_stats, "sha256": D.files_sha256(files), "files": [str(f) for f in files]},
        "steps": state.global_step,
        "max_steps": state.max_steps,
        "resumed_from": str(resume_from) if resume_from else None,
        "resumed_at_step": progress.start_step,
        "epochs": state.epoch,
        "loss_curve": [
            {"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate")}
            for e in state.log_history if "loss" in e
        ],
        "eval_curve": [
            {"step": e["step"], "eval_loss": e["eval_loss"], "eval_perplexity": e.get("eval_perplexity")}
            for e in state.log_history if "eval_loss" in e
        ],
        "eval_loss": final_eval.get("eval_loss"),
        "eval_perplexity": final_eval.get("eval_perplexity"),
        "best_checkpoint": state.best_model_checkpoint,
        "wall_time_s": round(wall, 2),
        "total_time_s": round(time.monotonic() - started, 2),
        "train_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "adapter_dir": str(adapter_dir),
        "published": None,
    }
    target = config.publish_target()
    if target and not interrupted:
        from tuneserve.adapters.registry import AdapterRegistry

        record = AdapterRegistry(settings).add(target[0], target[1], adapter_dir)
        report["published"] = record.model_dump(mode="json")
        logger.info("published as %s/%s v%d", record.tenant, record.name, record.version)
    _write_json(out / REPORT_FILE, report)
    return RunResult(report, interrupted, adapter_dir)


def build_sft_trainer(config: TrainConfig, base: str, tokenizer: Any) -> tuple[Any, dict[str, Any], list[Path]]:
    prepared = prepare_sft_data(config, tokenizer)
    model = build_model(config, base)
    args = training_arguments(config, prepared.eval is not None)
    trainer = _trainer_class()(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        data_collator=D.PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
    )
    return trainer, prepared.stats, prepared.files


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
