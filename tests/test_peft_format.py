"""The PEFT adapter format's one home (tuneserve/adapters/peft_format.py), and that the
registry's checks and the GGUF converter, both built on it, judge a config alike.

No model is loaded: files are written by hand, so this runs in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from merge.export import source_kind
from tuneserve.adapters import validation
from tuneserve.adapters.peft_format import (
    ADAPTER_CONFIG,
    BaseWeightsUnreadable,
    LoraPart,
    LoraTensor,
    MissingHalf,
    RankMismatch,
    is_adapter_dir,
    lora_tensor,
    pair_lora,
    read_weight_shapes,
)
from tuneserve.adapters.validation import AdapterRejected
from tuneserve.gguf import lora

GOOD_CONFIG: dict[str, Any] = {
    "peft_type": "LORA",
    "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "r": 8,
    "lora_alpha": 16,
    "target_modules": ["q_proj", "v_proj"],
    "rank_pattern": {},
    "alpha_pattern": {},
    "use_rslora": False,
}


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / ADAPTER_CONFIG).write_text(json.dumps(config))
    return path


def test_is_adapter_dir(tmp_path: Path) -> None:
    assert is_adapter_dir(write_config(tmp_path / "adapter", GOOD_CONFIG))
    assert not is_adapter_dir(tmp_path)
    assert not is_adapter_dir(tmp_path / "missing")
    (tmp_path / "fake" / ADAPTER_CONFIG).mkdir(parents=True)  # a dir by that name is no config
    assert not is_adapter_dir(tmp_path / "fake")
    # merge's export decides its source kind by the same check.
    assert source_kind(tmp_path / "adapter") == "adapter"


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", LoraTensor("model.layers.0.self_attn.q_proj", "A")),
        ("base_model.model.lm_head.lora_B.weight", LoraTensor("lm_head", "B")),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", None),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", None),
        ("base_model.model.model.embed_tokens.lora_embedding_A", None),
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", None),
        # A trailing newline is another name, not the same tensor.
        ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight\n", None),
    ],
)
def test_lora_tensor_names(key: str, expected: LoraTensor | None) -> None:
    assert lora_tensor(key) == expected


def halves(*items: tuple[str, LoraPart, tuple[int, int]]) -> list[tuple[LoraTensor, tuple[int, int]]]:
    return [(LoraTensor(module, part), shape) for module, part, shape in items]


def test_pair_lora_joins_halves_in_first_seen_order() -> None:
    pairs = list(pair_lora(
        halves(("v", "B", (64, 4)), ("q", "A", (8, 32)), ("v", "A", (4, 16)), ("q", "B", (32, 8))),
        shape=lambda s: s,
    ))
    assert [(p.module, p.rank, p.shape) for p in pairs] == [("v", 4, (64, 16)), ("q", 8, (32, 32))]
    assert pairs[0].a == (4, 16) and pairs[0].b == (64, 4)


def test_pair_lora_is_lazy_about_errors() -> None:
    # Callers check each good module as it comes, so the error surfaces at its module.
    pairs = pair_lora(halves(("a", "A", (4, 8)), ("a", "B", (8, 4)), ("b", "A", (4, 8))), shape=lambda s: s)
    assert next(pairs).module == "a"
    with pytest.raises(MissingHalf) as raised:
        next(pairs)
    assert (raised.value.module, raised.value.missing) == ("b", "lora_B")


def test_pair_lora_refuses_a_rank_mismatch() -> None:
    with pytest.raises(RankMismatch) as raised:
        list(pair_lora(halves(("m", "A", (4, 8)), ("m", "B", (8, 2))), shape=lambda s: s))
    assert (raised.value.rank_a, raised.value.rank_b) == (4, 2)
    with pytest.raises(MissingHalf, match="has no lora_A tensor"):
        list(pair_lora(halves(("m", "B", (8, 2))), shape=lambda s: s))


def test_read_weight_shapes(tmp_path: Path) -> None:
    assert read_weight_shapes(write_config(tmp_path / "config-only", {})) is None

    single = tmp_path / "single"
    single.mkdir()
    save_file({"model.q.weight": np.zeros((3, 2), np.float32), "model.q.bias": np.zeros(3, np.float32)},
              str(single / "model.safetensors"))
    assert read_weight_shapes(single) == {"model.q": (3, 2)}

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"model.q.weight": np.zeros((4, 4), np.float32)}, str(sharded / "model-1.safetensors"))
    save_file({"other.weight": np.zeros((1, 1), np.float32)}, str(sharded / "consolidated.safetensors"))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.q.weight": "model-1.safetensors"}}))
    assert read_weight_shapes(sharded) == {"model.q": (4, 4)}

    (single / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BaseWeightsUnreadable, match="cannot read the base model's weights"):
        read_weight_shapes(single)


# Each refused by the registry (reason, as the tenant sees it) and by the converter.
BAD_CONFIGS: list[tuple[str, dict[str, Any], str, str]] = [
    ("rank-zero", {"r": 0}, "invalid_config", "key 'r'"),
    ("alpha-not-a-number", {"lora_alpha": "big"}, "invalid_config", "key 'lora_alpha'"),
    ("bad-alpha-pattern", {"alpha_pattern": {"q_proj": "big"}}, "invalid_config", "key 'alpha_pattern.q_proj'"),
    ("bad-rank-pattern", {"rank_pattern": {"q_proj": "big"}}, "invalid_config", "key 'rank_pattern.q_proj'"),
    ("bad-rslora", {"use_rslora": "maybe"}, "invalid_config", "key 'use_rslora'"),
    ("not-lora", {"peft_type": "IA3"}, "not_lora", "IA3"),
]


@pytest.mark.parametrize(("change", "reason", "says"), [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_registry_and_converter_refuse_the_same_configs(
    tmp_path: Path, change: dict[str, Any], reason: str, says: str
) -> None:
    adapter = write_config(tmp_path / "adapter", {**GOOD_CONFIG, **change})
    with pytest.raises(AdapterRejected) as rejected:
        validation._read_config(adapter)
    assert rejected.value.reason == reason and says in rejected.value.message
    with pytest.raises(lora.AdapterConversionError, match=says):
        lora._read_adapter_config(adapter)


def test_registry_and_converter_read_a_good_config_alike(tmp_path: Path) -> None:
    adapter = write_config(tmp_path / "adapter", GOOD_CONFIG)
    assert validation._read_config(adapter) == lora._read_adapter_config(adapter)


def test_a_config_that_is_not_utf8_is_refused_not_crashed(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / ADAPTER_CONFIG).write_bytes(b'{"peft_type": "\xff"}')
    with pytest.raises(AdapterRejected, match=r"\(invalid_config\)"):
        validation._read_config(adapter)
    with pytest.raises(lora.AdapterConversionError, match="not a PEFT adapter directory: cannot read"):
        lora._read_adapter_config(adapter)
