"""Job kinds: what each merge/export job runs, from the spec stored with it.

The spec is a snapshot (the merge config's content, not just its path), so
`tuneserve jobs rerun ID` repeats the job exactly even if the file changed since.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tuneserve.jobs.runner import JobContext, run_job, submit
from tuneserve.jobs.store import JobRecord, JobStore
from tuneserve.config import Settings
from tuneserve.errors import TuneserveError

KINDS = ("merge", "merge_adapter", "combine_adapters", "export")


def lora_cache_dir(settings: Settings) -> Path:
    return settings.data_dir / "cache" / "lora-merge"


def merge_spec(raw: dict[str, Any], source: str, out: Path, settings: Settings, shard_size: str) -> tuple[str, dict[str, Any]]:
    """Validate a merge config (mergekit or adapter op); return (kind, job spec)."""
    from merge.adapter_ops import parse_adapter_op
    from merge.config import validate_mergekit_config

    if "operation" in raw:
        op = parse_adapter_op(raw, source)
        kind = op.operation
    else:
        validate_mergekit_config(raw, source)
        kind = "merge"
    if out.exists() and any(out.iterdir() if out.is_dir() else [out]):
        raise TuneserveError(f"--out: {out} already exists; choose a new path or remove it")
    spec = {
        "config_source": source,
        "config": raw,
        "out": str(out.resolve()),
        "shard_size": shard_size,
        "lora_cache": str(lora_cache_dir(settings).resolve()),
    }
    return kind, spec


def _work(kind: str, spec: dict[str, Any], settings: Settings, ctx: JobContext) -> list[str]:
    out = Path(spec["out"]) if "out" in spec else None
    if kind == "merge":
        from merge.config import validate_mergekit_config
        from merge.mergekit_job import run_mergekit

        config = validate_mergekit_config(spec["config"], spec["config_source"])
        text = yaml.safe_dump(spec["config"], sort_keys=False)
        return run_mergekit(config, text, out, ctx, Path(spec["lora_cache"]), spec["shard_size"])  # type: ignore[arg-type]
    if kind in ("merge_adapter", "combine_adapters"):
        from merge.adapter_ops import combine_adapters, merge_adapter, parse_adapter_op

        op = parse_adapter_op(spec["config"], spec["config_source"])
        if op.operation == "merge_adapter":
            return merge_adapter(op, out, ctx)  # type: ignore[arg-type]
        registry = None
        if op.publish is not None:
            # The same path as `tuneserve adapters add`: validated, converted, versioned.
            from tuneserve.adapters.registry import AdapterRegistry

            registry = AdapterRegistry(settings)
        return combine_adapters(op, out, ctx, registry)  # type: ignore[arg-type]
    if kind == "export":
        from merge.export import ExportSpec, run_export

        return run_export(ExportSpec.model_validate(spec), ctx, settings.engines.llamacpp.extra_buffer_types)
    raise TuneserveError(f"unknown job kind {kind!r}")


def run_new(jobs: JobStore, kind: str, spec: dict[str, Any], settings: Settings) -> JobRecord:
    job_id = submit(jobs, kind, spec)
    return run_job(jobs, job_id, lambda ctx: _work(kind, spec, settings, ctx))


def rerun(jobs: JobStore, job_id: str, settings: Settings) -> JobRecord:
    old = jobs.get(job_id)
    return run_new(jobs, old.kind, old.spec, settings)
