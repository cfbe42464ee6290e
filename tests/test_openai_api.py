"""The official openai client against a running gateway on the llama.cpp engine."""

from __future__ import annotations

import re

import httpx
import pytest
from openai import OpenAI

from tests.support.servers import MODEL, ServerProcess

# Not "the capital of France": its first token is a near-tie that the Q8_0 GGUF breaks
# the other way on some CPUs ("L'Étoile..."), though it passes the quality gate.
QUESTION = [{"role": "user", "content": "Name three primary colors."}]


def test_chat_completion_answers_with_usage(client: OpenAI) -> None:
    response = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    choice = response.choices[0]
    assert {"red", "blue"} <= set(re.findall(r"[a-z]+", choice.message.content.lower()))
    assert choice.message.role == "assistant"
    assert choice.finish_reason in {"stop", "length"}
    assert response.object == "chat.completion"
    assert response.model == MODEL
    assert response.usage.prompt_tokens > 10
    assert 0 < response.usage.completion_tokens <= 24
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streamed_chat_matches_whole_answer(client: OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    assert usage_chunks[0].usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunks[0].choices == []


def test_stream_without_include_usage_has_no_usage(client: OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=5, temperature=0, stream=True)
    )
    assert all(c.usage is None for c in chunks)


def test_raw_stream_ends_with_done(llama_gateway: ServerProcess) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", llama_gateway.base_url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_max_tokens_and_max_completion_tokens(client: OpenAI) -> None:
    a = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3, temperature=0)
    b = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=3, temperature=0)
    assert a.usage.completion_tokens == b.usage.completion_tokens == 3
    assert a.choices[0].finish_reason == "length"
    assert a.choices[0].message.content == b.choices[0].message.content


def test_stop_sequence_cuts_the_text(client: OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop = " colors "  # "The primary colors are: ..."
    assert stop in text
    cut = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client: OpenAI) -> None:
    def sample(seed: int) -> str:
        messages = [{"role": "user", "content": "Tell me a short story about a cat."}]
        r = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=24, temperature=1.0, top_p=0.95, seed=seed
        )
        return r.choices[0].message.content

    assert sample(1234) == sample(1234)
    assert len({sample(1), sample(2), sample(3)}) > 1


def test_system_and_assistant_turns_are_rendered(client: OpenAI) -> None:
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of Italy?"},
        {"role": "assistant", "content": "Rome."},
        {"role": "user", "content": "Capital of France?"},
    ]

    def prompt_tokens(conversation: list[dict[str, str]]) -> int:
        r = client.chat.completions.create(model=MODEL, messages=conversation, max_tokens=1, temperature=0)
        return r.usage.prompt_tokens

    one_turn = prompt_tokens([messages[0], messages[1]])
    assert prompt_tokens(messages) > one_turn + 8  # the assistant and second user turns
    # Without a system message the template inserts its own, longer default one.
    assert prompt_tokens(messages[1:2]) > one_turn


def test_legacy_completions(client: OpenAI) -> None:
    response = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert response.object == "text_completion"
    assert response.choices[0].text
    assert response.usage.completion_tokens <= 8
    streamed = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == response.choices[0].text


def test_models_lists_the_base(client: OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_health_and_ready(llama_gateway: ServerProcess) -> None:
    assert httpx.get(llama_gateway.base_url + "/health").json() == {"status": "ok"}
    ready = httpx.get(llama_gateway.base_url + "/ready")
    assert ready.status_code == 200
    assert ready.json()["engines"]["llamacpp"]["ready"] is True


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_backend_header(llama_gateway: ServerProcess, path: str) -> None:
    body = {"model": MODEL, "max_tokens": 2}
    body.update({"messages": QUESTION} if "chat" in path else {"prompt": "Hi"})
    r = httpx.post(llama_gateway.base_url + path, json=body, timeout=60)
    assert r.status_code == 200
    assert r.headers["x-tuneserve-backend"] == "llamacpp"
    assert r.headers["x-request-id"] == r.json()["id"]


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "$ref"] + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_openapi_documents_the_generation_routes(llama_gateway: ServerProcess) -> None:
    """/docs lists the two generation routes (plain ASGI routes FastAPI would skip), with
    the request models that validate them, beside FastAPI's own routes."""
    schema = httpx.get(llama_gateway.base_url + "/openapi.json").json()
    components = schema["components"]["schemas"]
    for path, model, field in (("/v1/chat/completions", "ChatCompletionRequest", "messages"),
                               ("/v1/completions", "CompletionRequest", "prompt")):
        operation = schema["paths"][path]["post"]
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{model}"
        assert field in components[model]["properties"] and field in components[model]["required"]
        assert {"200", "400", "404", "429", "503"} <= set(operation["responses"])
    for ref in _refs(schema):  # every reference resolves
        assert ref.removeprefix("#/components/schemas/") in components, ref
    assert httpx.get(llama_gateway.base_url + "/docs").status_code == 200


def test_openapi_documents_models_and_status_routes(llama_gateway: ServerProcess) -> None:
    """/v1/models, /health, /ready and /metrics carry their response models, and what
    they answer fits them."""
    base = llama_gateway.base_url
    schema = httpx.get(base + "/openapi.json").json()
    components = schema["components"]["schemas"]

    def response_model(path: str, status: str = "200") -> dict:
        content = schema["paths"][path]["get"]["responses"][status]["content"]["application/json"]
        return components[content["schema"]["$ref"].removeprefix("#/components/schemas/")]

    models = response_model("/v1/models")
    assert models["required"] == ["object", "data"]
    card = components[models["properties"]["data"]["items"]["$ref"].removeprefix("#/components/schemas/")]
    listed = httpx.get(base + "/v1/models").json()
    assert list(listed["data"][0]) == card["required"]  # every field, in the documented order
    assert listed["data"][0]["parent"] is None and listed["data"][0]["owned_by"] == "tuneserve"
    assert "401" in schema["paths"]["/v1/models"]["get"]["responses"]

    assert response_model("/health")["properties"]["status"]["const"] == "ok"
    ready = response_model("/ready")
    assert ready["required"] == ["status", "engines"]
    body = httpx.get(base + "/ready").json()
    assert set(body) == {"status", "engines"} and body["status"] == "ready"
    state_ref = ready["properties"]["engines"]["additionalProperties"]["$ref"]
    state = components[state_ref.removeprefix("#/components/schemas/")]
    assert set(body["engines"]["llamacpp"]) == set(state["required"])
    assert set(response_model("/ready", "503")["required"]) == {"error", "engines"}

    metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    content_type = httpx.get(base + "/metrics").headers["content-type"]
    assert list(metrics) == [content_type] and metrics[content_type]["schema"] == {"type": "string"}
