"""Run a training job: the method's builder, callbacks, train or resume, adapter, report, publish."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path

from training import data as D
from training.arguments import check_optimizer_host
from training.callbacks import add_run_callbacks
from training.config import TrainConfig
from training.cpt import build_cpt_trainer
from training.dpo import build_dpo_trainer
from training.galore import build_galore_trainer, save_full_model
from training.grpo import build_grpo_trainer
from training.method import Builder, DataSummary
from training.model import load_tokenizer, resolve_base
from training.orpo import build_orpo_trainer
from training.report import TrainingReport, eval_curve, loss_curve, reward_curve
from training.rundir import ADAPTER_DIR, MODEL_DIR, REPORT_FILE, TENSORBOARD_DIR, check_output_dir, run_dir
from training.sft import build_sft_trainer
from tuneserve.adapters.registry import AdapterRecord, AdapterRegistry
from tuneserve.config import Settings
from tuneserve.fsutil import staged_dir

logger = logging.getLogger("tuneserve.train")

# The keys are TrainConfig.method's choices (tests/test_training.py holds them equal).
METHODS: dict[str, Builder] = {"sft": build_sft_trainer, "dpo": build_dpo_trainer, "grpo": build_grpo_trainer,
                             "orpo": build_orpo_trainer, "cpt": build_cpt_trainer,
                             "galore": build_galore_trainer}


def run_training(config: TrainConfig, settings: Settings) -> TrainingReport:
    """Train per `config`; write the adapter (a full-model method: the model) and report; publish when asked."""
    import torch

    if config.run.threads:
        torch.set_num_threads(config.run.threads)
    check_optimizer_host(config)
    out = run_dir(config)
    resume_from = check_output_dir(config)
    base = resolve_base(config.base_model, settings)
    tokenizer = load_tokenizer(base)
    built = METHODS[config.method](config, base, tokenizer)
    trainer = built.trainer
    callbacks = add_run_callbacks(trainer, config.run, out / TENSORBOARD_DIR)
    _log_data(config, base, built.data)

    started = time.monotonic()
    callbacks.stop.install()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        callbacks.stop.uninstall()
    wall = time.monotonic() - callbacks.progress.start_time
    interrupted = callbacks.stop.requested

    final_eval: dict[str, float] = {}
    if trainer.eval_dataset is not None and not interrupted:
        final_eval = trainer.evaluate()
    written = out / (MODEL_DIR if built.full_model else ADAPTER_DIR)
    with staged_dir(written) as staged:
        if built.full_model:
            save_full_model(trainer, staged)
        else:
            # Only the trained adapter: a DPO run also holds the frozen reference ("ref").
            trainer.model.save_pretrained(str(staged), selected_adapters=["default"])
    adapter_dir, model_dir = (None, written) if built.full_model else (written, None)
    held_out = None
    if built.held_out_perplexity is not None and not interrupted:
        held_out = built.held_out_perplexity(trainer.model)
        logger.info("held-out perplexity on %d text(s): base %.3f, adapter %.3f (%+.1f%%)",
                    held_out.texts, held_out.base, held_out.adapter, held_out.change_pct)
    state = trainer.state
    tokens = state.num_input_tokens_seen - callbacks.progress.start_tokens
    report = TrainingReport(
        status="interrupted" if interrupted else "completed",
        method=config.method,
        base_model=base,
        config=config,
        data={
            **built.data.model_dump(mode="json"),
            "sha256": D.files_sha256(built.files),
            "files": [str(f) for f in built.files],
        },
        steps=state.global_step,
        max_steps=state.max_steps,
        resumed_from=resume_from,
        resumed_at_step=callbacks.progress.start_step,
        epochs=state.epoch,
        loss_curve=loss_curve(state.log_history),
        eval_curve=eval_curve(state.log_history),
        reward_curve=reward_curve(state.log_history),
        eval_loss=final_eval.get("eval_loss"),
        eval_perplexity=final_eval.get("eval_perplexity"),
        held_out_perplexity=held_out,
        best_checkpoint=state.best_model_checkpoint,
        wall_time_s=round(wall, 2),
        total_time_s=round(time.monotonic() - started, 2),
        train_tokens=tokens,
        tokens_per_s=round(tokens / wall, 2) if wall > 0 else None,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        peak_gpu_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        threads=torch.get_num_threads(),
        adapter_dir=adapter_dir,
        model_dir=model_dir,
    )
    target = config.publish_target()
    if target and not interrupted:
        assert adapter_dir is not None  # config refuses publish for a full-model method
        report.published = _publish(settings, target, adapter_dir)
    report.write(out / REPORT_FILE)
    return report


def _log_data(config: TrainConfig, base: str, data: DataSummary) -> None:
    logger.info(
        "training %s on %s: %s", config.method, base, json.dumps(data.model_dump(mode="json", exclude={"truncated_examples"}))
    )
    if data.truncated:
        logger.warning("%d example(s) were truncated to data.max_length=%d tokens, e.g. %s",
                       data.truncated, config.data.max_length, ", ".join(data.truncated_examples[:3]))


def _publish(settings: Settings, target: tuple[str, str], adapter_dir: Path) -> AdapterRecord:
    record = AdapterRegistry(settings).add(target[0], target[1], adapter_dir)
    logger.info("published as %s/%s v%d", record.tenant, record.name, record.version)
    return record
