"""llama.cpp's view of a GGUF for the export quality gate and the tests: greedy answers
and teacher-forced next-token logits."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def greedy_texts(gguf: Path, chat_template_prompts: Sequence[str], max_tokens: int = 16) -> list[str]:
    from llama_cpp import Llama

    llama = Llama(model_path=str(gguf), n_ctx=512, verbose=False)
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


def _llama(gguf: Path, lora: Path | None, n_ctx: int, n_batch: int = 512) -> "Llama":  # noqa: F821
    from llama_cpp import Llama

    return Llama(
        model_path=str(gguf),
        lora_path=str(lora) if lora else None,
        n_ctx=n_ctx,
        n_batch=n_batch,
        logits_all=True,
        verbose=False,
    )


def teacher_forced_logits(
    gguf: Path,
    sequences: Sequence[Sequence[int]],
    lora: Path | None = None,
    decode_from: Sequence[int] | None = None,
) -> list["np.ndarray"]:  # noqa: F821
    """llama.cpp's next-token logits at every position of each token sequence.

    Positions before `decode_from[i]` are evaluated as one prompt batch; the rest one
    token at a time, which is the decode path serving takes (llama.cpp runs different
    matmul kernels for a batch and for a single token, and a quant can break only one).
    """
    import numpy as np

    n_ctx = max(len(s) for s in sequences) + 8
    llama = _llama(gguf, lora, n_ctx)
    try:
        out = []
        for i, tokens in enumerate(sequences):
            llama.reset()
            split = len(tokens) if decode_from is None else decode_from[i]
            if split:
                llama.eval(list(tokens[:split]))
            for token in tokens[split:]:
                llama.eval([token])
            out.append(np.array(llama.scores[: len(tokens)], dtype=np.float32))
        return out
    finally:
        llama.close()

