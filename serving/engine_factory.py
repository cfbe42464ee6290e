"""The engines a gateway serves with, built from its settings."""

from __future__ import annotations

from serving.engines.base import AdapterObserver, Engine
from serving.engines.llamacpp import LlamaCppEngine
from serving.engines.vllm import VLLMEngine
from serving.engines.vllm_launcher import VLLMLauncher
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


def build_engines(settings: Settings, observer: AdapterObserver | None = None) -> list[Engine]:
    """Engines in routing priority: vLLM (GPU) first when enabled, llama.cpp last."""
    engines: list[Engine] = []
    hf_path = settings.resolved_hf_path()
    if settings.engines.vllm.enabled:
        cfg = settings.engines.vllm
        launcher = None
        if cfg.launch.enabled:
            launcher = VLLMLauncher(
                cfg,
                hf_path,
                settings.vllm_model_name(),
                settings.model.max_model_len,
                settings.data_dir / "logs" / "vllm.log",
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
