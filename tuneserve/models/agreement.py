"""Greedy agreement between two GGUF files: a cheap check that a quant still answers
like its reference. The full export quality gate (perplexity too) builds on it."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

PROBE_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 2 plus 2?",
    "Write one sentence about the sea.",
)


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


def greedy_agreement(candidate: Path, reference: Path, prompts: Sequence[str]) -> float:
    """Fraction of prompts whose greedy continuation is identical on both files."""
    a, b = greedy_texts(candidate, prompts), greedy_texts(reference, prompts)
    return sum(x == y for x, y in zip(a, b)) / len(prompts)
