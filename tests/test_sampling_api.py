"""The rest of the sampling surface through the gateway with the openai client:
logprobs, n > 1 and logit_bias, whole and streamed (llama.cpp here; vLLM in
tests/test_vllm_sampling.py)."""

from __future__ import annotations

import math
from typing import Any

from openai import OpenAI

from tests.support.servers import DATA_DIR, MODEL
from tuneserve.gguf.llama_loader import load_llama

ASK: Any = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_logprobs_whole_and_streamed(client: OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert r.usage is not None and len(entries) == r.usage.completion_tokens
    assert "".join(e.token for e in entries) == choice.message.content
    for e in entries:
        tops = [t.logprob for t in e.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert e.top_logprobs[0].token == e.token and math.isclose(e.top_logprobs[0].logprob, e.logprob, abs_tol=1e-4)
        assert e.logprob <= 0 and bytes(e.bytes or []).decode() == e.token

    streamed = []
    text = ""
    for chunk in client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, stream=True
    ):
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.logprobs and c.logprobs.content:
                streamed.extend(c.logprobs.content)
    assert text == choice.message.content
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]


def test_completion_logprobs(client: OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=5, logprobs=2)
    logprobs = r.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert "".join(logprobs.tokens) == r.choices[0].text
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(5)]
    assert all(len(top) == 2 for top in logprobs.top_logprobs)


def test_n_choices_whole_and_streamed(client: OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=3, max_tokens=8, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content and c.finish_reason in {"stop", "length"} for c in r.choices)
    assert r.usage is not None and r.usage.completion_tokens <= 3 * 8
    # Same seed, same choices; they differ from each other (seed + i each).
    again = client.chat.completions.create(model=MODEL, messages=ASK, temperature=1.0, seed=3, max_tokens=8, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]
    assert len({c.message.content for c in r.choices}) > 1

    texts: dict[int, str] = {}
    finished: dict[int, str] = {}
    for chunk in client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=1.0, seed=3, max_tokens=8, n=3, stream=True
    ):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert sorted(finished) == [0, 1, 2]
    assert [texts[i] for i in range(3)] == [c.message.content for c in r.choices]


def test_logit_bias_bans_a_token(client: OpenAI) -> None:
    plain = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=3, logprobs=True)
    assert plain.choices[0].logprobs is not None and plain.choices[0].logprobs.content
    first = plain.choices[0].logprobs.content[0].token
    llama = load_llama(DATA_DIR / "models" / MODEL / "model.gguf", vocab_only=True)
    [token_id] = llama.tokenize(first.encode(), add_bos=False, special=False)
    banned = client.chat.completions.create(
        model=MODEL, messages=ASK, temperature=0, max_tokens=3, logprobs=True, logit_bias={str(token_id): -100}
    )
    assert banned.choices[0].logprobs is not None and banned.choices[0].logprobs.content
    assert banned.choices[0].logprobs.content[0].token != first
