"""llama.cpp's view of a GGUF for the quality gate, the prepare check and the tests:
teacher-forced next-token scores, a decode check, greedy answers.

`teacher_forced_scores` and `decode_check` run in the check worker's child process
(isolated.py) when called through `isolated_*`; the gate and `models prepare` always use
those, so a llama.cpp crash fails the check instead of the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from pydantic import BaseModel

from tuneserve.gguf.isolated import run_isolated
from tuneserve.gguf.llama_loader import ExtraBufferTypes, file_type_name, load_llama

if TYPE_CHECKING:
    import numpy as np


class TeacherForcedRequest(BaseModel):
    gguf: Path
    sequences: list[list[int]]
    lora: Path | None = None
    # Positions before decode_from[i] are one prompt batch; the rest go one token at a time.
    decode_from: list[int] | None = None
    extra_buffer_types: ExtraBufferTypes = "auto"
    verbose: bool = False  # llama.cpp's log on stderr: the child's, for a crash report


class TokenScores(BaseModel):
    """Per position i of one sequence: llama.cpp's top token, and the log-probability it
    gives the sequence's own next token (len - 1 values)."""

    argmax: list[int]
    next_token_logprob: list[float]


class TeacherForcedResult(BaseModel):
    sequences: list[TokenScores]


class DecodeCheckRequest(BaseModel):
    gguf: Path
    prompt_tokens: int = 32
    decode_tokens: int = 8
    extra_buffer_types: ExtraBufferTypes = "auto"
    verbose: bool = False


class DecodeCheckResult(BaseModel):
    file_type: str
    decoded: int


def log_softmax(logits: np.ndarray) -> np.ndarray:
    import numpy as np

    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def teacher_forced_scores(request: TeacherForcedRequest) -> TeacherForcedResult:
    """Evaluate each sequence in this process: a prompt batch, then single-token decodes
    (the path serving takes: llama.cpp runs different matmul kernels for a batch and a
    single token, and a quant can break only one)."""
    import numpy as np

    n_ctx = max(len(s) for s in request.sequences) + 8
    llama = load_llama(
        request.gguf,
        extra_buffer_types=request.extra_buffer_types,
        lora_path=str(request.lora) if request.lora else None,
        n_ctx=n_ctx,
        n_batch=512,
        logits_all=True,
        verbose=request.verbose,
    )
    try:
        out = []
        for i, tokens in enumerate(request.sequences):
            llama.reset()
            split = len(tokens) if request.decode_from is None else request.decode_from[i]
            if split:
                llama.eval(list(tokens[:split]))
            for token in tokens[split:]:
                llama.eval([token])
            log_probs = log_softmax(np.array(llama.scores[: len(tokens)], dtype=np.float32))
            out.append(TokenScores(
                argmax=log_probs.argmax(-1).tolist(),
                next_token_logprob=log_probs[np.arange(len(tokens) - 1), tokens[1:]].tolist(),
            ))
        return TeacherForcedResult(sequences=out)
    finally:
        llama.close()


def decode_check(request: DecodeCheckRequest) -> DecodeCheckResult:
    """Load the GGUF, evaluate a prompt batch, then decode single tokens: the two paths
    a served request takes (on AMX hosts the first decode is where llama.cpp crashed)."""
    llama = load_llama(
        request.gguf,
        extra_buffer_types=request.extra_buffer_types,
        n_ctx=request.prompt_tokens + request.decode_tokens + 8,
        logits_all=True,
        verbose=request.verbose,
    )
    try:
        prompt = llama.tokenize(b"The quick brown fox jumps over the lazy dog. " * 8, add_bos=False)[: request.prompt_tokens]
        llama.eval(prompt)
        decoded = 0
        for _ in range(request.decode_tokens):
            llama.eval([int(llama.scores[llama.n_tokens - 1].argmax())])
            decoded += 1
        return DecodeCheckResult(file_type=file_type_name(int(llama.metadata.get("general.file_type", -1))), decoded=decoded)
    finally:
        llama.close()


def isolated_teacher_forced_scores(request: TeacherForcedRequest) -> TeacherForcedResult:
    request = request.model_copy(update={"verbose": True})
    return run_isolated("teacher_forced", request, TeacherForcedResult, f"scoring {request.gguf.name}")


def isolated_decode_check(request: DecodeCheckRequest) -> DecodeCheckResult:
    request = request.model_copy(update={"verbose": True})
    return run_isolated("decode_check", request, DecodeCheckResult, f"decoding with {request.gguf.name}")


def greedy_texts(
    gguf: Path, chat_template_prompts: Sequence[str], max_tokens: int = 16, extra_buffer_types: ExtraBufferTypes = "auto"
) -> list[str]:
    llama = load_llama(gguf, extra_buffer_types=extra_buffer_types, n_ctx=512)
    try:
        texts = []
        for prompt in chat_template_prompts:
            tokens = llama.tokenize(prompt.encode(), add_bos=False, special=True)
            out: list[int] = []
            for token in llama.generate(tokens, temp=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0):
                if llama.token_eos() == token or len(out) >= max_tokens:
                    break
                out.append(token)
            texts.append(llama.detokenize(out).decode("utf-8", "replace"))
        return texts
    finally:
        llama.close()
