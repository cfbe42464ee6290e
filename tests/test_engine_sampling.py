"""The engines' sampling surface on the real llama.cpp engine, in-process: output
grammars (xgrammar), logprobs, logit_bias and n choices. vLLM's side and the agreement
of the two engines: tests/test_vllm_sampling.py."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest
import xgrammar as xgr

from serving.engines.base import Engine, GenerationRequest, SamplingParams, TokenLogprob, Usage
from serving.engines.llamacpp import LlamaCppEngine
from serving.errors import InvalidRequest
from tests.support.servers import DATA_DIR, MODEL
from tuneserve.models.chat_template import ChatTemplate

MODEL_DIR = DATA_DIR / "models" / MODEL
QUESTION = ({"role": "user", "content": "Which city is the capital of France? Answer in JSON."},)
# {"city": <string of at most 12 characters>}, compact: every output is short enough to
# end well inside max_tokens, whatever the seed.
CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}
CITY_GRAMMAR = str(xgr.Grammar.from_json_schema(json.dumps(CITY_SCHEMA), any_whitespace=False))


@dataclass
class Answer:
    texts: dict[int, str] = field(default_factory=dict)
    finishes: dict[int, str] = field(default_factory=dict)
    logprobs: dict[int, list[TokenLogprob]] = field(default_factory=dict)
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return self.texts.get(0, "")


class Loop:
    """One event loop for a module's engines (vLLM's client session is bound to it)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def answer(self, engine: Engine, params: SamplingParams, stream: bool = True, **request: Any) -> Answer:
        return self.run(collect(engine, params, stream, **request))


async def collect(engine: Engine, params: SamplingParams, stream: bool = True, **request: Any) -> Answer:
    request.setdefault("messages", QUESTION)
    kind = "completion" if "prompt" in request else "chat"
    answer = Answer()
    async for event in engine.generate(GenerationRequest("test", kind, params, stream=stream, **request)):
        if isinstance(event, Usage):
            answer.usage = event
            continue
        answer.texts[event.choice] = answer.texts.get(event.choice, "") + event.text
        answer.logprobs.setdefault(event.choice, []).extend(event.logprobs)
        if event.finish_reason is not None:
            assert event.choice not in answer.finishes, "a choice finished twice"
            answer.finishes[event.choice] = event.finish_reason
    assert answer.usage is not None
    return answer


def start_llama(loop: Loop) -> LlamaCppEngine:
    engine = LlamaCppEngine(
        MODEL_DIR / "model.gguf", n_ctx=2048, n_threads=2, template=ChatTemplate.from_hf_dir(MODEL_DIR / "hf")
    )
    loop.run(engine.start())
    return engine


@pytest.fixture(scope="module")
def loop() -> Iterator[Loop]:
    loop = Loop()
    yield loop
    loop.loop.close()


@pytest.fixture(scope="module")
def llama(loop: Loop) -> Iterator[LlamaCppEngine]:
    engine = start_llama(loop)
    yield engine
    loop.run(engine.stop())


def token_id(engine: LlamaCppEngine, piece: bytes) -> int:
    ids = engine._workers[0].llama.tokenize(piece, add_bos=False, special=False)
    assert len(ids) == 1, (piece, ids)
    return int(ids[0])


def test_grammar_output_always_parses_at_temperature_1(loop: Loop, llama: LlamaCppEngine) -> None:
    for seed in range(4):
        answer = loop.answer(llama, SamplingParams(max_tokens=40, temperature=1.0, seed=seed, grammar=CITY_GRAMMAR))
        value = json.loads(answer.text)
        assert set(value) == {"city"} and isinstance(value["city"], str) and len(value["city"]) <= 12, answer.text
        # The grammar completes, then only an end-of-generation token may follow.
        assert answer.finishes == {0: "stop"}


def test_a_grammar_that_does_not_compile_is_a_client_error(loop: Loop, llama: LlamaCppEngine) -> None:
    with pytest.raises(InvalidRequest, match="does not compile"):
        loop.answer(llama, SamplingParams(max_tokens=4, grammar='root ::= "a" undefined_rule'))
    # The worker lives on.
    assert loop.answer(llama, SamplingParams(max_tokens=2, temperature=0)).usage.completion_tokens == 2


def test_logprobs_count_order_and_greedy_choice(loop: Loop, llama: LlamaCppEngine) -> None:
    answer = loop.answer(llama, SamplingParams(max_tokens=6, temperature=0, logprobs=3), stream=True)
    entries = answer.logprobs[0]
    assert answer.usage is not None and len(entries) == answer.usage.completion_tokens == 6
    assert "".join(e.token for e in entries) == answer.text
    for entry in entries:
        assert len(entry.top) == 3
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
        assert entry.top[0].token == entry.token and entry.top[0].logprob == pytest.approx(entry.logprob)
        assert entry.logprob <= 0 and bytes(entry.bytes) == entry.token.encode()
    # logprobs=0: the sampled token's only.
    none = loop.answer(llama, SamplingParams(max_tokens=2, temperature=0, logprobs=0)).logprobs[0]
    assert len(none) == 2 and all(e.top == () for e in none)


def test_logit_bias_bans_a_token(loop: Loop, llama: LlamaCppEngine) -> None:
    first = loop.answer(llama, SamplingParams(max_tokens=1, temperature=0, logprobs=0)).logprobs[0][0]
    banned = token_id(llama, bytes(first.bytes))
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=1, logit_bias=((banned, -100.0),))
    biased = loop.answer(llama, params).logprobs[0][0]
    assert biased.token != first.token
    # logprobs are taken before the bias (vLLM's raw logprobs): the banned token still tops.
    assert biased.top[0].token == first.token
    with pytest.raises(InvalidRequest):
        loop.answer(llama, SamplingParams(max_tokens=1, logit_bias=((10**7, 1.0),)))


def test_n_choices_are_sequential_seeded_and_counted_once(loop: Loop, llama: LlamaCppEngine) -> None:
    params = SamplingParams(max_tokens=5, temperature=1.0, seed=11, n=3, logprobs=0)
    answer = loop.answer(llama, params)
    assert set(answer.texts) == set(answer.finishes) == {0, 1, 2}
    single = loop.answer(llama, SamplingParams(max_tokens=5, temperature=1.0, seed=11))
    assert answer.usage is not None and single.usage is not None
    assert answer.usage.prompt_tokens == single.usage.prompt_tokens
    # Choice i draws with seed + i: choice 0 is the single answer with the same seed.
    assert answer.texts[0] == single.text
    again = loop.answer(llama, SamplingParams(max_tokens=5, temperature=1.0, seed=12))
    assert answer.texts[1] == again.text
    assert answer.usage.completion_tokens == sum(len(entries) for entries in answer.logprobs.values())
