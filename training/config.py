"""`tuneserve train` configuration: one YAML file, every key also a `--dotted.key` flag.

Paths are taken relative to the working directory (flags and YAML alike), so a
config and the flags that override it mean the same thing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tuneserve.adapters.dora import is_dora_adapter, merge_advice
from tuneserve.config import format_validation_error, layered_tree
from tuneserve.errors import ConfigError
from tuneserve.names import is_valid_name


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    train: list[Path] = Field(
        default_factory=list,
        description="Training JSONL file(s): chat `messages` (optional `tools`), alpaca "
        "(instruction/input/output) or `text` lines; dpo and orpo: prompt/chosen/rejected; "
        "cpt: `text` lines only.",
    )
    eval: list[Path] = Field(
        default_factory=list,
        description="Eval JSONL file(s). Default: data.eval_ratio of the training examples.",
    )
    eval_ratio: float = Field(
        0.05, ge=0, lt=1, description="Share of the training examples held out for eval when data.eval is empty."
    )
    max_length: int = Field(
        1024, ge=16, description="Tokens per example; longer ones are truncated (and counted)."
    )
    assistant_only_loss: bool = Field(
        True, description="Train on assistant tokens only (false: on every token)."
    )
    packing: bool | None = Field(
        None,
        description="Concatenate examples into max_length sequences (fewer pad tokens). "
        "null: the method's default, on for cpt, off for sft.",
    )

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, (str, Path)) else value


class ReplayConfig(_Section):
    path: Path | None = Field(
        None, description="General-data JSONL mixed into training against forgetting (any SFT format)."
    )
    ratio: float = Field(
        0.15, ge=0, le=0.5, description="Share of the training mix drawn from replay.path (0.1-0.2 advised)."
    )


class LoraConfig(_Section):
    r: int = Field(16, ge=1, le=512, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rsLoRA).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | str = Field(
        "all-linear",
        description="Modules to adapt: 'all-linear', a list of names ([q_proj, v_proj]) or a regex.",
    )
    use_dora: bool = Field(
        False,
        description="Weight-decomposed LoRA (DoRA). Served only merged into its base (`tuneserve merge`, "
        "operation merge_adapter), so --publish refuses it.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")


class QuantizationConfig(_Section):
    enabled: bool = Field(
        True, description="QLoRA: load the base in 4 bits with bitsandbytes (false: plain LoRA on the full-precision base)."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype of the 4-bit layers' matmuls."
    )


class OptimConfig(_Section):
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps to run; -1: derived from epochs.")
    batch_size: int = Field(4, ge=1, description="Examples per device step.")
    grad_accum: int = Field(1, ge=1, description="Steps accumulated per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "cosine", description="Decay after warmup."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of the steps spent warming up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in backward: less memory, ~30% more compute."
    )
    optimizer: Literal["adamw_torch", "adamw_8bit", "lion_8bit", "paged_adamw_8bit", "paged_adamw_32bit",
                       "paged_lion_8bit"] = Field(
        "adamw_torch",
        description="adamw_torch; adamw_8bit, lion_8bit: bitsandbytes 8-bit states (CPU or GPU); paged_*: "
        "bitsandbytes paged states, spilled to CPU memory when the GPU runs short (CUDA only: refused on a "
        "CPU host). Method galore takes galore.optimizer instead.",
    )
    seed: int = Field(42, description="Seed for init, data split, replay mix and data order.")


class RunConfig(_Section):
    save_steps: int = Field(50, ge=1, description="Checkpoint every N optimizer steps.")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (oldest removed).")
    eval_steps: int = Field(50, ge=1, description="Evaluate every N optimizer steps.")
    logging_steps: int = Field(10, ge=1, description="Log loss and learning rate every N steps.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after N evals without eval_loss improving (null: off)."
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0, description="Smallest eval_loss improvement that counts."
    )
    tensorboard: bool = Field(True, description="Write TensorBoard logs to <output_dir>/tensorboard.")
    progress_bar: bool = Field(True, description="Show a progress bar.")
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch (null: torch's default, all cores). On a shared "
        "machine 1 can be several times faster than oversubscribed OpenMP threads.",
    )


class DPOConfig(_Section):
    sft_adapter: Path | None = Field(
        None, description="SFT adapter to start from (method: dpo); it is also the reference policy."
    )
    beta: float = Field(0.1, gt=0, description="DPO beta: how far the policy may move from the reference.")


class ORPOConfig(_Section):
    sft_adapter: Path | None = Field(
        None, description="Adapter to continue (method: orpo; optional: null trains a fresh one per lora/quantization)."
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="ORPO's lambda (TRL's beta): weight of the odds-ratio term (chosen over rejected) "
        "added to the chosen answer's NLL; higher pushes harder away from rejected answers.",
    )


# The function-calling rewards (training/rewards.py); a name is `module:function`.
GRPO_REWARDS = (
    "training.rewards:parses",
    "training.rewards:right_tool",
    "training.rewards:right_arguments",
    "training.rewards:no_call",
)
_REWARD_NAME = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")


class GRPOConfig(_Section):
    sft_adapter: Path | None = Field(None, description="SFT adapter to start from (method: grpo, required).")
    num_generations: int = Field(
        4, ge=2, description="Completions sampled per prompt: the group whose rewards are compared."
    )
    max_completion_length: int = Field(96, ge=1, description="Tokens per sampled completion.")
    beta: float = Field(
        0.0, ge=0, description="KL penalty towards the SFT adapter (0: none, and no reference pass)."
    )
    temperature: float = Field(
        0.7, gt=0, description="Sampling temperature of the completions (TRL's default, 1.0, makes a "
        "small model sample mostly broken calls)."
    )
    rewards: list[str] = Field(
        default_factory=lambda: list(GRPO_REWARDS),
        min_length=1,
        description="Reward functions as module:function (TRL's reward signature). Default: the "
        "function-calling set (parses, right_tool, right_arguments, no_call).",
    )
    reward_weights: list[float] | None = Field(
        None, description="One weight per grpo.rewards entry (null: 1 each)."
    )

    @field_validator("rewards")
    @classmethod
    def _module_colon_function(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _REWARD_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not module:function (e.g. training.rewards:parses)")
        return value

    @field_validator("reward_weights")
    @classmethod
    def _one_per_reward(cls, value: list[float] | None, info: ValidationInfo) -> list[float] | None:
        rewards = info.data.get("rewards")
        if value is not None and rewards is not None and len(value) != len(rewards):
            raise ValueError(f"{len(value)} weight(s) for {len(rewards)} grpo.rewards")
        return value


class GaloreConfig(_Section):
    """method: galore (training/galore.py): every weight trains; the optimizer states of the
    target layers live in a rank-`rank` projection of their gradients."""

    rank: int = Field(128, ge=1, description="Rank of each target layer's projected gradient and optimizer states.")
    update_proj_gap: int = Field(
        200, ge=1, description="Optimizer steps between recomputing each projection (an SVD of the gradient)."
    )
    scale: float = Field(0.25, gt=0, description="Scale of the update projected back to full size (GaLore's alpha).")
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = Field(
        "std", description="Which side is projected: std, the smaller dimension of each matrix."
    )
    target_modules: list[str] | str = Field(
        # Regexes, not the fragments "attn"/"mlp": transformers warns for every non-linear module a
        # fragment matches (self_attn, mlp, act_fn: 90 lines on the tiny model), not for a regex.
        default_factory=lambda: [".*attn.*", ".*mlp.*"],
        description="Linear layers with projected gradients: a list of full-name regexes or name fragments "
        "(default: every attention and MLP projection), one regex, or 'all-linear'. The other weights "
        "(embeddings, norms) train with full AdamW states.",
    )
    optimizer: Literal["adamw", "adamw_8bit", "adafactor"] = Field(
        "adamw", description="GaLore's optimizer: galore_adamw, galore_adamw_8bit (bitsandbytes; CUDA only) or "
        "galore_adafactor."
    )


class TrainConfig(_Section):
    method: Literal["sft", "dpo", "grpo", "orpo", "cpt", "galore"] = Field(
        "sft", description="sft: supervised fine-tuning; dpo: preference tuning; grpo: RL with verifiable rewards; "
        "orpo: SFT and preference tuning in one stage (no reference, no SFT adapter needed); "
        "cpt: continued pre-training on raw text; galore: full-parameter sft through GaLore's low-rank "
        "optimizer states (writes a whole model to <output_dir>/model, not an adapter).",
    )
    base_model: str | None = Field(
        None,
        description="Base model: a local HF dir or a hub id. Default: the prepared model's hf dir "
        "(model.hf_path of the gateway settings).",
    )
    output_dir: Path | None = Field(
        None, description="Run dir: adapter/, checkpoints/, tensorboard/, training_report.json (required)."
    )
    resume: bool = Field(
        False, description="Continue from the last checkpoint in output_dir (step, optimizer, data order)."
    )
    publish: str | None = Field(
        None, description="TENANT/NAME: register the adapter in the gateway's adapter store when done."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    orpo: ORPOConfig = Field(default_factory=ORPOConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    galore: GaloreConfig = Field(default_factory=GaloreConfig)

    @field_validator("publish")
    @classmethod
    def _tenant_slash_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parts = value.split("/")
        if len(parts) != 2 or not all(is_valid_name(p) for p in parts):
            raise ValueError("must be TENANT/NAME, each [a-z0-9][a-z0-9._-]* without '--'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "TrainConfig":
        if self.output_dir is None:
            raise ValueError("output_dir is required")
        if not self.data.train:
            raise ValueError("data.train: give at least one training JSONL file")
        if self.publish is not None:
            self._refuse_dora_publish(self.output_dir)
        if self.run.early_stopping_patience is not None:
            if self.run.save_steps % self.run.eval_steps:
                raise ValueError(
                    "run.save_steps must be a multiple of run.eval_steps when early stopping is on "
                    "(the best checkpoint is the one kept)"
                )
        if self.method == "dpo" and self.dpo.sft_adapter is None:
            raise ValueError("dpo.sft_adapter: DPO starts from an SFT adapter; give its dir")
        if self.method == "dpo" and self.replay.path is not None:
            raise ValueError("replay.path: replay mixes SFT data and applies to method sft only")
        return self

    @model_validator(mode="after")
    def _grpo_consistent(self) -> "TrainConfig":
        if self.method == "grpo" and self.grpo.sft_adapter is None:
            raise ValueError("grpo.sft_adapter: GRPO starts from an SFT adapter; give its dir")
        if self.method == "grpo" and self.replay.path is not None:
            raise ValueError("replay.path: replay mixes SFT data and applies to method sft only")
        return self

    @model_validator(mode="after")
    def _orpo_consistent(self) -> "TrainConfig":
        if self.method == "orpo" and self.replay.path is not None:
            raise ValueError("replay.path: replay mixes SFT data and applies to methods sft and cpt only")
        return self

    @model_validator(mode="after")
    def _galore_consistent(self) -> "TrainConfig":
        if self.method != "galore":
            return self
        model = (self.output_dir or Path("OUTPUT_DIR")) / "model"
        if self.publish is not None:
            raise ValueError(
                f"publish: method galore trains the whole model, not an adapter, and the adapter store holds "
                f"adapters only. Serve {model} as the base model: `tuneserve serve --model.hf_path {model}` "
                f"(vLLM), or for llama.cpp `tuneserve export {model} --out {model}.gguf --type f16` and "
                f"--model.gguf_path {model}.gguf; train without publish (--publish)"
            )
        if self.quantization.enabled and "enabled" in self.quantization.model_fields_set:
            raise ValueError(
                "quantization.enabled: method galore trains every weight in float32; a 4-bit base cannot be "
                "trained that way (QLoRA is method sft with quantization.enabled)"
            )
        if self.optim.optimizer != "adamw_torch":
            raise ValueError("optim.optimizer: method galore uses its own optimizer; set galore.optimizer")
        return self

    def packing_on(self) -> bool:
        """data.packing, or the method's default: cpt packs (raw text has no turn boundaries
        to keep apart), sft does not."""
        return self.data.packing if self.data.packing is not None else self.method == "cpt"

    def _refuse_dora_publish(self, output_dir: Path) -> None:
        """No engine serves a DoRA adapter as an adapter (tuneserve/adapters/dora.py):
        refused now, not by the registry after the whole run."""
        # A method continuing an adapter (<method>.sft_adapter) trains whatever kind it is.
        start = getattr(getattr(self, self.method, None), "sft_adapter", None)
        if start is not None:
            dora = is_dora_adapter(start)
            what = f"{self.method}.sft_adapter {start} is a DoRA adapter, and so is what this run trains from it"
        else:
            dora, what = self.lora.use_dora, "lora.use_dora trains a DoRA adapter"
        if dora:
            advice = merge_advice(str(output_dir / "adapter"), self.base_model or "BASE_DIR")
            raise ValueError(f"publish: {what}. {advice}; train without publish (--publish)")

    def publish_target(self) -> tuple[str, str] | None:
        if self.publish is None:
            return None
        tenant, name = self.publish.split("/")
        return tenant, name


def load_train_config(path: Path | str | None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """YAML file (optional) < flags; raise ConfigError naming each bad key."""
    tree = layered_tree(path, overrides)
    try:
        return TrainConfig.model_validate(tree)
    except ValidationError as exc:
        message = format_validation_error(exc, str(path or "train config"))
        # pydantic prefixes model-level errors with "Value error, "; the rest already names the key.
        raise ConfigError(re.sub(r"key '\(root\)': Value error, ", "", message)) from exc
