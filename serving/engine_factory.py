"""The engines a gateway serves with, built from its settings."""

from __future__ import annotations

from typing import Protocol

from serving.engines.base import AdapterObserver, Engine
from serving.engines.llamacpp import LlamaCppEngine
from serving.engines.replica_discovery import DnsReplicas
from serving.engines.replica_events import ReplicaObserver
from serving.engines.vllm import VLLMEngine
from serving.engines.vllm_launcher import VLLMLauncher
from serving.engines.vllm_replicas import ReplicatedVLLMEngine
from tuneserve.config import Settings
from tuneserve.models.chat_template import ChatTemplate
from tuneserve.tool_calls.formats import COMPACT, ToolFormat, format_for_template


def hf_chat_template(settings: Settings) -> ChatTemplate | None:
    """The HF tokenizer's template: what vLLM renders with, so llama.cpp uses it too."""
    hf_path = settings.resolved_hf_path()
    return ChatTemplate.from_hf_dir(hf_path) if (hf_path / "tokenizer_config.json").is_file() else None


def tool_format(settings: Settings) -> ToolFormat:
    """The base model's tool protocol, read off its chat template (compact without one)."""
    template = hf_chat_template(settings)
    return format_for_template(template.source) if template is not None else COMPACT


class EngineObserver(AdapterObserver, ReplicaObserver, Protocol):
    """What the engines report to (the gateway's metrics)."""


def vllm_replicas(settings: Settings, observer: EngineObserver | None) -> ReplicatedVLLMEngine:
    """One engine over engines.vllm.replicas, or over the replicas DNS discovery finds."""
    cfg = settings.engines.vllm
    template = hf_chat_template(settings)
    model = settings.vllm_model_name()

    def replica(url: str) -> VLLMEngine:
        return VLLMEngine(cfg, url, model, None, observer, template=template)

    discover = DnsReplicas(cfg.discovery) if cfg.discovery else None
    return ReplicatedVLLMEngine(
        cfg, replica, cfg.replicas, discover, observer, discovery_target=cfg.discovery
    )


def build_engines(settings: Settings, observer: EngineObserver | None = None) -> list[Engine]:
    """Engines in routing priority: vLLM (GPU) first when enabled, llama.cpp last."""
    engines: list[Engine] = []
    hf_path = settings.resolved_hf_path()
    if settings.engines.vllm.enabled and (settings.engines.vllm.replicas or settings.engines.vllm.discovery):
        engines.append(vllm_replicas(settings, observer))
    elif settings.engines.vllm.enabled:
        cfg = settings.engines.vllm
        launcher = None
        if cfg.launch.enabled:
            launcher = VLLMLauncher(
                cfg,
                hf_path,
                settings.vllm_model_name(),
                settings.model.max_model_len,
                settings.data_dir / "logs" / "vllm.log",
                # Resolver mode reads versions where the registry writes them.
                adapters_dir=settings.data_dir.resolve() / "adapters",
                base=settings.model.name,
                s3=settings.adapters.s3,
            )
        engines.append(
            VLLMEngine(
                cfg, settings.vllm_url(), settings.vllm_model_name(), launcher, observer, template=hf_chat_template(settings)
            )
        )
    if settings.engines.llamacpp.enabled:
        cfg_l = settings.engines.llamacpp
        template = hf_chat_template(settings)
        engines.append(
            LlamaCppEngine(
                settings.resolved_gguf_path(),
                n_ctx=settings.model.max_model_len,
                workers=cfg_l.workers,
                n_threads=cfg_l.n_threads,
                n_batch=cfg_l.n_batch,
                queue_size=cfg_l.queue_size,
                template=template,
                max_loras=cfg_l.max_loras,
                observer=observer,
                extra_buffer_types=cfg_l.extra_buffer_types,
            )
        )
    return engines
