"""Merge configs: mergekit's own YAML, validated up front with messages that name the key.

`tuneserve merge CONFIG.yaml` takes either

- a mergekit config (the exact file `mergekit-yaml` takes: `merge_method`, `models`,
  `base_model`, `parameters`, ...; a model may be `base+adapter` for a LoRA merged on
  the fly), parsed by mergekit's own `MergeConfiguration`; or
- an adapter operation (`operation: merge_adapter | combine_adapters`, see
  adapter_ops.py).

mergekit checks some things only deep inside a run (a missing model after minutes of
loading, a typo'd parameter name never). Here they are checked before anything is
loaded: unknown method, missing model or adapter, architectures that do not match,
missing, unknown or out-of-range weights/densities.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable

from pydantic import ValidationError

from tuneserve.adapters.peft_format import ADAPTER_CONFIG, is_adapter_dir
from tuneserve.config import format_validation_error, read_yaml_mapping
from tuneserve.errors import ConfigError

# The fields that must agree for tensors to line up, besides `architectures`.
SHAPE_FIELDS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class MergeConfigError(ConfigError):
    pass


def read_yaml(path: Path) -> dict[str, Any]:
    raw = read_yaml_mapping(path, "merge config", MergeConfigError)
    if not raw:
        raise MergeConfigError(f"{path}: the merge config is empty")
    return raw


def _is_local(path: str) -> bool:
    """A path that must exist here, as opposed to a hub id mergekit downloads."""
    return path.startswith((".", "/", "~")) or Path(path).exists() or not _HUB_ID.match(path)


def _hf_config(path: str, key: str) -> dict[str, Any] | None:
    """config.json of a local model dir (None for a hub id); errors name `key`."""
    if not _is_local(path):
        return None
    model_dir = Path(path).expanduser()
    config_file = model_dir / "config.json"
    if not model_dir.exists():
        raise MergeConfigError(f"{key}: model {path} does not exist")
    if not config_file.is_file():
        raise MergeConfigError(f"{key}: {path} is not an HF model dir (no config.json)")
    try:
        return json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MergeConfigError(f"{key}: cannot read {config_file}: {exc}") from exc


def _check_adapter(path: str, key: str) -> None:
    if not _is_local(path):
        return
    adapter = Path(path).expanduser()
    if not is_adapter_dir(adapter):
        raise MergeConfigError(
            f"{key}: adapter {path} does not exist or is not a PEFT adapter dir "
            f"(no {ADAPTER_CONFIG})"
        )


def _scalars(setting: Any) -> Iterable[Any]:
    """Every value of a mergekit parameter setting (scalar, gradient list, filters)."""
    if isinstance(setting, dict) and "value" in setting:
        yield from _scalars(setting["value"])
    elif isinstance(setting, list):
        for item in setting:
            yield from _scalars(item)
    else:
        yield setting


def _check_value(name: str, setting: Any, key: str) -> None:
    for value in _scalars(setting):
        if name in ("weight", "density", "t", "lambda", "epsilon"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise MergeConfigError(f"{key}: {name} must be a finite number, got {value!r}")
        if name == "density" and not 0 < value <= 1:
            raise MergeConfigError(f"{key}: density must be in (0, 1], got {value}")
        if name == "t" and not 0 <= value <= 1:
            raise MergeConfigError(f"{key}: t must be in [0, 1], got {value}")


def validate_mergekit_config(raw: dict[str, Any], source: str = "merge config") -> Any:
    """Validate a mergekit config dict; return mergekit's MergeConfiguration."""
    from mergekit.common import ModelReference
    from mergekit.config import MergeConfiguration
    from mergekit.merge_methods import registry

    unknown = sorted(set(raw) - set(MergeConfiguration.model_fields))
    if unknown:
        raise MergeConfigError(
            f"{source}: unknown key {unknown[0]!r}; a mergekit config has "
            f"{sorted(MergeConfiguration.model_fields)}"
        )
    methods = {m.spec.name: m for m in registry.registered_methods()}
    method_name = raw.get("merge_method")
    if method_name not in methods:
        raise MergeConfigError(
            f"{source}: key 'merge_method': unknown method {method_name!r}; "
            f"choose one of {sorted(methods)}"
        )
    try:
        config = MergeConfiguration.model_validate(raw)
    except ValidationError as exc:
        raise MergeConfigError(format_validation_error(exc, source)) from exc
    except (RuntimeError, ValueError) as exc:  # mergekit's own validators raise these
        raise MergeConfigError(f"{source}: {exc}") from exc
    spec = methods[method_name].spec

    # Models: present on disk, adapters readable, architectures equal.
    entries: list[tuple[str, ModelReference]] = []
    if config.base_model is not None:
        entries.append(("base_model", config.base_model))
    for i, model in enumerate(config.models or []):
        entries.append((f"models[{i}].model", model.model))
    for i, slice_ in enumerate(config.slices or []):
        for j, src in enumerate(slice_.sources):
            entries.append((f"slices[{i}].sources[{j}].model", src.model))
    reference: tuple[str, dict[str, Any]] | None = None
    for key, ref in entries:
        hf = _hf_config(ref.model.path, key)
        if ref.lora is not None:
            _check_adapter(ref.lora.path, key)
        if hf is None:
            continue
        if reference is None:
            reference = (key, hf)
            continue
        ref_key, ref_hf = reference
        fields = ("architectures",) + (SHAPE_FIELDS if not config.slices else ("model_type",))
        for field in fields:
            if hf.get(field) != ref_hf.get(field):
                raise MergeConfigError(
                    f"{key}: {ref} has {field}={hf.get(field)!r} but {ref_key} has "
                    f"{ref_hf.get(field)!r}; merged models must share one architecture"
                )

    # Inputs the method accepts (mergekit checks this only per tensor, mid-run).
    if config.models:
        ids = [str(m.model) for m in config.models]
        base = str(config.base_model) if config.base_model else None
        if base is not None and base not in ids and spec.contract.base.value != "ignored":
            ids.append(base)
        try:
            spec.contract.validate_ids(ids, base)
        except ValueError as exc:
            raise MergeConfigError(f"{source}: key 'models': {exc} (merge_method {method_name})") from exc

    # Parameters: known names, numbers in range, required ones present.
    known = {p.name: p for p in spec.parameters}

    def check_params(params: dict[str, Any] | None, key: str) -> None:
        for name, setting in (params or {}).items():
            if name not in known:
                raise MergeConfigError(
                    f"{key}.{name}: unknown parameter for merge_method {method_name}; "
                    f"it takes {sorted(known) or 'none'}"
                )
            _check_value(name, setting, f"{key}.{name}")

    check_params(config.parameters, "parameters")
    for i, model in enumerate(config.models or []):
        check_params(model.parameters, f"models[{i}].parameters")
    for param in spec.parameters:
        if not param.required:
            continue
        if param.scope.value == "shared":
            if param.name not in (config.parameters or {}) and config.models:
                raise MergeConfigError(
                    f"parameters.{param.name}: required by merge_method {method_name}"
                )
            continue
        if param.name in (config.parameters or {}):
            continue
        for i, model in enumerate(config.models or []):
            is_base = config.base_model is not None and model.model == config.base_model
            if param.scope.value == "non_base" and is_base:
                continue
            if param.name not in (model.parameters or {}):
                raise MergeConfigError(
                    f"models[{i}].parameters.{param.name}: required by merge_method "
                    f"{method_name} (set it per model or under the top-level parameters)"
                )
    if method_name in ("linear",) and config.models:
        weights = [
            (model.parameters or {}).get("weight", (config.parameters or {}).get("weight"))
            for model in config.models
        ]
        if all(isinstance(w, (int, float)) for w in weights) and sum(weights) == 0:  # type: ignore[arg-type]
            raise MergeConfigError(
                "models[*].parameters.weight: the weights sum to 0, which a normalized "
                "linear merge divides by"
            )
    return config
