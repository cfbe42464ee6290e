"""The PEFT LoRA adapter format: the one place tuneserve says what an adapter dir is.

What PEFT's `save_pretrained` writes for a LoRA model: `adapter_config.json` and
`adapter_model.safetensors`, whose tensors are `base_model.model.<module>.lora_A.weight`
(r x in) and `base_model.model.<module>.lora_B.weight` (out x r) per adapted module.

The registry's checks (validation.py) and the GGUF converter (gguf/lora.py) both parse
adapters here, so they cannot drift apart on what counts as an adapter, how its config
reads or which tensors pair up. The errors carry facts, not wording: each caller words
them for its own audience (an untrusted tenant's `AdapterRejected` reason, an
operator's `AdapterConversionError`), and those messages are part of their contracts.

Nothing here unpickles or imports anything from the files it reads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Generic, Iterable, Iterator, Literal, Sequence, TypeVar, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError, safe_open

from tuneserve.config import first_validation_error

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# What save_pretrained(safe_serialization=False) writes instead of ADAPTER_WEIGHTS: a
# pickle, which is never loaded, only recognised to say how to re-save the adapter.
PICKLED_WEIGHTS = "adapter_model.bin"
# A real config is a few KiB, a few levels deep. The caps come before anything reads
# it: json and every reader after it recurse per level (a RecursionError is no answer).
MAX_CONFIG_BYTES = 256 * 1024
MAX_CONFIG_DEPTH = 32

LoraPart = Literal["A", "B"]
T = TypeVar("T")


def is_adapter_dir(path: Path) -> bool:
    """Whether `path` is a PEFT adapter dir. Judged by the config alone, as PEFT's own
    `from_pretrained` does: the weights' absence is a finer error, left to the reader."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


# ---------------------------------------------------------------- errors


class PeftFormatError(Exception):
    """An adapter dir does not follow the format; callers reword it (see the docstring)."""


class ConfigMissing(PeftFormatError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} does not exist")
        self.path = path


class ConfigNotJson(PeftFormatError):
    def __init__(self, path: Path, cause: ValueError) -> None:
        super().__init__(f"{path} is not valid JSON: {cause}")
        self.path = path
        self.cause = cause


class ConfigNotObject(PeftFormatError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} is not a JSON object")
        self.path = path


class ConfigTooLarge(PeftFormatError):
    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(f"{path} is larger than {limit} bytes")
        self.path = path
        self.limit = limit


class ConfigTooDeep(PeftFormatError):
    def __init__(self, path: Path, limit: int) -> None:
        super().__init__(f"{path} nests values more than {limit} levels deep")
        self.path = path
        self.limit = limit


class NotLora(PeftFormatError):
    def __init__(self, peft_type: object) -> None:
        super().__init__(f"peft_type is {peft_type!r}, not 'LORA'")
        self.peft_type = peft_type


class ConfigInvalid(PeftFormatError):
    """The first key pydantic refused: one actionable line beats a full report."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"key '{key}': {reason}")
        self.key = key
        self.reason = reason


class MissingHalf(PeftFormatError):
    def __init__(self, module: str, missing: Literal["lora_A", "lora_B"]) -> None:
        super().__init__(f"module {module!r} has no {missing} tensor")
        self.module = module
        self.missing = missing


class RankMismatch(PeftFormatError):
    def __init__(self, module: str, rank_a: int, rank_b: int) -> None:
        super().__init__(f"module {module!r}: lora_A has rank {rank_a} but lora_B {rank_b}")
        self.module = module
        self.rank_a = rank_a
        self.rank_b = rank_b


class BaseWeightsUnreadable(PeftFormatError):
    def __init__(self, hf_dir: Path, cause: Exception) -> None:
        super().__init__(f"cannot read the base model's weights in {hf_dir}: {cause}")
        self.hf_dir = hf_dir
        self.cause = cause


# ---------------------------------------------------------------- adapter_config.json


class PeftLoraConfig(BaseModel):
    """The keys of adapter_config.json that tuneserve relies on; others pass through.

    Each key is typed for every reader even if only one of them uses it, so that a
    config one reader accepts cannot be one the other refuses as malformed.
    """

    model_config = ConfigDict(extra="ignore")

    base_model_name_or_path: str | None = None
    r: int = Field(gt=0)
    # Zero is a valid PEFT alpha; the GGUF converter refuses it for its own reason.
    # NaN and infinity (json.loads reads both) would scale every output to NaN.
    lora_alpha: float = Field(allow_inf_nan=False)
    target_modules: list[str] | str
    # Declared ranks; the tensors still decide each module's real one.
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(default_factory=dict)
    use_rslora: bool = False
    # Read so that a DoRA adapter is refused as such (see dora.py), not as odd tensors.
    use_dora: bool = False


def read_config_json(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json as a JSON object, not yet checked against the format.

    An OSError other than absence propagates: it is the reader's fault, not the file's.
    """
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not is_adapter_dir(adapter_dir):
        raise ConfigMissing(path)
    with path.open("rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigTooLarge(path, MAX_CONFIG_BYTES)
    try:
        raw: Any = json.loads(data)
    except RecursionError:
        raise ConfigTooDeep(path, MAX_CONFIG_DEPTH) from None
    except ValueError as exc:  # also UnicodeDecodeError
        raise ConfigNotJson(path, exc) from None
    if not isinstance(raw, dict):
        raise ConfigNotObject(path)
    if _nesting(raw) > MAX_CONFIG_DEPTH:
        raise ConfigTooDeep(path, MAX_CONFIG_DEPTH)
    return raw


def _nesting(value: Any) -> int:
    """How many levels of objects and arrays `value` has; iterative, so any depth is fine."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def check_is_lora(raw: dict[str, Any]) -> None:
    """Separate from `parse_lora_config` so that a caller can refuse other adapter kinds
    (IA3, prefix tuning...) before it looks at LoRA-specific switches."""
    if raw.get("peft_type") != "LORA":
        raise NotLora(raw.get("peft_type"))


def parse_lora_config(raw: dict[str, Any]) -> PeftLoraConfig:
    check_is_lora(raw)
    try:
        return PeftLoraConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigInvalid(*first_validation_error(exc)) from None


# ---------------------------------------------------------------- tensors


_LORA_TENSOR = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")


@dataclass(frozen=True)
class LoraTensor:
    module: str  # the adapted module: model.layers.0.self_attn.q_proj
    part: LoraPart


def lora_tensor(key: str) -> LoraTensor | None:
    """What a safetensors key names, or None for anything but a plain LoRA A/B weight
    (DoRA magnitudes, embedding LoRA, modules_to_save copies, lora_B biases...)."""
    match = _LORA_TENSOR.fullmatch(key)
    if match is None:
        return None
    return LoraTensor(match["module"], cast(LoraPart, match["part"]))


@dataclass(frozen=True)
class LoraPair(Generic[T]):
    module: str
    a: T  # r x in
    b: T  # out x r
    rank: int
    shape: tuple[int, int]  # (out, in): the shape of the base weight the pair adapts


def pair_lora(halves: Iterable[tuple[LoraTensor, T]], shape: Callable[[T], Sequence[int]]) -> Iterator[LoraPair[T]]:
    """The A/B halves (2-D, tensors or bare shapes as `shape` reads them) joined per
    module, in the order modules first appear.

    Lazy, raising MissingHalf or RankMismatch only when it reaches the faulty module,
    so that a caller's own per-module checks keep their place in the order of errors.
    """
    by_module: dict[str, dict[LoraPart, T]] = {}
    for tensor, value in halves:
        by_module.setdefault(tensor.module, {})[tensor.part] = value
    for module, parts in by_module.items():
        if "A" not in parts or "B" not in parts:
            raise MissingHalf(module, "lora_B" if "A" in parts else "lora_A")
        a, b = parts["A"], parts["B"]
        (rank, in_features), (out_features, rank_b) = shape(a), shape(b)
        if rank != rank_b:
            raise RankMismatch(module, rank, rank_b)
        yield LoraPair(module, a, b, rank, (out_features, in_features))


# ---------------------------------------------------------------- the base model


def read_weight_shapes(hf_dir: Path) -> dict[str, tuple[int, ...]] | None:
    """The shapes of an HF model's weights by module name (`model.layers.0.self_attn.q_proj`),
    from the safetensors headers only; None when the dir holds no safetensors at all.

    A sharded model's index decides its files, so stray copies beside the shards
    (e.g. Mistral's consolidated.safetensors) are not read.
    """
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({hf_dir / name for name in weight_map.values()})
        else:
            files = sorted(hf_dir.glob("*.safetensors"))
        if not files:
            return None
        for file in files:
            with safe_open(str(file), framework="numpy") as weights:
                for key in weights.keys():
                    if key.endswith(".weight"):
                        shapes[key[: -len(".weight")]] = tuple(weights.get_slice(key).get_shape())
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        raise BaseWeightsUnreadable(hf_dir, exc) from exc
    return shapes
