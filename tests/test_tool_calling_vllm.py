"""Function calling and structured outputs on vLLM, and the same answers from llama.cpp
for a tenant's adapter: one rendering, one grammar, one parser for both engines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from openai import OpenAI

from tests.support.adapters import make_adapter
from tests.support.servers import DATA_DIR, MODEL, ServerProcess, free_port, gateway
from tests.test_tool_calling_api import ASK, TIME, WEATHER, City
from tests.test_vllm_adapters import upload
from tuneserve.models.prepare import F16_GGUF_NAME

pytestmark = pytest.mark.vllm

MODEL_DIR = DATA_DIR / "models" / MODEL


def _client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tool-calling-data")


def _settings(data_dir: Path) -> dict[str, object]:
    # llama.cpp on the f16 GGUF, so agreement tests the shared path, not a quant.
    return {"data_dir": data_dir, "model.hf_path": MODEL_DIR / "hf", "model.gguf_path": MODEL_DIR / F16_GGUF_NAME}


@pytest.fixture(scope="module")
def vllm_gw(vllm: ServerProcess, data_dir: Path) -> Iterator[ServerProcess]:
    server = gateway(
        "gw-vllm-tools", {**_settings(data_dir), "engines.vllm.enabled": "true", "engines.vllm.url": vllm.base_url}
    ).start(ready_path="/ready", timeout_s=120)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def llama_gw(data_dir: Path) -> Iterator[ServerProcess]:
    server = gateway("gw-llama-tools", _settings(data_dir)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def adapter(vllm_gw: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tools-adapter") / "adapter"
    make_adapter(path, seed=7, b_std=0.2)
    upload(vllm_gw, "toolsmith", path)  # one data dir: both gateways see it
    return "toolsmith"


def _calls(message: Any) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


def test_required_call_on_vllm(vllm_gw: ServerProcess) -> None:
    r = _client(vllm_gw).chat.completions.with_raw_response.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=80
    )
    assert r.headers["x-tuneserve-backend"] == "vllm"
    choice = r.parse().choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [(name, arguments)] = _calls(choice.message)[:1]
    assert name in {"get_weather", "get_time"} and isinstance(arguments, dict)


@pytest.mark.parametrize("stream", [False, True])
def test_adapter_calls_agree_across_engines(
    vllm_gw: ServerProcess, llama_gw: ServerProcess, adapter: str, stream: bool
) -> None:
    answers = []
    for server in (vllm_gw, llama_gw):
        request: dict[str, Any] = dict(
            model=adapter, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0, max_tokens=80
        )
        if stream:
            with _client(server).chat.completions.stream(**request) as events:
                message = events.get_final_completion().choices[0].message
        else:
            message = _client(server).chat.completions.create(**request).choices[0].message
        answers.append(_calls(message))
    assert answers[0] and answers[0] == answers[1]


def test_structured_output_agrees_across_engines(vllm_gw: ServerProcess, llama_gw: ServerProcess, adapter: str) -> None:
    parsed = []
    for server in (vllm_gw, llama_gw):
        completion = _client(server).chat.completions.parse(
            model=adapter,
            messages=[{"role": "user", "content": "Describe Paris as JSON: name, country, population."}],
            response_format=City,
            temperature=0,
            max_tokens=120,
        )
        parsed.append(completion.choices[0].message.parsed)
    assert isinstance(parsed[0], City) and parsed[0] == parsed[1]


def test_fallback_keeps_tool_behaviour(data_dir: Path, adapter: str) -> None:
    # vLLM configured but unreachable: llama.cpp answers with the same protocol.
    server = gateway(
        "gw-tools-fallback", {**_settings(data_dir), "engines.vllm.enabled": "true", "engines.vllm.url": f"http://127.0.0.1:{free_port()}"}
    ).start()
    try:
        r = _client(server).chat.completions.with_raw_response.create(
            model=adapter, messages=ASK, tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=80
        )
        assert r.headers["x-tuneserve-backend"] == "llamacpp"
        assert _calls(r.parse().choices[0].message)[0][0] == "get_weather"
    finally:
        server.stop()


HISTORY: Any = {
    "model": MODEL,
    "tools": [WEATHER, TIME],
    "messages": [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21}'},
        {"role": "assistant", "content": "It is 21 °C in Paris."},
        {"role": "user", "content": "And the time there?"},
    ],
}


def test_same_prompt_tokens_through_training_llama_cpp_and_vllm(vllm: ServerProcess) -> None:
    """One rendering: training's renderer, the gateway's request on llama.cpp and on vLLM."""
    from transformers import AutoTokenizer

    from serving.api.generation import to_generation_request
    from serving.api.schemas import ChatCompletionRequest
    from serving.engines.chat_prompt import render_chat
    from serving.engines.llamacpp import prompt_tokens
    from serving.engines.vllm import renders_here
    from training.data import parse_sft, prompt_text
    from tuneserve.gguf.llama_loader import load_llama
    from tuneserve.models.chat_template import ChatTemplate
    from tuneserve.tool_calls.formats import format_for_template

    template = ChatTemplate.from_hf_dir(MODEL_DIR / "hf")
    body = ChatCompletionRequest.model_validate(HISTORY)
    request, _ = to_generation_request(body, None, format_for_template(template.source))

    llama = load_llama(MODEL_DIR / "model.gguf", vocab_only=True)
    on_llama = prompt_tokens(llama, template, request)

    assert renders_here(request)  # tool turns: the vLLM engine sends the rendered prompt
    on_vllm = httpx.post(
        vllm.base_url + "/tokenize",
        json={"model": MODEL, "prompt": render_chat(template, request), "add_special_tokens": False},
        timeout=30,
    ).json()["tokens"]

    # Training data in the same OpenAI shape, answer appended: its prompt is everything before.
    example = parse_sft({"messages": [*HISTORY["messages"], {"role": "assistant", "content": "Noon."}],
                         "tools": HISTORY["tools"]}, "test:1")
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR / "hf")
    text = prompt_text(tokenizer, example.messages[:-1], example.tools)
    in_training = tokenizer(text, add_special_tokens=False)["input_ids"]

    assert on_llama == on_vllm == in_training
    assert "get_time(timezone: string)" in text and '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
