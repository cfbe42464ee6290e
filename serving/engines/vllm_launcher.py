"""Start and supervise a vLLM OpenAI server process (engines.vllm.launch).

The process is restarted when it exits or stays unhealthy past the start-up
timeout. Readiness is the vLLM engine's health probe; the launcher only keeps a
process alive. The child gets SIGTERM if the gateway dies, so no vLLM is orphaned.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tuneserve.config import AdaptersS3Config, VLLMConfig, VLLMLaunchConfig
from tuneserve.errors import ConfigError

log = logging.getLogger(__name__)

# vllm_plugin/lora_resolver.py's names (the gateway must not import the plugin, which
# runs inside vLLM's processes; tests/test_lora_resolver.py checks they agree).
ADAPTERS_DIR_ENV = "TUNESERVE_ADAPTERS_DIR"
BASE_ENV = "TUNESERVE_ADAPTERS_BASE"
PLUGIN_NAME = "tuneserve_lora_resolver"
S3_BUCKET_ENV = "TUNESERVE_ADAPTERS_S3_BUCKET"
S3_PREFIX_ENV = "TUNESERVE_ADAPTERS_S3_PREFIX"
S3_ENDPOINT_URL_ENV = "TUNESERVE_ADAPTERS_S3_ENDPOINT_URL"
S3_REGION_ENV = "TUNESERVE_ADAPTERS_S3_REGION"

_PR_SET_PDEATHSIG = 1


def _own_group_dying_with_parent() -> None:
    # Own process group, so stop() reaches vLLM's engine and worker children too.
    os.setsid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the gateway's stop() still terminates the child


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def vllm_command(vllm: VLLMConfig, model_path: Path, served_name: str, max_model_len: int) -> list[str]:
    config = vllm.launch
    lora = (
        [
            "--enable-lora",
            "--max-loras",
            str(vllm.max_loras),
            "--max-cpu-loras",
            str(vllm.max_cpu_loras),
            "--max-lora-rank",
            str(vllm.max_lora_rank),
        ]
        if vllm.enable_lora
        else []
    )
    return [
        config.python or sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_path),
        "--served-model-name",
        served_name,
        "--host",
        "127.0.0.1",
        "--port",
        str(config.port),
        "--max-model-len",
        str(max_model_len),
        "--gpu-memory-utilization",
        str(config.gpu_memory_utilization),
        "--dtype",
        config.dtype,
        # Sampling defaults come from the request, as on llama.cpp, not generation_config.json.
        "--generation-config",
        "vllm",
        # Output grammars (structured_outputs.grammar) through xgrammar only, never
        # "auto"'s fallback to guidance: llama.cpp compiles the same text with xgrammar,
        # so a grammar means, and fails, the same on both engines.
        "--structured-outputs-config",
        '{"backend": "xgrammar"}',
        *lora,
        *config.extra_args,
    ]


def vllm_env(
    config: VLLMLaunchConfig, adapters_dir: Path | None = None, base: str | None = None, s3: AdaptersS3Config | None = None
) -> dict[str, str]:
    """The launched vLLM's environment; `adapters_dir` (the shared adapter volume) turns
    on tuneserve's LoRA resolver there, `base` (model.name) makes it refuse adapters
    validated against another base."""
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(config.kv_cache_gib))))
    env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    env.setdefault("HF_HUB_OFFLINE", "1")
    # Stats stay on: without them vLLM exports none of its vllm:* Prometheus metrics
    # (--disable-log-stats turns off both); a long interval keeps its log quiet.
    env.setdefault("VLLM_LOG_STATS_INTERVAL", "60")
    if adapters_dir is not None:
        env.update(resolver_env(adapters_dir, base, env, s3))
    return env


def resolver_env(
    adapters_dir: Path,
    base: str | None = None,
    environ: dict[str, str] | None = None,
    s3: AdaptersS3Config | None = None,
) -> dict[str, str]:
    """What a vLLM process needs to resolve adapters by name (vllm_plugin/lora_resolver.py);
    with `s3` (adapters.s3) also the bucket to download versions the volume lacks from.
    AWS credentials reach it as the rest of the environment does."""
    current = os.environ if environ is None else environ
    # vLLM asks its resolvers only with runtime LoRA updating on (serving.py _check_model).
    env = {ADAPTERS_DIR_ENV: str(adapters_dir.resolve()), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    if base:
        env[BASE_ENV] = base
    if s3 is not None and s3.bucket:
        env[S3_BUCKET_ENV] = s3.bucket
        env[S3_PREFIX_ENV] = s3.prefix
        for name, value in ((S3_ENDPOINT_URL_ENV, s3.endpoint_url), (S3_REGION_ENV, s3.region)):
            if value:
                env[name] = value
    plugins = current.get("VLLM_PLUGINS")
    if plugins is not None and PLUGIN_NAME not in plugins.split(","):
        # An allow-list of plugins would leave the resolver out and every adapter a 404.
        env["VLLM_PLUGINS"] = ",".join(p for p in [*plugins.split(","), PLUGIN_NAME] if p)
    return env


class VLLMLauncher:
    def __init__(
        self,
        vllm: VLLMConfig,
        model_path: Path,
        served_name: str,
        max_model_len: int,
        log_file: Path,
        adapters_dir: Path | None = None,
        base: str | None = None,
        s3: AdaptersS3Config | None = None,
    ) -> None:
        self.config = vllm.launch
        self.s3 = s3
        self.command = vllm_command(vllm, model_path, served_name, max_model_len)
        # Resolver mode: the launched vLLM resolves versioned names from the adapter
        # volume (<data_dir>/adapters) itself, since the gateway loads nothing there.
        self.adapters_dir: Path | None = None
        self.base = base
        if vllm.adapter_loading == "resolver" and vllm.enable_lora:
            configured = adapters_dir or (Path(os.environ[ADAPTERS_DIR_ENV]) if os.environ.get(ADAPTERS_DIR_ENV) else None)
            if configured is None:
                raise ConfigError(
                    "engines.vllm.adapter_loading resolver with engines.vllm.launch needs the adapter "
                    f"volume for vLLM's resolver: set {ADAPTERS_DIR_ENV}"
                )
            self.adapters_dir = configured
        self.log_file = log_file
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._healthy: Callable[[], bool] | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "launched": True,
            "pid": self.process.pid if self.process else None,
            "restarts": self.restarts,
            "log": str(self.log_file),
        }

    def set_health_check(self, healthy: Callable[[], bool]) -> None:
        self._healthy = healthy

    async def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        await self._spawn()
        self._task = asyncio.create_task(self._supervise(), name="vllm-supervisor")

    async def _spawn(self) -> None:
        log.info("starting vLLM: %s (log: %s)", " ".join(self.command), self.log_file)
        with open(self.log_file, "ab") as out:
            self.process = await asyncio.create_subprocess_exec(
                *self.command,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                stdin=asyncio.subprocess.DEVNULL,
                env=vllm_env(self.config, self.adapters_dir, self.base, self.s3),
                preexec_fn=_own_group_dying_with_parent,
            )

    async def _supervise(self) -> None:
        while not self._stopping:
            assert self.process is not None
            last_healthy = time.monotonic()
            exited = asyncio.create_task(self.process.wait())
            while not exited.done():
                await asyncio.wait({exited}, timeout=2.0)
                if exited.done() or self._healthy is None:
                    continue
                if self._healthy():
                    last_healthy = time.monotonic()
                elif time.monotonic() - last_healthy > self.config.startup_timeout_s:
                    # Covers both a start that never finishes and a server that hung.
                    log.error("vLLM unhealthy for %.0fs; restarting", self.config.startup_timeout_s)
                    await self._terminate()
            if self._stopping:
                return
            log.warning("vLLM exited with code %s; restarting", self.process.returncode)
            self.restarts += 1
            await asyncio.sleep(self.config.restart_backoff_s)
            if not self._stopping:
                await self._spawn()

    async def _terminate(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=20)
        except asyncio.TimeoutError:
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()

    async def stop(self) -> None:
        self._stopping = True
        await self._terminate()
        if self._task:
            self._task.cancel()
