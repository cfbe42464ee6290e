"""Checks a PEFT LoRA adapter must pass before the registry stores it.

Everything here reads files an untrusted tenant uploaded, so nothing is loaded with
pickle or imported: JSON is parsed, safetensors headers are read, and an upload may hold
only the files an adapter is made of (ACCEPTED_FILES: allowed by name, then checked to be
what the name says), rather than anything that fails to look dangerous. The config's
regexes run only through tenant_regex. Each failure is an `AdapterRejected` whose
`reason` is a stable code for clients and whose message says what to fix.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from safetensors import SafetensorError, safe_open

from tuneserve.adapters import tenant_regex
from tuneserve.adapters.dora import is_dora_tensor, merge_advice
from tuneserve.adapters.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    BaseWeightsUnreadable,
    ConfigInvalid,
    ConfigMissing,
    ConfigNotJson,
    ConfigNotObject,
    ConfigTooDeep,
    ConfigTooLarge,
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
from tuneserve.names import NAME_RULES, is_valid_name, reserved_name_error

RejectReason = Literal[
    "invalid_name",
    "invalid_source",
    "invalid_archive",
    "unsafe_archive",
    "too_many_files",
    "too_large",
    "pickle_file",
    "unexpected_file",
    "missing_config",
    "invalid_config",
    "not_lora",
    "dora_not_servable",
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


def check_new_name(value: str, what: Literal["tenant", "adapter"]) -> None:
    """check_name, and not a reserved name: for a name about to be stored."""
    check_name(value, what)
    if (reserved := reserved_name_error(value)) is not None:
        raise AdapterRejected("invalid_name", f"invalid {what} name: {reserved}")


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
# arbitrary code. Refused like any other unexpected file, with the way out in the message.
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})
# Text files that PEFT or the Hub put beside an adapter (model card, tokenizer saved with
# it). Accepted so that such dirs upload as they are; never stored (the registry keeps
# only the config and the weights).
ADAPTER_TEXT_FILES = frozenset({
    "README.md", ".gitattributes", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja",
})
ACCEPTED_FILES = frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS}) | ADAPTER_TEXT_FILES
# safetensors' own cap on its JSON header.
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


def check_member(name: str, filename: str) -> None:
    """Refuse a file of the upload that an adapter does not have. `name` is the member
    as the tenant wrote it, `filename` its last component."""
    if filename in ACCEPTED_FILES:
        return
    if any(filename.lower().endswith(suffix) for suffix in PICKLE_SUFFIXES):
        raise AdapterRejected(
            "pickle_file",
            f"{quote(name)} has a pickle-based extension; pickle files can run code when loaded "
            "and are not accepted. Save the adapter with safetensors (PEFT's save_pretrained "
            f"default) and upload only {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}",
        )
    raise unexpected(name, "is not a file of a PEFT LoRA adapter")


def unexpected(name: str | Path, why: str) -> AdapterRejected:
    return AdapterRejected(
        "unexpected_file",
        f"{quote(name)} {why}; an upload may hold only {ADAPTER_CONFIG}, {ADAPTER_WEIGHTS} and "
        f"the text files {sorted(ADAPTER_TEXT_FILES)}, at its top level or in one top-level directory",
    )


def check_contents(root: Path, tree: Path) -> None:
    """Each accepted file of the adapter dir `root` (in the unpacked upload `tree`) is
    what its name says: the text files text, the weights a safetensors file (before
    anything trusts its header)."""
    for path in sorted(root.iterdir()):
        if path.name in ADAPTER_TEXT_FILES and not _is_text(path):
            raise unexpected(path.relative_to(tree), "is not UTF-8 text")
    weights = root / ADAPTER_WEIGHTS
    why = _not_safetensors(weights) if weights.is_file() else None
    if why:
        raise AdapterRejected(
            "invalid_weights",
            f"{ADAPTER_WEIGHTS} is not a safetensors file ({why}); save the adapter with "
            "safetensors (PEFT's save_pretrained default)",
        )


def _is_text(path: Path) -> bool:
    """UTF-8 without NUL bytes; read in chunks, as the file may be as large as the upload."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                if b"\x00" in chunk:
                    return False
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _not_safetensors(path: Path) -> str | None:
    """Why `path` is not a safetensors file (8-byte little-endian header length, then a
    JSON object of that length), else None."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            return f"it is {size} bytes, shorter than a header"
        (length,) = struct.unpack("<Q", prefix)
        if not 2 <= length <= min(size - 8, _MAX_SAFETENSORS_HEADER):
            return f"its header length {length} does not fit a {size}-byte file"
        header = f.read(length)
    try:
        parsed = json.loads(header)
    except (ValueError, RecursionError):
        return "its header is not JSON"
    return None if isinstance(parsed, dict) else "its header is not a JSON object"


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
    except ConfigTooLarge as exc:
        raise AdapterRejected(
            "invalid_config", f"{ADAPTER_CONFIG} is larger than {exc.limit} bytes; PEFT writes a few KiB"
        ) from None
    except ConfigTooDeep as exc:
        raise AdapterRejected(
            "invalid_config", f"{ADAPTER_CONFIG} nests objects or arrays more than {exc.limit} levels deep"
        ) from None
    except ConfigNotObject:
        raise AdapterRejected("invalid_config", f"{ADAPTER_CONFIG} must be a JSON object") from None
    except NotLora as exc:
        raise AdapterRejected(
            "not_lora",
            f"{ADAPTER_CONFIG} has peft_type {quote(exc.peft_type)}; only LoRA adapters "
            "(peft_type \"LORA\") can be served",
        ) from None
    except ConfigInvalid as exc:
        # The key may hold a tenant's dict key (alpha_pattern.<key>): quoted, it stays one line.
        raise AdapterRejected("invalid_config", f"{ADAPTER_CONFIG}: key {quote(exc.key)}: {exc.reason}") from None


def _normalise(name: str) -> str:
    return name.strip().rstrip("/") or name


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~"))


def _as_path(name: str) -> Path | None:
    """None for a name no path can be made of: `~user` of no such user (RuntimeError),
    a NUL byte (ValueError), one the OS refuses to resolve."""
    try:
        return Path(name).expanduser().resolve()
    except (RuntimeError, ValueError, OSError):
        return None


def check_base(declared: str | None, settings: Settings) -> None:
    """The adapter must have been trained on the base this server serves."""
    names = [settings.model.name, *settings.adapters.base_aliases]
    accepted = {_normalise(n) for n in names} | {_normalise(str(settings.resolved_hf_path()))}
    served = [str(settings.resolved_hf_path())]
    served += [_normalise(n) for n in settings.adapters.base_aliases if _looks_like_path(n)]
    paths = {path for path in map(_as_path, served) if path is not None}
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
        try:
            by_regex = tenant_regex.fullmatches(target_modules, sorted(modules), "target_modules")
        except tenant_regex.PatternRejected as exc:
            raise _bad_pattern(exc, "use a list of module names") from None
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


def _check_pattern_keys(config: PeftLoraConfig, targets: set[str]) -> None:
    """alpha_pattern and rank_pattern keys are regexes, matched (by the GGUF converter
    and by PEFT-style loaders) against the target modules: they must compile and stay
    within tenant_regex's budget."""
    for field, keys in (("alpha_pattern", config.alpha_pattern), ("rank_pattern", config.rank_pattern)):
        try:
            tenant_regex.pattern_keys(list(keys), sorted(targets), field)
        except tenant_regex.PatternRejected as exc:
            raise _bad_pattern(exc, "use module names as keys") from None


def _bad_pattern(exc: tenant_regex.PatternRejected, instead: str) -> AdapterRejected:
    what = "regex" if exc.field == "target_modules" else "key"
    subject = f"{ADAPTER_CONFIG}: {exc.field} {what} {quote(exc.pattern)}"
    if exc.why == "too_long":
        return AdapterRejected(
            "invalid_config", f"{subject} is {len(exc.pattern)} characters long, more than "
            f"{tenant_regex.MAX_PATTERN_CHARS}; {instead}",
        )
    if exc.why == "invalid":
        return AdapterRejected("invalid_config", f"{subject} is not a valid regex: {exc.detail}")
    if exc.why == "counted_repeat":
        return AdapterRejected(
            "invalid_config", f"{subject} uses a counted repeat ({{m,n}}), which engines may expand "
            f"to an exponential size; {instead}",
        )
    cost = "takes too long" if exc.why == "too_slow" else "needs too much memory"
    return AdapterRejected("invalid_config", f"{subject} {cost} to match; {instead}")


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
        if is_dora_tensor(key):  # a DoRA checkpoint whose config says otherwise
            raise AdapterRejected(
                "dora_not_servable", f"{ADAPTER_WEIGHTS} holds DoRA magnitude tensor {quote(key)}. {merge_advice()}"
            )
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


def file_sha256(path: Path) -> str:
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
    root = find_adapter_root(tree)
    check_contents(root, tree)
    config = _read_config(root)
    if config.use_dora:
        raise AdapterRejected("dora_not_servable", f"{ADAPTER_CONFIG} has use_dora true. {merge_advice()}")
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
    _check_pattern_keys(config, targets)
    weights = root / ADAPTER_WEIGHTS
    adapted = _check_weights(weights, targets, base, max_rank)
    return ValidatedAdapter(
        root=root,
        rank=config.r,
        alpha=config.lora_alpha,
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in adapted})),
        sha256=file_sha256(weights),
        size_bytes=weights.stat().st_size,
    )
