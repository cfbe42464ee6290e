"""GRPO with verifiable rewards on function-calling data (TRL's GRPOTrainer), from an SFT adapter.

Lines: the function-calling chat lines `tuneserve eval` reads (training/evaluate.py,
`load_call_cases`; what training/datagen/function_calling.py writes): `messages` with
`tools`, the last turn the expected assistant answer (one call, or text where no offered
tool fits or after a tool result). The conversation before it is the prompt, rendered as
text through the base model's tool format exactly as SFT, eval and the gateway render it;
the expected answer becomes the reference columns the reward functions receive
(training/rewards.py): `tool_format`, `tool_names`, `expected_name`, `expected_arguments`,
`expected_content`.

Each step samples `grpo.num_generations` completions for each of `optim.batch_size`
prompts, in process with transformers' generate (no vLLM), scores them with the reward
functions, and moves the policy towards the completions that beat their group's mean. The
SFT adapter is loaded as "default", which trains; with `grpo.beta` > 0 TRL copies it to a
frozen "ref" adapter for the KL term. Only "default" is saved.
"""

from __future__ import annotations

import importlib
import json
import math
from typing import Any, Callable, Sequence

from pydantic import BaseModel

from training import data as D
from training.arguments import training_arguments
from training.config import TrainConfig
from training.evaluate import CallCase, load_call_cases
from training.method import BuiltTrainer
from training.model import build_model
from tuneserve.errors import ConfigError

RewardFunction = Callable[..., list[float | None]]


class GrpoDataSummary(BaseModel):
    train_examples: int
    eval_examples: int
    call_examples: int  # training prompts whose answer is a call
    no_call_examples: int  # ... whose answer is text
    # Nothing is truncated: a prompt over data.max_length is a data error, and a completion
    # is cut at grpo.max_completion_length (TRL logs the share as completions/clipped_ratio).
    truncated: int
    truncated_examples: list[str]
    max_length: int
    rewards: list[str]


def load_rewards(names: Sequence[str]) -> list[RewardFunction]:
    """`module:function` names as callables; a ConfigError names the bad entry."""
    functions: list[RewardFunction] = []
    seen: dict[str, str] = {}
    for i, name in enumerate(names):
        key = f"grpo.rewards[{i}]"
        module_name, _, attribute = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # any failure of the user's module is a config error
            raise ConfigError(f"{key}: {name!r}: cannot import {module_name}: {exc}") from exc
        function = getattr(module, attribute, None)
        if not callable(function):
            raise ConfigError(f"{key}: {name!r}: {module_name} has no function {attribute!r}")
        # TRL logs each reward as rewards/<__name__>/mean: two functions of one name would share it.
        short = getattr(function, "__name__", attribute)
        if short in seen:
            raise ConfigError(f"{key}: {name!r}: another reward, {seen[short]!r}, has the name {short!r}")
        seen[short] = name
        functions.append(function)
    return functions


def _prompt(tokenizer: Any, case: CallCase) -> str:
    text = D.prompt_text(tokenizer, case.prompt, case.tools)
    # TRL tokenizes text prompts with the special tokens: a template's own BOS would double.
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def _rows(tokenizer: Any, cases: Sequence[CallCase], max_length: int) -> tuple[list[dict[str, Any]], list[str]]:
    fmt = D.tool_format(tokenizer).name
    rows, problems = [], []
    for case in cases:
        prompt = _prompt(tokenizer, case)
        length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if length > max_length:
            problems.append(f"{case.where}: messages: the prompt has {length} tokens, over data.max_length={max_length}")
            continue
        rows.append({
            "prompt": prompt,
            "tool_format": fmt,
            "tool_names": case.tool_names,
            "expected_name": case.name,
            # JSON text: one Arrow type for every tool's arguments
            "expected_arguments": json.dumps(case.arguments, ensure_ascii=False),
            "expected_content": case.content,
        })
    return rows, problems


def _cases(paths: Sequence[Any]) -> tuple[list[CallCase], list[str]]:
    cases: list[CallCase] = []
    problems: list[str] = []
    for path in paths:
        try:
            cases += load_call_cases(path)
        except D.DataError as exc:
            problems += exc.problems
    return cases, problems


def _trainer_class(base: type[Any]) -> type[Any]:
    class QuietGRPOTrainer(base):
        """Leaves out of a log the rewards that applied to no completion since the last one
        (no_call on a step of calls only): TRL would log them as None, which TensorBoard
        refuses with a warning per key and step."""

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            metrics = self._metrics["train" if self.model.training else "eval"]
            for key in [k for k, v in metrics.items() if k.startswith("rewards/") and all(math.isnan(x) for x in v)]:
                del metrics[key]
            super().log(logs, start_time)

    return QuietGRPOTrainer


def build_grpo_trainer(config: TrainConfig, base: str, tokenizer: Any) -> BuiltTrainer:
    cfg, grpo = config.data, config.grpo
    rewards = load_rewards(grpo.rewards)
    train_cases, problems = _cases(cfg.train)
    eval_cases, found = _cases(cfg.eval)
    problems += found
    train_rows, found = _rows(tokenizer, train_cases, cfg.max_length)
    problems += found
    eval_rows, found = _rows(tokenizer, eval_cases, cfg.max_length)
    problems += found
    if problems:
        raise D.DataError(problems)
    if not cfg.eval:
        train_rows, eval_rows = D.split_eval(train_rows, cfg.eval_ratio, config.optim.seed)

    from datasets import Dataset
    from trl import GRPOConfig as TrlGRPOConfig
    from trl import GRPOTrainer

    model = build_model(config, base)
    # optim.batch_size counts prompts, as it counts examples for sft and dpo; TRL's batch
    # counts completions, and must hold whole groups.
    per_device = config.optim.batch_size * grpo.num_generations
    completions = config.model_copy(update={"optim": config.optim.model_copy(update={"batch_size": per_device})})
    args = training_arguments(
        completions,
        bool(eval_rows),
        args_class=TrlGRPOConfig,
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_length,
        beta=grpo.beta,
        temperature=grpo.temperature,
        reward_weights=grpo.reward_weights,
        use_vllm=False,
        log_completions=False,
        gradient_checkpointing=False,  # set on the model already (training.model.load_base)
        generation_kwargs={"use_cache": True},  # load_base turns the cache off for training
        bf16=False,  # TRL's default is True; float32 as sft trains (QLoRA computes in its compute_dtype)
    )
    # TRL counts prompt and completion tokens itself; the Trainer's count finds no
    # input_ids in GRPO's batches and would warn every step.
    args.include_num_input_tokens_seen = "no"
    trainer = _trainer_class(GRPOTrainer)(
        model=model,
        reward_funcs=rewards,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
        processing_class=tokenizer,
    )
    calls = sum(1 for row in train_rows if row["expected_name"] is not None)
    stats = GrpoDataSummary(
        train_examples=len(train_rows),
        eval_examples=len(eval_rows),
        call_examples=calls,
        no_call_examples=len(train_rows) - calls,
        truncated=0,
        truncated_examples=[],
        max_length=cfg.max_length,
        rewards=list(grpo.rewards),
    )
    return BuiltTrainer(trainer, stats, [*cfg.train, *cfg.eval])
