"""Merge and export job kinds: a typed spec per kind and a registry of runners by kind
(mergekit's merge-method registry is the model). Adding a kind is one spec model and one
`@job_runner` function.

The spec is a snapshot (the merge config's content, not just its path), so
`tuneserve jobs rerun ID` repeats the job exactly even if the file changed since. The
store keeps the kind in its own column and the spec without it; `parse_job_spec` joins
them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Callable, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from merge.export import ExportSpec
from tuneserve.config import Settings, format_validation_error
from tuneserve.errors import TuneserveError
from tuneserve.jobs.runner import JobContext, run_job, submit
from tuneserve.jobs.store import JobError, JobRecord, JobStatus, JobStore


class MergeJob(BaseModel):
    """A mergekit merge."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["merge"] = "merge"
    config_source: str
    config: dict[str, Any]
    out: Path
    shard_size: str
    lora_cache: Path


class AdapterOpJob(BaseModel):
    """An adapter operation (merge_adapter, combine_adapters); its config says which."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["merge_adapter", "combine_adapters"]
    config_source: str
    config: dict[str, Any]
    out: Path
    # Kept in the spec only so a job written by `merge_spec` parses whatever its kind.
    shard_size: str | None = None
    lora_cache: Path | None = None


class ExportJob(ExportSpec):
    kind: Literal["export"] = "export"


JobSpec = Annotated[Union[MergeJob, AdapterOpJob, ExportJob], Field(discriminator="kind")]
_JOB_SPEC: TypeAdapter[MergeJob | AdapterOpJob | ExportJob] = TypeAdapter(JobSpec)

JobRunner = Callable[[Any, Settings, JobContext], list[str]]
Runner = TypeVar("Runner", bound=JobRunner)
RUNNERS: dict[str, JobRunner] = {}


def job_runner(*kinds: str) -> Callable[[Runner], Runner]:
    """Register the decorated function as what jobs of `kinds` run."""

    def register(run: Runner) -> Runner:
        for kind in kinds:
            RUNNERS[kind] = run
        return run

    return register


def parse_job_spec(kind: str, spec: dict[str, Any]) -> MergeJob | AdapterOpJob | ExportJob:
    if kind not in RUNNERS:
        raise TuneserveError(f"unknown job kind {kind!r}; known: {sorted(RUNNERS)}")
    try:
        return _JOB_SPEC.validate_python({**spec, "kind": kind})
    except ValidationError as exc:
        raise TuneserveError(format_validation_error(exc, f"{kind} job spec")) from exc


def lora_cache_dir(settings: Settings) -> Path:
    return settings.data_dir / "cache" / "lora-merge"


def merge_spec(raw: dict[str, Any], source: str, out: Path, settings: Settings, shard_size: str) -> tuple[str, dict[str, Any]]:
    """Validate a merge config (mergekit or adapter op); return (kind, job spec)."""
    from merge.adapter_ops import parse_adapter_op
    from merge.config import validate_mergekit_config

    if "operation" in raw:
        kind: str = parse_adapter_op(raw, source).operation
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


@job_runner("merge")
def _run_merge(spec: MergeJob, settings: Settings, ctx: JobContext) -> list[str]:
    from merge.config import validate_mergekit_config
    from merge.mergekit_job import run_mergekit

    config = validate_mergekit_config(spec.config, spec.config_source)
    text = yaml.safe_dump(spec.config, sort_keys=False)
    return run_mergekit(config, text, spec.out, ctx, spec.lora_cache, spec.shard_size)


@job_runner("merge_adapter", "combine_adapters")
def _run_adapter_op(spec: AdapterOpJob, settings: Settings, ctx: JobContext) -> list[str]:
    from merge.adapter_ops import MergeAdapterOp, combine_adapters, merge_adapter, parse_adapter_op

    op = parse_adapter_op(spec.config, spec.config_source)
    if isinstance(op, MergeAdapterOp):
        return merge_adapter(op, spec.out, ctx)
    registry = None
    if op.publish is not None:
        # The same path as `tuneserve adapters add`: validated, converted, versioned.
        from tuneserve.adapters.registry import AdapterRegistry

        registry = AdapterRegistry(settings)
    return combine_adapters(op, spec.out, ctx, registry)


@job_runner("export")
def _run_export(spec: ExportJob, settings: Settings, ctx: JobContext) -> list[str]:
    from merge.export import run_export

    return run_export(spec, ctx, settings.engines.llamacpp.extra_buffer_types)


def run_new(jobs: JobStore, kind: str, spec: dict[str, Any], settings: Settings) -> JobRecord:
    typed = parse_job_spec(kind, spec)  # a bad spec fails before a job row exists
    job_id = submit(jobs, kind, spec)
    return run_job(jobs, job_id, lambda ctx: RUNNERS[kind](typed, settings, ctx))


def queue_new(jobs: JobStore, kind: str, spec: dict[str, Any]) -> JobRecord:
    """Queue a job for whichever `tuneserve jobs worker` claims it first (on any machine
    sharing the database; its paths must be reachable there, a shared volume)."""
    parse_job_spec(kind, spec)  # refused here, not later on a worker
    return jobs.get(jobs.create(kind, spec, for_any_worker=True))


def run_claimed(jobs: JobStore, job_id: str, settings: Settings) -> JobRecord:
    """Run a job claim_next() gave this worker; JobError (recorded) if it fails."""
    record = jobs.get(job_id)
    try:
        typed = parse_job_spec(record.kind, record.spec)
    except TuneserveError as exc:  # queued by another version of tuneserve: say so, now
        jobs.mark_finished(job_id, JobStatus.failed, error=str(exc))
        raise JobError(f"job {job_id}: {exc}") from exc
    return run_job(jobs, job_id, lambda ctx: RUNNERS[record.kind](typed, settings, ctx))


def rerun(jobs: JobStore, job_id: str, settings: Settings) -> JobRecord:
    old = jobs.get(job_id)
    return run_new(jobs, old.kind, old.spec, settings)
