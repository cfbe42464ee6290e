"""ORPO: SFT and preference alignment in one stage, with TRL's ORPOTrainer (trl.experimental.orpo).

The loss is the NLL of the chosen answer minus beta * log-sigmoid of the log odds
ratio of chosen over rejected. There is no reference model, so no SFT adapter is
needed: a fresh LoRA/QLoRA adapter trains per `lora`/`quantization`, or
`orpo.sft_adapter` continues one. Lines are DPO's (training/preference.py).
"""

from __future__ import annotations

import json
import warnings
from typing import Any

from training.arguments import training_arguments
from training.config import TrainConfig
from training.method import BuiltTrainer
from training.model import build_model
from training.preference import load_preference_rows


def text_row(tokenizer: Any, row: dict[str, Any]) -> dict[str, str]:
    """One row as prompt/chosen/rejected text, rendered by TRL as DPO renders it.

    ORPOTrainer applies the chat template without a row's tools, which would lose
    them for a template that renders tools itself; so the rows arrive rendered."""
    from trl.data_utils import apply_chat_template

    tools = json.loads(row["tools"]) if row.get("tools") else None
    text = apply_chat_template({k: row[k] for k in ("prompt", "chosen", "rejected")}, tokenizer, tools)
    for key in ("chosen", "rejected"):
        # "...<|im_end|>\n": ORPOTrainer appends an end-of-sequence token unless the answer
        # ends with one, and would train "<|im_end|>\n<|im_end|>".
        if text[key].rstrip().endswith(tokenizer.eos_token):
            text[key] = text[key].rstrip()
    return text


def _import_orpo() -> None:
    with warnings.catch_warnings():
        # trl.experimental says on import that its API may change: trl is pinned
        # (pyproject.toml) and tests/test_training_methods.py runs this one.
        warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
        import trl.experimental.orpo  # noqa: F401


def _trainer_class(assistant_only: bool) -> Any:
    import torch
    import torch.nn.functional as F

    _import_orpo()
    from trl.experimental.orpo import ORPOTrainer

    class Trainer(ORPOTrainer):
        def concatenated_forward(self, model: Any, batch: dict[str, Any]) -> Any:
            out = super().concatenated_forward(model, batch)
            if not assistant_only:
                return out  # TRL's NLL: over prompt and answer
            # data.assistant_only_loss, as SFT trains: the NLL over the chosen answer's
            # tokens only, not the prompt's (a system prompt with a tool list would
            # otherwise be learned as text to produce).
            labels = self.concatenated_inputs(
                batch, padding_value=self.padding_value, device=self.accelerator.device
            )["concatenated_labels"]
            chosen_logits = out[2]  # [chosen rows, length - 1, vocab]: position t predicts t + 1
            chosen_labels = labels[: chosen_logits.shape[0], 1:]
            nll = F.cross_entropy(
                chosen_logits.reshape(-1, chosen_logits.shape[-1]), chosen_labels.reshape(-1).to(chosen_logits.device)
            )
            return (*out[:4], nll, *out[5:])

        def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
            # ORPO's batches have no input_ids (the Trainer's count would stay 0): count
            # the non-padding tokens of both sequences, what each step forwards.
            if self.args.include_num_input_tokens_seen == "no":
                return
            tokens = inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum()
            tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()

    return Trainer


def build_orpo_trainer(config: TrainConfig, base: str, tokenizer: Any) -> BuiltTrainer:
    from datasets import Dataset

    _import_orpo()
    from trl.experimental.orpo import ORPOConfig

    rows = load_preference_rows(config, tokenizer)
    train = [text_row(tokenizer, r) for r in rows.train]
    evaluation = [text_row(tokenizer, r) for r in rows.eval]
    model = build_model(config, base)
    args = training_arguments(
        config,
        bool(evaluation),
        args_class=ORPOConfig,
        beta=config.orpo.beta,
        max_length=config.data.max_length,
        gradient_checkpointing=False,  # set on the model already (training.model.load_base)
    )
    trainer = _trainer_class(config.data.assistant_only_loss)(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(evaluation) if evaluation else None,
        processing_class=tokenizer,
    )
    return BuiltTrainer(trainer, rows.summary, rows.files)
