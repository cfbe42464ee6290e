"""Checks a PEFT LoRA adapter must pass before the registry stores it.

Everything here reads files an untrusted tenant uploaded, so nothing is loaded with
pickle or imported: JSON is parsed, safetensors headers are read, other files are only
sniffed. Each failure is an `AdapterRejected` whose `reason` is a stable code for
clients and whose message says what to fix.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickletools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from safetensors import SafetensorError, safe_open

from tuneserve.adapters.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BaseWeightsUnreadable,
    ConfigInvalid,
    ConfigMissing,
    ConfigNotJson,
    ConfigNotObject,
    LoraTensor,
    MissingHalf,
    NotLora,
    PeftLoraConfig,
    RankMismatch,
    lora_tensor,
    pair_lora,
    parse_lora_config,
    read_config_json,
    read_weight_shapes,
)
from tuneserve.config import Settings
from tuneserve.errors import ConfigError, TuneserveError
from tuneserve.names import NAME_RULES, is_valid_name

RejectReason = Literal[
    "invalid_name",
    "invalid_source",
    "invalid_archive",
    "unsafe_archive",
    "too_many_files",
    "too_large",
    "pickle_file",
    "missing_config",
    "invalid_config",
    "not_lora",
    "base_mismatch",
    "rank_too_large",
    "unknown_target_module",
    "missing_weights",
    "invalid_weights",
    "conversion_failed",
]


class AdapterRejected(TuneserveError):
    """An adapter was refused and nothing was stored; a client mistake (HTTP 4xx).

    `reason` is one of `RejectReason`; `message` says what to fix.
    """

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(f"adapter rejected ({reason}): {message}")
        self.reason = reason
        self.message = message


def quote(value: object, limit: int = 120) -> str:
    """Untrusted text (file and tensor names) for a one-line message: repr escapes
    control characters and newlines; the cut keeps a hostile name from flooding logs."""
    text = repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def check_name(value: str, what: Literal["tenant", "adapter"]) -> None:
    """Tenant and adapter names become path components and engine names."""
    if not is_valid_name(value):
        raise AdapterRejected(
            "invalid_name",
            f"invalid {what} name {quote(value)}: {NAME_RULES}",
        )


# ---------------------------------------------------------------- base model


@dataclass(frozen=True)
class BaseModules:
    """The base model's weight shapes by module name (`model.layers.0.self_attn.q_proj`)."""

    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def from_hf_dir(cls, hf_dir: Path) -> "BaseModules":
        try:
            shapes = read_weight_shapes(hf_dir)
        except BaseWeightsUnreadable as exc:
            raise ConfigError(
                f"model.hf_path: cannot read the base model's weights in {hf_dir}: {exc.cause}"
            ) from exc.cause
        if not shapes:
            raise ConfigError(
                f"model.hf_path: no safetensors weights in {hf_dir}; run `tuneserve models prepare` "
                "or point model.hf_path at an HF model dir"
            )
        return cls(shapes)

    def linear_modules(self) -> set[str]:
        """What PEFT's "all-linear" adapts: 2-D weights except embeddings and the output
        layer. Judged from names and shapes, since only the weights are read."""
        return {
            module
            for module, shape in self.shapes.items()
            if len(shape) == 2 and "embed" not in module.rsplit(".", 1)[-1]
            and module.rsplit(".", 1)[-1] != "lm_head"
        }


# ---------------------------------------------------------------- files


# Extensions of pickle-based formats (torch.save, pickle, joblib): loading one can run
# arbitrary code, so they are refused whatever their content.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})
_SNIFF_BYTES = 64 * 1024


def _looks_like_pickle(path: Path) -> str | None:
    """Why the file is a pickle (or a torch zip checkpoint) whatever its name, else None."""
    with path.open("rb") as f:
        window = f.read(_SNIFF_BYTES)
        longer = bool(f.read(1))
    if window.startswith(b"PK\x03\x04"):
        return "is a zip archive (the format of torch.save checkpoints, which hold pickles)"
    # A pickle is a stream of opcodes ending in STOP. Text and safetensors fail on an
    # unknown opcode within a few bytes; a real pickle parses to STOP, or (when
    # large) parses cleanly to the end of the window.
    stream = io.BytesIO(window)
    opcodes = 0
    try:
        for opcode, _, _ in pickletools.genops(stream):
            opcodes += 1
            if opcode.name == "STOP":
                return "is a pickle"
    except ValueError:  # unknown opcode, bad argument, or the window ended
        pass
    if longer and opcodes > 2 and stream.tell() >= len(window):
        return "is a pickle"
    return None


def check_no_pickles(tree: Path) -> None:
    """Refuse any pickle-based file anywhere in the unpacked upload."""
    for dirpath, _, filenames in os.walk(tree):
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            rel = path.relative_to(tree)
            why = "has a pickle-based extension" if path.suffix.lower() in PICKLE_SUFFIXES else None
            why = why or _looks_like_pickle(path)
            if why:
                raise AdapterRejected(
                    "pickle_file",
                    f"{quote(rel)} {why}; pickle files can run code when loaded and are not "
                    "accepted. Save the adapter with safetensors (PEFT's save_pretrained "
                    f"default) and upload only {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}",
                )


def find_adapter_root(tree: Path) -> Path:
    """Files at the root, or inside a single top-level dir: both are accepted."""
    entries = [p for p in tree.iterdir() if p.name != "__MACOSX"]  # zips made on macOS
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return tree


# ---------------------------------------------------------------- adapter_config.json


def _read_config(root: Path) -> PeftLoraConfig:
    try:
        return parse_lora_config(read_config_json(root))
    except ConfigMissing:
        raise AdapterRejected(
            "missing_config",
            f"no {ADAPTER_CONFIG} at the top level of the upload (or of its single top-level "
            "directory); upload the directory PEFT's save_pretrained wrote",
        ) from None
    except ConfigNotJson as exc:
        raise AdapterRejected("invalid_config", f"{ADAPTER_CONFIG} is not valid JSON: {exc.cause}") from None
    except ConfigNotObject:
        raise AdapterRejected("invalid_config", f"{ADAPTER_CONFIG} must be a JSON object") from None
    except NotLora as exc:
        raise AdapterRejected(
            "not_lora",
            f"{ADAPTER_CONFIG} has peft_type {quote(exc.peft_type)}; only LoRA adapters "
            "(peft_type \"LORA\") can be served",
        ) from None
    except ConfigInvalid as exc:
        raise AdapterRejected("invalid_config", f"{ADAPTER_CONFIG}: key '{exc.key}': {exc.reason}") from None


def _normalise(name: str) -> str:
    return name.strip().rstrip("/") or name


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~"))


def _as_path(name: str) -> Path:
    return Path(name).expanduser().resolve()


def check_base(declared: str | None, settings: Settings) -> None:
    """The adapter must have been trained on the base this server serves."""
    names = [settings.model.name, *settings.adapters.base_aliases]
    accepted = {_normalise(n) for n in names} | {_normalise(str(settings.resolved_hf_path()))}
    paths = {_as_path(str(settings.resolved_hf_path()))}
    paths |= {_as_path(_normalise(n)) for n in settings.adapters.base_aliases if _looks_like_path(n)}
    if declared:
        name = _normalise(declared)
        if name in accepted or (_looks_like_path(name) and _as_path(name) in paths):
            return
    said = f"says base_model_name_or_path={quote(declared)}" if declared else "has no base_model_name_or_path"
    # The served HF path stays out of the message: it is a server detail.
    raise AdapterRejected(
        "base_mismatch",
        f"{ADAPTER_CONFIG} {said}, but this server serves {settings.model.name!r}; accepted: "
        f"{names} or the server's own model path. Train the adapter on this base, or if it "
        "is the same model under another name, add that name to adapters.base_aliases",
    )


# ---------------------------------------------------------------- target modules


def _targets(target_modules: list[str] | str, base: BaseModules) -> set[str]:
    """Base modules the config's target_modules select, PEFT's way: a list entry
    matches a module name or its dotted suffix, a string is a full-match regex, and
    "all-linear" means every linear layer but the output one."""
    modules = base.shapes.keys()
    if target_modules == "all-linear":
        return base.linear_modules()
    if isinstance(target_modules, str):
        if len(target_modules) > 512:
            raise AdapterRejected("invalid_config", f"{ADAPTER_CONFIG}: target_modules regex is too long")
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise AdapterRejected(
                "invalid_config", f"{ADAPTER_CONFIG}: target_modules is not a valid regex: {exc}"
            ) from None
        by_regex = {m for m in modules if pattern.fullmatch(m)}
        if not by_regex:
            raise AdapterRejected(
                "unknown_target_module",
                f"target_modules regex {quote(target_modules)} matches no module of the base model",
            )
        return by_regex
    selected: set[str] = set()
    for entry in target_modules:
        matched = {m for m in modules if m == entry or m.endswith("." + entry)}
        if not matched:
            leaves = sorted({m.rsplit(".", 1)[-1] for m in base.linear_modules()})
            raise AdapterRejected(
                "unknown_target_module",
                f"target_modules entry {quote(entry)} is not a module of the base model; "
                f"its linear modules are {leaves}",
            )
        selected |= matched
    return selected


# ---------------------------------------------------------------- weights


_WEIGHT_DTYPES = {"F32", "F16", "BF16"}


def _check_weights(path: Path, targets: set[str], base: BaseModules, max_rank: int) -> list[str]:
    """Parse the safetensors header and check every tensor; return the adapted modules."""
    if not path.is_file():
        raise AdapterRejected(
            "missing_weights",
            f"no {ADAPTER_WEIGHTS} next to {ADAPTER_CONFIG}; save the adapter with "
            "safetensors (PEFT's save_pretrained default)",
        )
    try:
        with safe_open(str(path), framework="numpy") as weights:
            header = {k: (weights.get_slice(k).get_dtype(), weights.get_slice(k).get_shape()) for k in weights.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterRejected(
            "invalid_weights", f"{ADAPTER_WEIGHTS} is not a valid safetensors file: {exc}"
        ) from None
    halves: list[tuple[LoraTensor, list[int]]] = []
    for key, (dtype, shape) in header.items():
        tensor = lora_tensor(key)
        if tensor is None or tensor.module not in targets:
            raise AdapterRejected(
                "invalid_weights",
                f"{ADAPTER_WEIGHTS} holds tensor {quote(key)}, which is not the lora_A/lora_B "
                "weight of a target module; only plain LoRA on target_modules is accepted",
            )
        if dtype not in _WEIGHT_DTYPES or len(shape) != 2:
            raise AdapterRejected(
                "invalid_weights",
                f"tensor {quote(key)} is {dtype} {shape}; LoRA weights must be 2-D F32, F16 or BF16",
            )
        halves.append((tensor, shape))
    if not halves:
        raise AdapterRejected("invalid_weights", f"{ADAPTER_WEIGHTS} holds no LoRA tensors")
    adapted: list[str] = []
    try:
        # By module name, so that which of several faulty modules is reported does not
        # depend on the order the uploader's tool wrote the tensors in.
        for pair in pair_lora(sorted(halves, key=lambda half: half[0].module), shape=lambda s: s):
            module = pair.module
            # The tensors, not the config, decide the rank the engines must allocate.
            if pair.rank > max_rank:
                raise AdapterRejected(
                    "rank_too_large",
                    f"module {quote(module)} has rank {pair.rank}, above the limit of {max_rank} "
                    "(adapters.max_rank); retrain with a smaller r",
                )
            expected = base.shapes[module]
            out_features, in_features = pair.shape
            if pair.shape != tuple(expected):
                raise AdapterRejected(
                    "base_mismatch",
                    f"module {quote(module)} adapts a {out_features}x{in_features} weight but the "
                    f"base model's is {expected[0]}x{expected[1]}; the adapter was trained on another base",
                )
            adapted.append(module)
    except MissingHalf as exc:
        raise AdapterRejected("invalid_weights", f"module {quote(exc.module)} has no {exc.missing} tensor") from None
    except RankMismatch as exc:
        raise AdapterRejected(
            "invalid_weights", f"module {quote(exc.module)}: lora_A has rank {exc.rank_a} but lora_B {exc.rank_b}"
        ) from None
    return adapted


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- all together


@dataclass(frozen=True)
class ValidatedAdapter:
    root: Path  # the dir holding adapter_config.json and adapter_model.safetensors
    rank: int
    alpha: float
    target_modules: tuple[str, ...]  # leaf names of the adapted modules: ("q_proj", "v_proj")
    sha256: str  # of adapter_model.safetensors
    size_bytes: int  # of adapter_model.safetensors


def validate_adapter(tree: Path, settings: Settings, base: BaseModules) -> ValidatedAdapter:
    """Check an unpacked upload (see archive.unpack); raise AdapterRejected on the first problem."""
    check_no_pickles(tree)
    root = find_adapter_root(tree)
    config = _read_config(root)
    check_base(config.base_model_name_or_path, settings)
    max_rank = settings.adapters.max_rank
    for what, rank in [("r", config.r), *((f"rank_pattern[{k!r}]", v) for k, v in config.rank_pattern.items())]:
        if rank > max_rank:
            raise AdapterRejected(
                "rank_too_large",
                f"{ADAPTER_CONFIG}: {what}={rank} is above the limit of {max_rank} "
                "(adapters.max_rank); retrain with a smaller r",
            )
    targets = _targets(config.target_modules, base)
    weights = root / ADAPTER_WEIGHTS
    adapted = _check_weights(weights, targets, base, max_rank)
    return ValidatedAdapter(
        root=root,
        rank=config.r,
        alpha=config.lora_alpha,
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in adapted})),
        sha256=_sha256(weights),
        size_bytes=weights.stat().st_size,
    )
