"""Export to llama.cpp: HF model -> GGUF (converter types or llama.cpp quants), GGUF ->
quantized GGUF, PEFT adapter -> GGUF LoRA. Every output passes the quality gate
(quality_gate.py) before it is renamed into place; a failing one is deleted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tuneserve.adapters.dora import is_dora_adapter, merge_advice
from tuneserve.adapters.peft_format import is_adapter_dir
from tuneserve.errors import ConfigError
from tuneserve.fsutil import owned_temp_dir, require_free_space
from tuneserve.gguf.convert import OUTTYPES
from tuneserve.gguf.llama_loader import ExtraBufferTypes
from tuneserve.gguf.quality_gate import GateConfig, QualityGateFailed, run_gate
from tuneserve.gguf.quantize import FTYPES
from tuneserve.jobs.runner import JobContext

# Lower case: written by llama.cpp's converter; upper case: llama_model_quantize of an f16.
CONVERTER_TYPES = ("f16", "bf16", "q8_0")
QUANT_TYPES = ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0")
EXPORT_TYPES = CONVERTER_TYPES + QUANT_TYPES
assert set(CONVERTER_TYPES) <= set(OUTTYPES) and set(QUANT_TYPES) <= set(FTYPES)

SourceKind = Literal["hf", "gguf", "adapter"]


class ExportError(ConfigError):
    pass


class ExportSpec(BaseModel):
    """One export; stored as the job's spec, so `jobs rerun` repeats it exactly."""

    model_config = ConfigDict(extra="forbid")

    source: Path
    out: Path
    type: str | None = None  # None for adapters (always f32 GGUF LoRA)
    reference: Path | None = Field(None, description="HF dir the gate compares with (GGUF sources)")
    base: Path | None = Field(None, description="HF dir of an adapter's base")
    base_gguf: Path | None = Field(None, description="GGUF of an adapter's base, for the gate")
    gate: GateConfig = Field(default_factory=GateConfig)
    gate_cache: Path | None = Field(None, description="where the gate keeps HF reference runs")


def source_kind(source: Path) -> SourceKind:
    if is_adapter_dir(source):
        return "adapter"
    if source.is_dir() and (source / "config.json").is_file():
        return "hf"
    if source.is_file() and source.suffix == ".gguf":
        return "gguf"
    raise ExportError(
        f"source: {source} is neither an HF model dir, a PEFT adapter dir nor a .gguf file"
    )


def validate_spec(spec: ExportSpec) -> SourceKind:
    kind = source_kind(spec.source)
    if spec.out.suffix != ".gguf":
        raise ExportError(f"--out: {spec.out} must end in .gguf")
    if kind == "adapter":
        if spec.type is not None:
            raise ExportError("--type: an adapter is always exported as an f32 GGUF LoRA; drop --type")
        if is_dora_adapter(spec.source):
            raise ExportError(
                f"source: {spec.source} is a DoRA adapter, which a GGUF LoRA cannot carry (llama.cpp "
                f"does not apply its magnitude vectors). {merge_advice(str(spec.source), str(spec.base or 'BASE_DIR'))}"
            )
        if spec.base is None or not (spec.base / "config.json").is_file():
            raise ExportError(f"--base: {spec.base} is not the adapter's HF base model dir")
        if spec.gate.enabled and (spec.base_gguf is None or not spec.base_gguf.is_file()):
            raise ExportError(f"--base-gguf: {spec.base_gguf} is not a GGUF of the base (the gate needs it)")
        return kind
    if spec.type not in EXPORT_TYPES:
        raise ExportError(f"--type: {spec.type!r} is not one of {list(EXPORT_TYPES)}")
    if kind == "gguf":
        if spec.type not in QUANT_TYPES:
            raise ExportError(f"--type: a GGUF source can only be quantized, to one of {list(QUANT_TYPES)}")
        if spec.gate.enabled and (spec.reference is None or not (spec.reference / "config.json").is_file()):
            raise ExportError(f"--reference: {spec.reference} is not the HF model dir the gate compares with")
    return kind


def run_export(spec: ExportSpec, ctx: JobContext, extra_buffer_types: ExtraBufferTypes = "auto") -> list[str]:
    from merge.mergekit_job import weights_bytes
    from tuneserve.gguf.convert import convert_hf_to_gguf
    from tuneserve.gguf.lora import convert_lora_to_gguf
    from tuneserve.gguf.quantize import quantize_gguf

    kind = validate_spec(spec)
    source_bytes = spec.source.stat().st_size if kind == "gguf" else weights_bytes(spec.source)
    # Upper bound: an f16 intermediate plus the output, both at most the source's size.
    require_free_space(spec.out.parent, source_bytes * (2 if spec.type in QUANT_TYPES else 1), "the export")
    stage = owned_temp_dir(spec.out.parent, f".{spec.out.name}.tmp-")
    ctx.staging(stage)
    try:
        built = stage / spec.out.name
        if kind == "adapter":
            ctx.progress(0.1, "converting adapter to GGUF LoRA")
            convert_lora_to_gguf(spec.source, spec.base, built)  # type: ignore[arg-type]
        elif kind == "gguf":
            ctx.progress(0.1, f"quantizing to {spec.type}")
            quantize_gguf(spec.source, built, spec.type)  # type: ignore[arg-type]
        elif spec.type in CONVERTER_TYPES:
            ctx.progress(0.1, f"converting to GGUF {spec.type}")
            convert_hf_to_gguf(spec.source, built, spec.type)
        else:
            ctx.progress(0.1, "converting to GGUF f16")
            f16 = stage / "f16.gguf"
            convert_hf_to_gguf(spec.source, f16, "f16")
            ctx.progress(0.3, f"quantizing to {spec.type}")
            quantize_gguf(f16, built, spec.type)  # type: ignore[arg-type]
            f16.unlink()
        ctx.add_report(output_bytes=built.stat().st_size, type=spec.type or "lora-f32")
        if spec.gate.enabled:
            ctx.progress(0.5, "quality gate")
            if kind == "adapter":
                report = run_gate(
                    spec.base_gguf,  # type: ignore[arg-type]
                    spec.base,  # type: ignore[arg-type]
                    spec.gate,
                    candidate_lora=built,
                    reference_adapter=spec.source,
                    cache_dir=spec.gate_cache,
                    extra_buffer_types=extra_buffer_types,
                )
            else:
                reference = spec.source if kind == "hf" else spec.reference
                report = run_gate(
                    built, reference, spec.gate, cache_dir=spec.gate_cache, extra_buffer_types=extra_buffer_types  # type: ignore[arg-type]
                )
            ctx.add_report(gate=report.model_dump())
            if not report.passed:
                advice = (
                    "llama.cpp cannot run it on this host as it loads it now; try "
                    "--engines.llamacpp.extra_buffer_types off" if report.crash
                    else "loosen gate.* or pass --no-gate to export anyway"
                )
                raise QualityGateFailed(
                    f"quality gate failed for {spec.out.name}: " + "; ".join(report.failures)
                    + f". The output was not published ({advice})",
                    report,
                )
        else:
            ctx.add_report(gate="disabled")
        ctx.progress(0.95, "publishing")
        os.replace(built, spec.out)
        return [str(spec.out)]
    finally:
        shutil.rmtree(stage, ignore_errors=True)
