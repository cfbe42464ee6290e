"""Grammar-constrained decoding on llama.cpp, with the same xgrammar vLLM uses.

vLLM gets a request's grammar (xgrammar EBNF) as `structured_outputs.grammar` and runs
it through xgrammar (the launcher pins the backend). Here the same text is compiled by
the same library against a `TokenizerInfo` built from the GGUF's own vocabulary, so a
grammar means the same on both engines and fails to compile on both alike.

- The vocabulary: each token's bytes as llama.cpp detokenizes them; control tokens (and
  unknown/unused ones) are empty, which xgrammar treats as special: never matched by a
  grammar. The end-of-generation tokens are the grammar's stop tokens: once the grammar
  is complete only they are allowed, and sampling one ends the choice ("stop").
- `GrammarCache` is shared by an engine's workers (one GGUF): a bounded LRU of compiled
  grammars keyed by their text, behind a lock; a miss compiles in the calling worker
  thread, never on the event loop. A grammar that does not compile is InvalidRequest.
- `GrammarConstraint` is one choice's matcher: `mask` sets the logits of tokens the
  grammar forbids to -inf (from xgrammar's bitmask, as numpy), `accept` advances it.

The vocabulary and the compiler are built on the first request that needs them, in its
worker thread (~0.2 s); xgrammar itself is already loaded by the gateway at start
(tuneserve/tool_calls/grammar.py builds every request's grammar with it).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from serving.errors import InvalidRequest

log = logging.getLogger(__name__)

_SOURCE_PREFIX = re.compile(r"^\[[\d:]+\]\s*\S+:\d+:\s*")

def _not_text_attrs() -> int:
    """Tokens whose text no grammar may produce: control, unknown and unused ones."""
    import llama_cpp

    return llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN | llama_cpp.LLAMA_TOKEN_ATTR_UNUSED


def token_piece(vocab: Any, token: int, special: bool) -> bytes:
    """A token's bytes. llama-cpp-python's detokenize reads pieces into 32 bytes and
    returns nothing for longer ones (SmolLM2 has 64-byte runs of `-` and `#`)."""
    import ctypes

    import llama_cpp

    size = 64
    while True:
        buffer = (ctypes.c_char * size)()
        n = llama_cpp.llama_token_to_piece(vocab, llama_cpp.llama_token(token), buffer, size, 0, special)
        if n >= 0:
            return buffer.raw[:n]
        size = -n


class Vocabulary:
    """A GGUF's tokens as bytes, its text/special split and its end-of-generation ids."""

    def __init__(self, pieces: list[bytes], special: list[bool], eog: list[int]) -> None:
        self.pieces = pieces  # each token's bytes, special tokens rendered (for logprobs)
        self.special = special
        self.eog = eog

    @classmethod
    def from_llama(cls, llama: Any) -> "Vocabulary":
        import llama_cpp

        vocab = llama._model.vocab
        not_text = _not_text_attrs()
        pieces, special, eog = [], [], []
        for token in range(llama.n_vocab()):
            pieces.append(token_piece(vocab, token, special=True))
            special.append(bool(llama_cpp.llama_vocab_get_attr(vocab, token) & not_text))
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                eog.append(token)
        return cls(pieces, special, eog)

    def __len__(self) -> int:
        return len(self.pieces)


class GrammarCache:
    """Compiled grammars for one vocabulary, shared by threads."""

    def __init__(self, vocabulary: Vocabulary, capacity: int = 64) -> None:
        import xgrammar as xgr

        encoded = [b"" if special else piece for piece, special in zip(vocabulary.pieces, vocabulary.special)]
        self.vocab_size = len(vocabulary)
        self.tokenizer_info = xgr.TokenizerInfo(
            encoded, xgr.VocabType.RAW, vocab_size=self.vocab_size, stop_token_ids=vocabulary.eog
        )
        # Our own LRU decides what stays; xgrammar's cache would only duplicate it.
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=2, cache_enabled=False)
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self.capacity = capacity
        self._lock = threading.Lock()  # the LRU
        self._compiling = threading.Lock()  # one compile at a time: no duplicate work
        self.compile_seconds: list[float] = []

    def get(self, text: str) -> Any:
        with self._lock:
            compiled = self._compiled.get(text)
            if compiled is not None:
                self._compiled.move_to_end(text)
                return compiled
        with self._compiling:
            with self._lock:
                compiled = self._compiled.get(text)
            if compiled is None:
                compiled = self._compile(text)
            with self._lock:
                self._compiled[text] = compiled
                self._compiled.move_to_end(text)
                while len(self._compiled) > self.capacity:
                    self._compiled.popitem(last=False)
            return compiled

    def _compile(self, text: str) -> Any:
        started = time.perf_counter()
        try:
            compiled = self._compiler.compile_grammar(text)
        except Exception as exc:  # xgrammar raises RuntimeError (and subclasses) on bad EBNF
            lines = str(exc).strip().splitlines()
            # "[18:02:37] /project/cpp/grammar_parser.cc:820: EBNF parser error at ..."
            detail = _SOURCE_PREFIX.sub("", lines[0]) if lines else type(exc).__name__
            raise InvalidRequest(f"the output grammar does not compile: {detail[:500]}", param="grammar") from exc
        seconds = time.perf_counter() - started
        self.compile_seconds.append(seconds)
        log.info("compiled an output grammar (%d chars) in %.3f s", len(text), seconds)
        return compiled

    def constraint(self, text: str) -> "GrammarConstraint":
        return GrammarConstraint(self.get(text), self.vocab_size)


class GrammarConstraint:
    """One choice's grammar state: masks each step's logits, accepts each sampled token."""

    def __init__(self, compiled: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self._matcher = xgr.GrammarMatcher(compiled)
        self._vocab_size = vocab_size
        words = (vocab_size + 31) // 32
        self._bitmask = np.full((1, words), -1, dtype=np.int32)
        self._bits = self._bitmask.view(np.uint8).reshape(-1)

    def mask(self, logits: np.ndarray) -> None:
        """Forbidden tokens' logits to -inf, in place."""
        if self._matcher.fill_next_token_bitmask(self._bitmask):
            allowed = np.unpackbits(self._bits, count=self._vocab_size, bitorder="little")
            logits[allowed[: len(logits)] == 0] = -np.inf

    def accept(self, token: int) -> bool:
        return bool(self._matcher.accept_token(token))

    def is_terminated(self) -> bool:
        return bool(self._matcher.is_terminated())


class GrammarSupport:
    """An engine's lazily built vocabulary and grammar cache (same GGUF on every worker)."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._vocabulary: Vocabulary | None = None
        self._cache: GrammarCache | None = None

    def vocabulary(self, llama: Any) -> Vocabulary:
        with self._lock:
            if self._vocabulary is None:
                self._vocabulary = Vocabulary.from_llama(llama)
            return self._vocabulary

    def cache(self, llama: Any) -> GrammarCache:
        vocabulary = self.vocabulary(llama)
        with self._lock:
            if self._cache is None:
                started = time.perf_counter()
                self._cache = GrammarCache(vocabulary, self.capacity)
                log.info("xgrammar ready for llama.cpp in %.2f s", time.perf_counter() - started)
            return self._cache
