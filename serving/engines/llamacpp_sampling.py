"""What llama.cpp's sampler does to each step's logits beyond its own chain: the output
grammar, OpenAI's logit_bias, and the log probabilities a request asked for.

`StepShaper` is a llama-cpp-python logits processor (`generate(logits_processor=...)`):
llama-cpp-python runs it as a custom sampler at the head of the chain, on the raw logits
indexed by token id, before penalties, top-p, temperature and the draw. In it, in vLLM's
order (gpu_model_runner applies the grammar bitmask to the logits, then the sampler
takes its raw logprobs, then its logits processors add logit_bias):

1. the grammar masks forbidden tokens to -inf;
2. the logprobs are taken from these logits (vLLM's default `raw_logprobs`: after the
   grammar, before bias, penalties and temperature), kept until the token is known;
3. logit_bias is added.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from serving.engines.base import TokenLogprob, TopLogprob
from serving.engines.llamacpp_grammar import GrammarConstraint, Vocabulary

# What OpenAI and vLLM report for an impossible token instead of -inf.
_FLOOR = -9999.0


class StepShaper:
    def __init__(
        self,
        constraint: GrammarConstraint | None,
        bias: Sequence[tuple[int, float]],
        top_logprobs: int | None,
    ) -> None:
        self.constraint = constraint
        self._bias_ids = np.array([t for t, _ in bias], dtype=np.intp)
        self._bias_values = np.array([b for _, b in bias], dtype=np.float32)
        self.top_logprobs = top_logprobs
        self._scores: np.ndarray | None = None
        self._work: np.ndarray | None = None

    def __call__(self, input_ids: Any, logits: np.ndarray) -> np.ndarray:
        if self.constraint is not None:
            self.constraint.mask(logits)
        if self.top_logprobs is not None:
            if self._scores is None:
                self._scores = np.empty(len(logits), dtype=np.float32)
                self._work = np.empty(len(logits), dtype=np.float32)
            np.copyto(self._scores, logits)
        if self._bias_ids.size:
            logits[self._bias_ids] += self._bias_values
        return logits

    def logprob(self, token: int, vocabulary: Vocabulary) -> TokenLogprob:
        """The sampled token's log probability and the top alternatives of its step."""
        assert self._scores is not None and self._work is not None and self.top_logprobs is not None
        scores, work = self._scores, self._work
        peak = float(scores.max())
        np.subtract(scores, peak, out=work)
        np.exp(work, out=work)
        logz = peak + float(np.log(work.sum(dtype=np.float64)))
        k = min(self.top_logprobs, len(scores))
        top: tuple[TopLogprob, ...] = ()
        if k:
            best = np.argpartition(scores, len(scores) - k)[len(scores) - k :]
            best = best[np.argsort(-scores[best], kind="stable")]
            top = tuple(_top(int(t), float(scores[t]) - logz, vocabulary) for t in best)
        piece = vocabulary.pieces[token]
        return TokenLogprob(
            piece.decode("utf-8", "replace"), max(float(scores[token]) - logz, _FLOOR), tuple(piece), top
        )


def _top(token: int, logprob: float, vocabulary: Vocabulary) -> TopLogprob:
    piece = vocabulary.pieces[token]
    return TopLogprob(piece.decode("utf-8", "replace"), max(logprob, _FLOOR), tuple(piece))
