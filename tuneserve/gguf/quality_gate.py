"""Quality gate: does an exported GGUF (optionally with a GGUF LoRA) still behave like
the HF model (optionally with its PEFT adapter) it was made from?

Two measurements against the HF reference in float32 (transformers, +PEFT):

- **Perplexity** of a held-out text: `ppl(candidate) / ppl(reference)` must stay at or
  under `max_perplexity_ratio`.
- **Greedy agreement** on N chat prompts: the reference's greedy continuation is fed to
  llama.cpp token by token (the decode path serving uses), and the share of positions
  where llama.cpp's top-1 next token equals the reference's must reach
  `min_token_agreement`.

Why per-token and not "the whole greedy answer is identical": on a small model a
single near-tie flips the rest of the answer. Measured on SmolLM2-135M on this CPU:
Q8_0 agrees with f16 on ~96% of next tokens and its perplexity is within 1%, yet the
first token of "What is the capital of France?" flips ("The" -> "L'") and whole-string
equality reports 1 of 4 prompts. Whole-answer matches are still measured and reported
(`greedy_exact_matches`), they just do not decide.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tuneserve.errors import TuneserveError
from tuneserve.fsutil import write_atomic
from tuneserve.gguf.agreement import TeacherForcedRequest, isolated_teacher_forced_scores, log_softmax
from tuneserve.gguf.isolated import CheckCrashed
from tuneserve.gguf.llama_loader import ExtraBufferTypes

HELD_OUT_TEXT = """\
The river begins high in the mountains, where snow melts each spring and runs down \
through narrow valleys. Farmers along its banks have grown wheat and barley for \
centuries, and the small towns that line the water still hold markets every week. In \
the summer, children swim in the shallow bends while their parents fish from wooden \
boats. The water is cold and clear, and on a calm morning you can see the stones on the \
bottom.
Scientists measure the flow of the river every day. They have found that it carries \
less water than it did fifty years ago, because the glaciers that feed it are \
shrinking. The towns have begun to plan for drier years: they store water in new \
reservoirs, repair old canals, and teach farmers to use drip irrigation.
Question: What is the capital of France? Answer: The capital of France is Paris. \
Question: How many days are in a week? Answer: There are seven days in a week.
"""

GATE_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 2 plus 2?",
    "Write one sentence about the sea.",
    "Give me a synonym for happy.",
    "What color is the sky?",
    "Translate 'hello' to Spanish.",
    "Who wrote Romeo and Juliet?",
)


class QualityGateFailed(TuneserveError):
    """The exported model does not behave like its reference; nothing was published."""

    def __init__(self, message: str, report: "GateReport") -> None:
        super().__init__(message)
        self.report = report


class GateConfig(BaseModel):
    """Thresholds and inputs of the gate; every export job carries one."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    # Near-lossless bar: Q8_0/Q6_K/bf16 of the tiny model measure <= 1.01 here, Q4_K_M
    # 1.08 and Q5_K_M 1.13 (see README, "Quality gate").
    max_perplexity_ratio: float = Field(1.05, ge=1.0)
    min_token_agreement: float = Field(0.90, ge=0.0, le=1.0)
    prompts: list[str] = Field(default_factory=lambda: list(GATE_PROMPTS), min_length=1)
    max_new_tokens: int = Field(24, ge=1, le=256)
    text_file: Path | None = None  # held-out text; default: HELD_OUT_TEXT
    max_text_tokens: int = Field(512, ge=16)


class GateReport(BaseModel):
    passed: bool
    failures: list[str]
    # Set when llama.cpp died while scoring the candidate (it runs in a child process,
    # so a native crash fails the gate instead of the command); the measurements are then
    # None.
    crash: str | None = None
    reference_perplexity: float
    candidate_perplexity: float | None
    perplexity_ratio: float | None
    text_top1_agreement: float | None
    token_agreement: float | None
    greedy_exact_matches: int | None
    prompts: int
    text_tokens: int
    continuation_tokens: int
    thresholds: dict[str, float]


class ReferenceRun(BaseModel):
    """What the HF reference produced; cached, since every export of one model shares it."""

    text_ids: list[int]
    text_logprobs: list[float]  # log p(text_ids[i+1] | text_ids[:i+1])
    text_argmax: list[int]
    prompts: list[list[int]]
    continuations: list[list[int]]  # greedy, ending with EOS when the model stopped


def _reference_run(hf_dir: Path, adapter_dir: Path | None, config: GateConfig) -> ReferenceRun:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneserve.models.chat_template import ChatTemplate

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        # Folded in (float32): the same function as the unmerged PeftModel, and
        # generation runs at the base model's speed.
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    model.eval()
    text = config.text_file.read_text() if config.text_file else HELD_OUT_TEXT
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"][: config.max_text_tokens]
    if len(text_ids) < 16:
        raise TuneserveError(f"gate.text_file: {config.text_file} has fewer than 16 tokens")
    template = ChatTemplate.from_hf_dir(hf_dir)
    prompts = [
        tokenizer(template.render([{"role": "user", "content": p}]), add_special_tokens=False)["input_ids"]
        for p in config.prompts
    ]
    eos = tokenizer.eos_token_id
    continuations = []
    with torch.no_grad():
        log_probs = log_softmax(model(input_ids=torch.tensor([text_ids])).logits[0].float().numpy())
        for prompt in prompts:
            out = model.generate(
                input_ids=torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=config.max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
            continuation = out[0, len(prompt) :].tolist()
            if eos in continuation:
                continuation = continuation[: continuation.index(eos) + 1]
            continuations.append(continuation)
    return ReferenceRun(
        text_ids=text_ids,
        text_logprobs=log_probs[np.arange(len(text_ids) - 1), text_ids[1:]].tolist(),
        text_argmax=log_probs.argmax(-1).tolist(),
        prompts=prompts,
        continuations=continuations,
    )


def _cache_key(hf_dir: Path, adapter_dir: Path | None, config: GateConfig) -> str:
    digest = hashlib.sha256(b"gate-reference-v1")
    for directory in (hf_dir, adapter_dir):
        if directory is None:
            continue
        for file in sorted(directory.iterdir()):
            if file.is_file() and file.suffix in (".json", ".safetensors", ".jinja"):
                stat = file.stat()
                digest.update(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    text = config.text_file.read_text() if config.text_file else HELD_OUT_TEXT
    digest.update(json.dumps([text, config.prompts, config.max_new_tokens, config.max_text_tokens]).encode())
    return digest.hexdigest()[:32]


def reference_run(
    hf_dir: Path, adapter_dir: Path | None, config: GateConfig, cache_dir: Path | None
) -> ReferenceRun:
    if cache_dir is None:
        return _reference_run(hf_dir, adapter_dir, config)
    cached = cache_dir / f"{_cache_key(hf_dir, adapter_dir, config)}.json"
    if cached.is_file():
        return ReferenceRun.model_validate_json(cached.read_text())
    run = _reference_run(hf_dir, adapter_dir, config)
    write_atomic(cached, run.model_dump_json())
    return run


def run_gate(
    candidate_gguf: Path,
    reference_hf: Path,
    config: GateConfig,
    *,
    candidate_lora: Path | None = None,
    reference_adapter: Path | None = None,
    cache_dir: Path | None = None,
    extra_buffer_types: ExtraBufferTypes = "auto",
) -> GateReport:
    """Measure `candidate_gguf` (+ `candidate_lora`) against `reference_hf` (+ adapter).

    `cache_dir` keeps the reference's outputs (keyed on its files and the gate inputs).
    llama.cpp scores the candidate in a child process: a crash there is a failed gate."""
    import numpy as np

    ref = reference_run(reference_hf, reference_adapter, config, cache_dir)
    sequences = [p + c for p, c in zip(ref.prompts, ref.continuations)]
    ref_ppl = float(math.exp(-float(np.mean(ref.text_logprobs))))
    thresholds = {
        "max_perplexity_ratio": config.max_perplexity_ratio,
        "min_token_agreement": config.min_token_agreement,
    }
    sizes: dict[str, Any] = dict(
        prompts=len(ref.prompts),
        text_tokens=len(ref.text_ids),
        continuation_tokens=sum(len(c) for c in ref.continuations),
        thresholds=thresholds,
    )
    try:
        candidate = isolated_teacher_forced_scores(TeacherForcedRequest(
            gguf=candidate_gguf,
            sequences=[ref.text_ids, *sequences],
            lora=candidate_lora,
            decode_from=[len(ref.text_ids), *(len(p) for p in ref.prompts)],
            extra_buffer_types=extra_buffer_types,
        )).sequences
    except CheckCrashed as crash:
        return GateReport(
            passed=False, failures=[str(crash)], crash=crash.signal_name, reference_perplexity=ref_ppl,
            candidate_perplexity=None, perplexity_ratio=None, text_top1_agreement=None,
            token_agreement=None, greedy_exact_matches=None, **sizes,
        )
    cand_logprobs = np.array(candidate[0].next_token_logprob)
    cand_ppl = float(math.exp(-float(np.mean(cand_logprobs))))
    text_top1 = float((np.array(ref.text_argmax) == np.array(candidate[0].argmax)).mean())

    agree = total = exact = 0
    for prompt, continuation, scores in zip(ref.prompts, ref.continuations, candidate[1:]):
        # argmax[j] predicts token j+1: the continuation is predicted from len(prompt)-1 on.
        predicted = np.array(scores.argmax[len(prompt) - 1 : len(prompt) - 1 + len(continuation)])
        hits = predicted == np.array(continuation)
        agree += int(hits.sum())
        total += len(continuation)
        # Agreeing at every step of the reference's path is exactly what makes a free
        # greedy run on the candidate reproduce the reference's answer.
        exact += bool(hits.all())
    token_agreement = agree / total if total else 1.0

    ratio = cand_ppl / ref_ppl
    failures = []
    if not math.isfinite(ratio) or ratio > config.max_perplexity_ratio:
        failures.append(
            f"perplexity {cand_ppl:.3f} is {ratio:.3f}x the HF reference's {ref_ppl:.3f} "
            f"(gate.max_perplexity_ratio: {config.max_perplexity_ratio})"
        )
    if token_agreement < config.min_token_agreement:
        failures.append(
            f"greedy next-token agreement with the HF reference is {token_agreement:.1%} "
            f"over {total} tokens of {len(ref.prompts)} prompts "
            f"(gate.min_token_agreement: {config.min_token_agreement:.0%})"
        )
    return GateReport(
        passed=not failures,
        failures=failures,
        reference_perplexity=ref_ppl,
        candidate_perplexity=cand_ppl,
        perplexity_ratio=ratio if math.isfinite(ratio) else float("inf"),
        text_top1_agreement=text_top1,
        token_agreement=token_agreement,
        greedy_exact_matches=exact,
        **sizes,
    )
