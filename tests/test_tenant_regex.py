"""Regexes written by a tenant (target_modules, alpha_pattern/rank_pattern keys) run only
in tenant_regex's child: matched exactly as PEFT matches them, bounded in CPU time and
memory, and never holding the caller's GIL. Also the caps on adapter_config.json, judged
alike by the registry's checks and the GGUF converter.

No model is loaded: module names and configs are written by hand.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from tuneserve.adapters import tenant_regex, validation
from tuneserve.adapters.peft_format import ADAPTER_CONFIG
from tuneserve.adapters.tenant_regex import PatternRejected
from tuneserve.adapters.validation import AdapterRejected
from tuneserve.gguf import lora

_PER_LAYER = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
]
NAMES = ["model.embed_tokens", "model.norm", "lm_head"] + [f"model.layers.{i}.{m}" for i in range(30) for m in _PER_LAYER]
# Backtracks catastrophically (in `re` and in the `regex` package) on the names it does
# not match; quick on those it does.
CATASTROPHIC_TARGETS = r"(.|.?)+(q|v)_proj"
CATASTROPHIC_KEY = r"(.|.?)+x"
CONFIG: dict[str, Any] = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


@pytest.mark.parametrize(
    "pattern",
    [r".*\.(q|v)_proj", r"model\.layers\.\d+\.self_attn\.(q|v)_proj", "q_proj", r".*layers\.1\d\..*", r"(?i).*Q_PROJ",
     r".*\.mlp\..*|lm_head", ""],
)
def test_target_modules_are_matched_like_peft(pattern: str) -> None:
    """PEFT's check_target_module_exists: re.fullmatch(target_modules, name)."""
    assert tenant_regex.fullmatches(pattern, NAMES, "target_modules") == {n for n in NAMES if re.fullmatch(pattern, n)}


@pytest.mark.parametrize(
    "keys",
    [["q_proj"], ["self_attn.v_proj", "v_proj"], [r"layers\.1\..*", "proj"], [r"layers\.(1|2)\.mlp\.down_proj", "down_proj"],
     ["lm_head", "norm"], [r"\d+\.self_attn\.[qk]_proj", "k_proj"], ["model"]],
)
def test_pattern_keys_are_matched_like_peft(keys: list[str]) -> None:
    from peft.utils.other import get_pattern_key

    # get_pattern_key returns the name itself when no key matches.
    expected = {name: key for name in NAMES if (key := get_pattern_key(keys, name)) in keys}
    assert tenant_regex.pattern_keys(keys, NAMES, "alpha_pattern") == expected


def _ticking(call: Callable[[], object]) -> tuple[list[float], float]:
    """Run `call` while another thread ticks every 5 ms; return the gaps between ticks
    during the call and the largest gap before it (the machine's own jitter)."""
    ticks: list[float] = []
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.005)

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    time.sleep(0.3)
    before = len(ticks)
    try:
        call()
    finally:
        stop.set()
        ticker.join()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    return gaps[before:], max(gaps[:before])


@pytest.mark.parametrize(
    ("call", "offending"),
    [
        (lambda: tenant_regex.fullmatches(CATASTROPHIC_TARGETS, NAMES, "target_modules"), CATASTROPHIC_TARGETS),
        # The progress lines name which of several keys was too slow.
        (lambda: tenant_regex.pattern_keys(["q_proj", CATASTROPHIC_KEY, "v_proj"], NAMES, "rank_pattern"), CATASTROPHIC_KEY),
    ],
    ids=["target_modules", "pattern-key"],
)
def test_a_catastrophic_pattern_is_stopped_without_holding_the_gil(call: Callable[[], object], offending: str) -> None:
    rejected: list[PatternRejected] = []

    def run() -> None:
        try:
            call()
        except PatternRejected as exc:
            rejected.append(exc)

    started = time.monotonic()
    during, jitter = _ticking(run)
    assert time.monotonic() - started < 20  # minutes in `re`; the budget is one CPU second
    assert len(rejected) == 1 and (rejected[0].why, rejected[0].pattern) == ("too_slow", offending)
    assert len(during) >= 10
    assert max(during) < 0.1 + jitter  # the caller's other threads ran all along


def test_invalid_and_overlong_patterns_are_named() -> None:
    with pytest.raises(PatternRejected) as invalid:
        tenant_regex.pattern_keys(["q_proj", "v_proj(", "k_proj"], NAMES, "alpha_pattern")
    assert (invalid.value.field, invalid.value.pattern, invalid.value.why) == ("alpha_pattern", "v_proj(", "invalid")
    # Positions count in the tenant's key, not in PEFT's wrapper around it.
    assert invalid.value.detail == "missing ), unterminated subpattern at position 6"

    long_key = "q_proj|" * 80
    with pytest.raises(PatternRejected) as too_long:
        tenant_regex.pattern_keys(["q_proj", long_key], NAMES, "rank_pattern")
    assert (too_long.value.pattern, too_long.value.why) == (long_key, "too_long")


def test_nothing_to_match_runs_no_child() -> None:
    started = time.monotonic()
    assert tenant_regex.pattern_keys([], NAMES, "alpha_pattern") == {}
    assert tenant_regex.fullmatches("(", [], "target_modules") == set()
    assert time.monotonic() - started < 0.05


@pytest.mark.parametrize("pattern", ["(?:(?:(?:(?:a{65535}){65535}){65535}){65535})", "q_proj{1}", "x{2,}", "a{,3}"])
def test_counted_repeats_are_refused_before_any_engine_sees_them(pattern: str) -> None:
    # The `regex` package, which vLLM reads rank_pattern/alpha_pattern with, expands
    # nested counted repeats while compiling and runs out of memory in the engine; `re`
    # keeps the counts, so matching them here would call them harmless.
    for run in (lambda: tenant_regex.fullmatches(pattern, NAMES, "target_modules"),
                lambda: tenant_regex.pattern_keys([pattern], NAMES, "alpha_pattern")):
        with pytest.raises(tenant_regex.PatternRejected) as refused:
            run()
        assert refused.value.why == "counted_repeat" and refused.value.pattern == pattern
    # An escaped brace is a literal, not a repeat.
    assert tenant_regex.fullmatches(r"q_proj\{1\}", NAMES, "target_modules") == set()


# ---------------------------------------------------------------- the converter


def test_the_converter_matches_alpha_keys_through_the_child() -> None:
    config = Path(ADAPTER_CONFIG)
    keys = lora._alpha_keys({"layers.1.mlp.down_proj": 32.0, "down_proj": 8.0}, NAMES, config)
    assert keys["model.layers.1.mlp.down_proj"] == "layers.1.mlp.down_proj"
    assert keys["model.layers.2.mlp.down_proj"] == "down_proj"
    assert "model.layers.2.mlp.up_proj" not in keys
    with pytest.raises(lora.AdapterConversionError, match=r"alpha_pattern key 'q_proj\(' is not a valid regex"):
        lora._alpha_keys({"q_proj(": 32.0}, NAMES, config)
    with pytest.raises(lora.AdapterConversionError, match="alpha_pattern key .* takes too long to match"):
        lora._alpha_keys({CATASTROPHIC_KEY: 32.0}, NAMES, config)


# ---------------------------------------------------------------- config caps


def _config_with(extra_json: str) -> str:
    return json.dumps(CONFIG)[:-1] + f', "extra": {extra_json}}}'


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (_config_with("[" * 100_000 + "]" * 100_000), "levels deep"),  # past json's recursion limit
        (_config_with("[" * 40 + "]" * 40), "levels deep"),  # parses, but every reader after json recurses too
        (_config_with(json.dumps({"a": {"b": [[{"c": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}]]}})), "levels deep"),
        (_config_with(json.dumps("x" * (300 << 10))), "larger than"),
    ],
    ids=["past-the-stack", "too-deep", "too-deep-mixed", "too-large"],
)
def test_config_caps_are_judged_alike(tmp_path: Path, text: str, says: str) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / ADAPTER_CONFIG).write_text(text)
    with pytest.raises(AdapterRejected) as rejected:
        validation._read_config(adapter)
    assert rejected.value.reason == "invalid_config" and says in rejected.value.message
    with pytest.raises(lora.AdapterConversionError, match=says):
        lora._read_adapter_config(adapter)


def test_a_config_at_the_depth_cap_is_read(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / ADAPTER_CONFIG).write_text(_config_with("[" * 31 + "]" * 31))  # 32 levels with the object
    assert validation._read_config(adapter) == lora._read_adapter_config(adapter)
