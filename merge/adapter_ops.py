"""Adapter operations with PEFT: fold one adapter into its base, or combine several
adapters into one new adapter (PEFT's `add_weighted_adapter`).

Config (YAML, `tuneserve merge CONFIG.yaml --out DIR`):

    operation: merge_adapter          # base + adapter -> a full HF model
    base: data/models/smollm2-135m-instruct/hf
    adapter: ./my-adapter             # LoRA, rsLoRA or DoRA (the way to serve a DoRA one)

    operation: combine_adapters       # several LoRA adapters -> one adapter
    base: data/models/smollm2-135m-instruct/hf
    adapters:
      - {path: ./a, weight: 0.7}
      - {path: ./b, weight: 0.3}
    combination: ties                 # linear, cat, svd, ties, dare_ties, dare_linear
    density: 0.5                      # ties / dare_*: fraction of each delta kept
    publish: {tenant: acme, name: support-mix}   # optional: into the adapter registry
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from merge.config import MergeConfigError
from tuneserve.adapters.dora import is_dora_adapter, merge_advice
from tuneserve.adapters.peft_format import ADAPTER_CONFIG, is_adapter_dir
from tuneserve.fsutil import require_free_space, staged_dir
from tuneserve.jobs.runner import JobContext


class _Op(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: Path = Field(description="HF dir of the base model the adapters were trained on")

    @model_validator(mode="after")
    def _base_exists(self) -> "_Op":
        if not (self.base / "config.json").is_file():
            raise ValueError(f"base: {self.base} is not an HF model dir (no config.json)")
        return self


def _check_adapter_dir(path: Path, key: str) -> None:
    if not is_adapter_dir(path):
        raise ValueError(f"{key}: {path} is not a PEFT adapter dir (no {ADAPTER_CONFIG})")


class MergeAdapterOp(_Op):
    operation: Literal["merge_adapter"]
    adapter: Path

    @model_validator(mode="after")
    def _adapter_exists(self) -> "MergeAdapterOp":
        _check_adapter_dir(self.adapter, "adapter")
        return self


class WeightedAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path
    weight: float = Field(1.0, allow_inf_nan=False)


class Publish(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str
    name: str


class CombineAdaptersOp(_Op):
    operation: Literal["combine_adapters"]
    adapters: list[WeightedAdapter] = Field(min_length=2)
    combination: Literal["linear", "cat", "svd", "ties", "dare_ties", "dare_linear"]
    density: float | None = Field(None, gt=0, le=1)
    svd_rank: int | None = Field(None, ge=1)
    publish: Publish | None = None

    @model_validator(mode="after")
    def _check(self) -> "CombineAdaptersOp":
        for i, adapter in enumerate(self.adapters):
            _check_adapter_dir(adapter.path, f"adapters[{i}].path")
            if is_dora_adapter(adapter.path):
                # Measured: weights [1, 0] of a DoRA adapter do not give it back; PEFT
                # re-initialises the combined adapter's magnitudes from the base.
                raise ValueError(
                    f"adapters[{i}].path: {adapter.path} is a DoRA adapter, which combine_adapters cannot "
                    "combine (PEFT's add_weighted_adapter drops its trained magnitude vectors) nor publish. "
                    f"{merge_advice(str(adapter.path), str(self.base))}; to combine several, merge them as "
                    "full models: a mergekit config whose models are BASE+ADAPTER (merge_method ties, "
                    "linear, ...) folds each in first"
                )
        if self.combination in ("ties", "dare_ties", "dare_linear") and self.density is None:
            raise ValueError(f"density: required by combination {self.combination}")
        if self.combination not in ("ties", "dare_ties", "dare_linear") and self.density is not None:
            raise ValueError(f"density: only ties, dare_ties and dare_linear use it, not {self.combination}")
        if all(a.weight == 0 for a in self.adapters):
            raise ValueError("adapters[*].weight: every weight is 0")
        if self.combination == "linear":
            ranks = {json.loads((a.path / ADAPTER_CONFIG).read_text()).get("r") for a in self.adapters}
            if len(ranks) > 1:
                raise ValueError(f"adapters: linear combination needs equal ranks, got {sorted(ranks)}; use cat or svd")
        return self


AdapterOp = Annotated[Union[MergeAdapterOp, CombineAdaptersOp], Field(discriminator="operation")]


def parse_adapter_op(raw: dict[str, Any], source: str) -> MergeAdapterOp | CombineAdaptersOp:
    from pydantic import TypeAdapter

    if raw.get("operation") not in ("merge_adapter", "combine_adapters"):
        raise MergeConfigError(
            f"{source}: key 'operation': unknown operation {raw.get('operation')!r}; "
            "choose merge_adapter or combine_adapters (or give a mergekit config)"
        )
    try:
        return TypeAdapter(AdapterOp).validate_python(raw)
    except ValidationError as exc:
        # Our validators' messages already start with the key; pydantic's locate it.
        lines = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if p not in ("merge_adapter", "combine_adapters")]
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {msg}" if not loc else f"{source}: key '{'.'.join(loc)}': {msg}")
        raise MergeConfigError("\n".join(lines)) from exc


def _load_base(base: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def merge_adapter(op: MergeAdapterOp, out: Path, ctx: JobContext) -> list[str]:
    from peft import PeftModel
    from transformers import AutoTokenizer

    from merge.mergekit_job import weights_bytes

    require_free_space(out.parent, int(weights_bytes(op.base) * 1.1), "the merged model")
    ctx.progress(0.1, "loading base and adapter")
    model = PeftModel.from_pretrained(_load_base(op.base), op.adapter)
    ctx.progress(0.5, "merging adapter into base")
    merged = model.merge_and_unload()
    with staged_dir(out) as stage:
        ctx.staging(stage)
        ctx.progress(0.7, "writing merged model")
        merged.save_pretrained(stage, safe_serialization=True)
        AutoTokenizer.from_pretrained(op.base).save_pretrained(stage)
        _copy_chat_template(op.base, stage)
    return [str(out)]


def combine_adapters(op: CombineAdaptersOp, out: Path, ctx: JobContext, registry: Any = None) -> list[str]:
    from peft import PeftModel

    ctx.progress(0.1, f"loading {len(op.adapters)} adapters")
    names = [f"a{i}" for i in range(len(op.adapters))]
    model = PeftModel.from_pretrained(_load_base(op.base), op.adapters[0].path, adapter_name=names[0])
    for name, adapter in zip(names[1:], op.adapters[1:]):
        model.load_adapter(adapter.path, adapter_name=name)
    ctx.progress(0.5, f"combining ({op.combination})")
    options: dict[str, Any] = {}
    if op.density is not None:
        options["density"] = op.density
    if op.svd_rank is not None:
        options["svd_rank"] = op.svd_rank
    model.add_weighted_adapter(
        adapters=names,
        weights=[a.weight for a in op.adapters],
        adapter_name="combined",
        combination_type=op.combination,
        **options,
    )
    for name in names:
        model.delete_adapter(name)
    outputs = [str(out)]
    with staged_dir(out) as stage:
        ctx.staging(stage)
        ctx.progress(0.7, "writing combined adapter")
        # PEFT writes a non-default adapter to <dir>/<name>/.
        model.save_pretrained(str(stage / "peft"), selected_adapters=["combined"])
        saved = stage / "peft" / "combined"
        for file in saved.iterdir():
            shutil.move(str(file), stage / file.name)
        shutil.rmtree(stage / "peft")
        config_file = stage / ADAPTER_CONFIG
        config = json.loads(config_file.read_text())
        # The base is whatever the user named; the registry checks it against the served one.
        config["base_model_name_or_path"] = str(op.base)
        config_file.write_text(json.dumps(config, indent=2))
        if op.publish is not None:
            if registry is None:
                raise MergeConfigError("publish: no adapter registry to publish to")
            ctx.progress(0.85, f"publishing to tenant {op.publish.tenant} as {op.publish.name}")
            record = registry.add(op.publish.tenant, op.publish.name, stage)
            ctx.add_report(published=record.model_dump(mode="json"))
            outputs.append(str(record.path))
    return outputs


def _copy_chat_template(base: Path, out: Path) -> None:
    jinja = base / "chat_template.jinja"
    if jinja.is_file() and not (out / "chat_template.jinja").is_file():
        shutil.copy(jinja, out / "chat_template.jinja")
