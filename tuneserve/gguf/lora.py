"""PEFT LoRA adapter -> GGUF LoRA adapter that llama.cpp applies on top of its base GGUF.

llama.cpp's own `convert_lora_to_gguf.py` is a script bound to the `gguf` copy it
vendors (see models/gguf_convert.py), so this writes the same format with PyPI's `gguf`:
KV `general.type=adapter`, `adapter.type=lora`, `adapter.lora.alpha`, and per adapted
weight `<gguf name>.lora_a` (PEFT's A, r x in) and `<gguf name>.lora_b` (PEFT's B,
out x r), in float32 like that script's default.

llama.cpp computes each pair's scale as `alpha / rank` (rank read from the tensor);
PEFT scales by `alpha / r` or, with rsLoRA, `alpha / sqrt(r)`, per module when
`rank_pattern`/`alpha_pattern` are set. One GGUF alpha covers the adapter's default
scale; a module whose PEFT scale differs gets the ratio folded into its lora_b.

Only plain LoRA on linear layers converts. Anything else (DoRA, modules_to_save,
embedding LoRA, unknown tensors...) is refused rather than silently dropped: a partly
applied adapter still loads in llama.cpp and answers, just not like the trained one.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneserve.adapters import tenant_regex
from tuneserve.adapters.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLED_WEIGHTS,
    BaseWeightsUnreadable,
    ConfigInvalid,
    ConfigMissing,
    ConfigNotJson,
    ConfigNotObject,
    ConfigTooDeep,
    ConfigTooLarge,
    LoraPair,
    LoraTensor,
    MissingHalf,
    NotLora,
    PeftLoraConfig,
    RankMismatch,
    check_is_lora,
    lora_tensor,
    pair_lora,
    parse_lora_config,
    read_config_json,
    read_weight_shapes,
)
from tuneserve.config import first_validation_error
from tuneserve.errors import TuneserveError


class AdapterConversionError(TuneserveError):
    """A PEFT adapter cannot be converted to a GGUF LoRA; the message says why."""


@dataclass(frozen=True)
class _Arch:
    gguf_arch: gguf.MODEL_ARCH
    # llama.cpp's LlamaModel converter permutes the rows of q_proj/k_proj (HF's rotary
    # layout -> GGML's), so lora_b of those modules needs the same row permutation.
    permute_qk: bool


# HF architectures that llama.cpp's converter writes through its LlamaModel class. Add
# one only after checking its converter class for other transforms of linear weights.
_ARCHS: dict[str, _Arch] = {
    "LlamaForCausalLM": _Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": _Arch(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
}

# Config switches that make an adapter more than `W x + s * B(A x)` on the base weights
# llama.cpp has. A truthy value cannot be converted.
_UNSUPPORTED_SWITCHES = {
    "use_dora": "DoRA (use_dora) rescales each weight by a trained magnitude vector",
    "modules_to_save": "modules_to_save stores fully trained copies of whole modules",
    "trainable_token_indices": "trainable_token_indices stores trained embedding rows",
    "target_parameters": "target_parameters adapts raw parameters (e.g. MoE experts)",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D-style transposed weights) is not handled",
    "layer_replication": "layer_replication changes the base model's layer stack",
    "use_qalora": "QALoRA pools the input before lora_A",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not handled",
    "velora_config": "VeLoRA is not plain LoRA",
    "monteclora_config": "MonteCLoRA is not plain LoRA",
    "use_bdlora": "BD-LoRA is not plain LoRA",
    "arrow_config": "Arrow routing is not plain LoRA",
    "kasa_config": "KaSA is not plain LoRA",
}

# These initialisations also rewrite the base weights, so the saved adapter only fits
# that rewritten base (unless PEFT converted it on save, which resets the field to true).
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")

# safetensors dtypes numpy reads directly; BF16 is widened by hand (numpy has none).
_NUMPY_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2"}


class _BaseConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")

    architectures: list[str] = Field(min_length=1)
    num_hidden_layers: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int | None = Field(default=None, gt=0)
    tie_word_embeddings: bool = False


def convert_lora_to_gguf(adapter_dir: Path, base_model_dir: Path, out_file: Path) -> None:
    """Write `out_file`, a GGUF LoRA for llama.cpp, from a PEFT adapter of `base_model_dir`.

    Raises AdapterConversionError, leaving no output, when the adapter cannot be
    converted faithfully.
    """
    adapter_dir, base_model_dir, out_file = Path(adapter_dir), Path(base_model_dir), Path(out_file)
    config = _read_adapter_config(adapter_dir)
    base = _read_base_config(base_model_dir)
    arch = _ARCHS.get(base.architectures[0])
    if arch is None:
        raise AdapterConversionError(
            f"base model architecture {base.architectures[0]!r} is not supported for LoRA "
            f"conversion; supported: {sorted(_ARCHS)}"
        )
    weights = _read_safetensors(adapter_dir / ADAPTER_WEIGHTS)
    pairs = _pair_tensors(weights)
    base_shapes = _base_weight_shapes(base_model_dir)
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, base.num_hidden_layers)

    # One alpha such that llama.cpp's alpha/rank equals PEFT's default scale at rank r:
    # plain LoRA gives alpha itself, rsLoRA alpha*sqrt(r) (so alpha*sqrt(r)/r = alpha/sqrt(r)).
    gguf_alpha = _peft_scale(config.lora_alpha, config.r, config.use_rslora) * config.r

    alpha_keys = _alpha_keys(config.alpha_pattern, [pair.module for pair in pairs], adapter_dir / ADAPTER_CONFIG)
    tensors: list[tuple[str, np.ndarray, np.ndarray]] = []
    for pair in pairs:
        # rank_pattern is not consulted: the rank is read from the tensors, as llama.cpp does.
        module, lora_a, lora_b, rank = pair.module, pair.a, pair.b, pair.rank
        gguf_name = _gguf_name(name_map, module, base)
        _check_shape(pair, base_shapes, base_model_dir)

        pattern = alpha_keys.get(module)
        alpha = config.alpha_pattern[pattern] if pattern is not None else config.lora_alpha
        wanted, applied = _peft_scale(alpha, rank, config.use_rslora), gguf_alpha / rank
        if not math.isclose(wanted, applied, rel_tol=1e-6):
            lora_b = lora_b * np.float32(wanted / applied)

        if arch.permute_qk and module.endswith(("q_proj", "k_proj")):
            kv_heads = base.num_key_value_heads or base.num_attention_heads
            heads = base.num_attention_heads if module.endswith("q_proj") else kv_heads
            lora_b = _permute_rows(lora_b, heads, module)

        tensors.append((gguf_name, lora_a, lora_b))

    tensors.sort(key=lambda t: _natural_key(t[0]))
    _write_gguf(out_file, gguf.MODEL_ARCH_NAMES[arch.gguf_arch], gguf_alpha, tensors)


def _gguf_name(name_map: gguf.TensorNameMap, module: str, base: _BaseConfig) -> str:
    gguf_name = name_map.get_name(f"{module}.weight", try_suffixes=(".weight",))
    if gguf_name is None:
        raise AdapterConversionError(
            f"adapter module {module!r} has no llama.cpp counterpart in a "
            f"{base.num_hidden_layers}-layer {base.architectures[0]} (wrong base model?)"
        )
    if gguf_name.startswith("token_embd."):
        raise AdapterConversionError(f"LoRA on the token embeddings ({module}) is not supported")
    if gguf_name.startswith("output.") and base.tie_word_embeddings:
        raise AdapterConversionError(
            f"the adapter trains {module}, but the base model ties it to the embeddings "
            "and llama.cpp has no separate output weight to apply it to"
        )
    return gguf_name


def _check_shape(
    pair: LoraPair[np.ndarray], base_shapes: dict[str, tuple[int, ...]] | None, base_model_dir: Path
) -> None:
    # llama.cpp would refuse a mismatch only when the adapter is loaded; say it now.
    if base_shapes is None:
        return
    expected = base_shapes.get(pair.module)
    if expected is None:
        raise AdapterConversionError(
            f"adapter module {pair.module!r} is not a weight of the base model in {base_model_dir}"
        )
    if pair.shape != tuple(expected):
        out_features, in_features = pair.shape
        raise AdapterConversionError(
            f"adapter module {pair.module!r} is {out_features}x{in_features} but the base "
            f"weight is {'x'.join(map(str, expected))} (wrong base model?)"
        )


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise AdapterConversionError(f"{what}: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterConversionError(f"{what}: cannot read {path}: {exc}") from exc


def _read_adapter_config(adapter_dir: Path) -> PeftLoraConfig:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        raw = read_config_json(adapter_dir)
        # Before the switches below: an IA3 or prefix adapter is told it is not LoRA.
        check_is_lora(raw)
    except ConfigMissing:
        raise AdapterConversionError(f"not a PEFT adapter directory: {path} does not exist") from None
    except ConfigNotJson as exc:
        raise AdapterConversionError(f"not a PEFT adapter directory: cannot read {path}: {exc.cause}") from exc.cause
    except OSError as exc:
        raise AdapterConversionError(f"not a PEFT adapter directory: cannot read {path}: {exc}") from exc
    except ConfigNotObject:
        raise AdapterConversionError(f"{path} is not a JSON object") from None
    except (ConfigTooLarge, ConfigTooDeep) as exc:
        raise AdapterConversionError(str(exc)) from None
    except NotLora as exc:
        raise AdapterConversionError(
            f"{path}: peft_type is {exc.peft_type!r}; only 'LORA' adapters convert to GGUF"
        ) from None
    for key, why in _UNSUPPORTED_SWITCHES.items():
        if raw.get(key):
            raise AdapterConversionError(f"{path}: cannot convert, {why}")
    if raw.get("bias", "none") != "none":
        raise AdapterConversionError(
            f"{path}: bias={raw['bias']!r} trains the base model's biases, which a GGUF LoRA cannot carry"
        )
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise AdapterConversionError(
            f"{path}: init_lora_weights={init!r} also rewrote the base weights, so the adapter "
            "only fits that rewritten base; save it with PEFT's "
            "path_initial_model_for_weight_conversion to get a plain LoRA"
        )
    try:
        config = parse_lora_config(raw)
    except ConfigInvalid as exc:
        raise AdapterConversionError(f"{path}: key '{exc.key}': {exc.reason}") from None
    if config.lora_alpha == 0 or not math.isfinite(config.lora_alpha):
        # llama.cpp reads alpha 0 as "no alpha" and applies scale 1, not PEFT's 0.
        raise AdapterConversionError(f"{path}: lora_alpha must be a finite non-zero number")
    return config


def _read_base_config(base_model_dir: Path) -> _BaseConfig:
    path = base_model_dir / "config.json"
    raw = _read_json(path, "not an HF model directory")
    try:
        return _BaseConfig.model_validate(raw)
    except ValidationError as exc:
        where, message = first_validation_error(exc)
        raise AdapterConversionError(f"{path}: key '{where}': {message}") from None


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """The tensor table of a safetensors file and the offset where its data starts."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except FileNotFoundError:
        raise AdapterConversionError(f"{path} does not exist") from None
    except (OSError, struct.error, ValueError) as exc:
        raise AdapterConversionError(f"{path} is not a safetensors file: {exc}") from exc
    if not isinstance(header, dict):
        raise AdapterConversionError(f"{path} is not a safetensors file")
    header.pop("__metadata__", None)
    return header, 8 + size


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float32.

    Read by hand rather than with `safetensors.numpy`, which cannot load BF16, the
    usual dtype of adapters trained on GPUs; torch is not a core dependency. The file
    is mapped, not read: float32 tensors are views of the mapping and others one
    float32 copy each, so converting an upload holds about one float32 copy of it
    (adapters.max_bytes bounds the file), not the file's bytes and a copy besides.
    """
    if not path.is_file() and (path.parent / PICKLED_WEIGHTS).is_file():
        raise AdapterConversionError(
            f"{path.parent} holds {PICKLED_WEIGHTS} (pickle); re-save the adapter with "
            f"safe_serialization=True to get {ADAPTER_WEIGHTS}"
        )
    header, start = _safetensors_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise AdapterConversionError(f"{path}: malformed entry for tensor {name!r}") from None
        raw = data[start + begin : start + end]
        count = math.prod(shape)
        if dtype == "BF16":
            if len(raw) != 2 * count:
                raise AdapterConversionError(f"{path}: tensor {name!r} is truncated")
            # bf16 is the top half of a float32: shift it into place.
            array = (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
        elif dtype in _NUMPY_DTYPES:
            np_dtype = np.dtype(_NUMPY_DTYPES[dtype])
            if len(raw) != np_dtype.itemsize * count:
                raise AdapterConversionError(f"{path}: tensor {name!r} is truncated")
            array = raw.view(np_dtype).astype(np.float32, copy=False)
        else:
            raise AdapterConversionError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        tensors[name] = array.reshape(shape)
    return tensors


def _base_weight_shapes(base_model_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """None when the dir holds only the config: llama.cpp's converter needs no more
    either, so the shape check is then left to llama.cpp at load time."""
    try:
        return read_weight_shapes(base_model_dir)
    except BaseWeightsUnreadable as exc:
        raise AdapterConversionError(str(exc)) from exc.cause


def _pair_tensors(weights: dict[str, np.ndarray]) -> list[LoraPair[np.ndarray]]:
    halves: list[tuple[LoraTensor, np.ndarray]] = []
    for key, tensor in weights.items():
        name = lora_tensor(key)
        if name is None:
            raise AdapterConversionError(_why_unexpected(key))
        if tensor.ndim != 2:
            raise AdapterConversionError(
                f"adapter tensor {key!r} has shape {tensor.shape}; only LoRA on linear layers converts"
            )
        halves.append((name, tensor))
    if not halves:
        raise AdapterConversionError("the adapter holds no LoRA tensors")
    try:
        return list(pair_lora(halves, shape=lambda tensor: tensor.shape))
    except MissingHalf as exc:
        raise AdapterConversionError(f"adapter module {exc.module!r} has no {exc.missing} tensor") from None
    except RankMismatch as exc:
        raise AdapterConversionError(
            f"adapter module {exc.module!r}: lora_A is rank {exc.rank_a} but lora_B rank {exc.rank_b}"
        ) from None


def _why_unexpected(key: str) -> str:
    if "lora_embedding_" in key:
        return f"embedding LoRA is not supported (tensor {key!r})"
    if "lora_magnitude_vector" in key:
        return f"DoRA adapters are not supported (tensor {key!r})"
    if "modules_to_save" in key or "trainable_tokens" in key:
        return f"adapters with modules_to_save/trainable tokens are not supported (tensor {key!r})"
    if key.endswith(".lora_B.bias"):
        return f"lora_bias is not supported (tensor {key!r})"
    return f"unknown adapter tensor {key!r}: expected base_model.model.<module>.lora_A/lora_B.weight"


def _alpha_keys(patterns: dict[str, Any], modules: list[str], path: Path) -> dict[str, str]:
    """Each module's alpha_pattern key, by PEFT's own matching (get_pattern_key: the
    first key that matches the end of the module name at a dot boundary). The keys are
    the adapter author's regexes, so they run only through tenant_regex."""
    try:
        return tenant_regex.pattern_keys(list(patterns), modules, "alpha_pattern")
    except tenant_regex.PatternRejected as exc:
        raise AdapterConversionError(f"{path}: alpha_pattern key {exc.pattern[:80]!r} {_pattern_problem(exc)}") from None


def _pattern_problem(exc: tenant_regex.PatternRejected) -> str:
    if exc.why == "too_long":
        return f"is longer than {tenant_regex.MAX_PATTERN_CHARS} characters"
    if exc.why == "invalid":
        return f"is not a valid regex: {exc.detail}"
    if exc.why == "counted_repeat":
        return "uses a counted repeat ({m,n})"
    return "takes too long to match" if exc.why == "too_slow" else "needs too much memory to match"


def _peft_scale(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / (math.sqrt(rank) if rslora else rank)


def _permute_rows(lora_b: np.ndarray, heads: int, module: str) -> np.ndarray:
    # Same as llama.cpp's LlamaModel.permute on the base weight: within each head, the
    # interleaved rotary halves are regrouped. Only rows move, so lora_a is unchanged.
    rows = lora_b.shape[0]
    if rows % (2 * heads):
        raise AdapterConversionError(
            f"adapter module {module!r} has {rows} output rows, not a multiple of 2*{heads} heads"
        )
    return (
        lora_b.reshape(heads, 2, rows // heads // 2, lora_b.shape[1])
        .swapaxes(1, 2)
        .reshape(lora_b.shape)
    )


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _write_gguf(
    out_file: Path, arch: str, alpha: float, tensors: list[tuple[str, np.ndarray, np.ndarray]]
) -> None:
    try:
        _write_gguf_file(out_file, arch, alpha, tensors)
    except OSError as exc:
        raise AdapterConversionError(f"cannot write {out_file}: {exc}") from exc


def _write_gguf_file(
    out_file: Path, arch: str, alpha: float, tensors: list[tuple[str, np.ndarray, np.ndarray]]
) -> None:
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # A temp file beside out_file so the final rename is atomic and a failure leaves nothing.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_file.name}.tmp-", dir=out_file.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.chmod(0o644)  # mkstemp makes it private; the result is an ordinary file
        writer = gguf.GGUFWriter(tmp, arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
            for name, lora_a, lora_b in tensors:
                # numpy (rows, cols) becomes GGML ne = (cols, rows): lora_a (in, r), lora_b (r, out).
                writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(lora_a, dtype=np.float32))
                writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(lora_b, dtype=np.float32))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
