"""`tuneserve merge`: mergekit merges (linear, ties with a base+adapter reference),
adapter into base, adapter combinations, and up-front config validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.support.adapters import HF_DIR
from tests.support.merges import adapters, cli, full_models, job_of, merge_work, write_yaml  # noqa: F401

PROBE = "What is the capital of France?"
TENSOR = "model.layers.3.mlp.down_proj.weight"


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _greedy(model, tokenizer, prompt: str = PROBE, tokens: int = 16) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_adapter_merged_into_base_answers_like_base_plus_adapter(full_models, adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(HF_DIR)
    base = AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32).eval()
    base_text = _greedy(base, tokenizer)
    with_adapter = _greedy(PeftModel.from_pretrained(base, adapters[0]).eval(), tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(full_models[0], dtype=torch.float32).eval()
    assert _greedy(merged, tokenizer) == with_adapter
    assert with_adapter != base_text  # the adapter matters, so the equality means something
    # The merged dir is servable on its own: tokenizer and chat template came along.
    assert AutoTokenizer.from_pretrained(full_models[0]).chat_template == tokenizer.chat_template


def test_linear_merge_averages_weights(full_models, merge_work):
    config = write_yaml(merge_work / "linear.yaml", {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [
            {"model": str(full_models[0]), "parameters": {"weight": 0.75}},
            {"model": str(full_models[1]), "parameters": {"weight": 0.25}},
        ],
    })
    out = merge_work / "linear"
    job = job_of(cli("merge", str(config), "--out", str(out), "--shard-size", "100M", data_dir=merge_work / "data"))
    assert job["status"] == "succeeded" and job["outputs"] == [str(out)] and job["progress"] == 1.0
    # 100M shards: the 540 MB float32 model is written in several files (bounded writes).
    assert len(list(out.glob("*.safetensors"))) > 1
    merged, a, b = _weights(out)[TENSOR], _weights(full_models[0])[TENSOR], _weights(full_models[1])[TENSOR]
    torch.testing.assert_close(merged, 0.75 * a + 0.25 * b, rtol=1e-5, atol=1e-6)
    assert not list(merge_work.glob(".linear.tmp-*"))  # the staging dir is gone


def test_ties_merge_with_base_plus_adapter_reference(full_models, adapters, merge_work):
    config = write_yaml(merge_work / "ties.yaml", {
        "merge_method": "ties",
        "dtype": "float32",
        "base_model": str(HF_DIR),
        "models": [
            # A LoRA reference: mergekit merges it into the base on the fly (LoRA cache).
            {"model": f"{HF_DIR}+{adapters[0]}", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(full_models[1]), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
    })
    out = merge_work / "ties"
    job = job_of(cli("merge", str(config), "--out", str(out), data_dir=merge_work / "data"))
    assert job["status"] == "succeeded"
    merged, base = _weights(out)[TENSOR], _weights(HF_DIR)[TENSOR]
    delta_a = _weights(full_models[0])[TENSOR] - base  # == adapter 1's delta
    delta_b = _weights(full_models[1])[TENSOR] - base
    delta = merged - base
    # TIES keeps the top half of each delta by magnitude, elects a sign per entry and
    # averages the agreeing entries: where both inputs were trimmed away, nothing changes;
    # where only one survives with the elected sign, the result is that input's delta.
    keep_a = delta_a.abs() >= delta_a.abs().flatten().kthvalue(delta_a.numel() // 2).values
    keep_b = delta_b.abs() >= delta_b.abs().flatten().kthvalue(delta_b.numel() // 2).values
    neither = ~keep_a & ~keep_b
    assert delta[neither].abs().max() < 1e-6
    only_a = keep_a & ~keep_b
    # (entries exactly at the trim threshold may fall either way)
    matches = torch.isclose(delta[only_a], delta_a[only_a], rtol=1e-4, atol=1e-5)
    assert matches.float().mean() > 0.999
    assert (delta[keep_a & keep_b] != 0).any()


def _combine(merge_work: Path, name: str, **op) -> Path:
    config = write_yaml(merge_work / f"{name}.yaml", {
        "operation": "combine_adapters", "base": str(HF_DIR), **op,
    })
    out = merge_work / name
    job = job_of(cli("merge", str(config), "--out", str(out), data_dir=merge_work / "data"))
    assert job["status"] == "succeeded"
    return out


def _deltas(adapter_dir: Path) -> dict[str, torch.Tensor]:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    return {
        key.replace(".lora_A.weight", ""): scale * weights[key.replace("lora_A", "lora_B")] @ weights[key]
        for key in weights if key.endswith("lora_A.weight")
    }


def test_linear_combination_of_adapters(adapters, merge_work):
    out = _combine(merge_work, "combo-linear", combination="linear",
                   adapters=[{"path": str(adapters[0]), "weight": 1.0}, {"path": str(adapters[1]), "weight": 0.0}])
    # PEFT's linear combination scales A and B by sqrt(weight): weights 1 and 0 give back
    # adapter 1's update exactly.
    combined, first = _deltas(out), _deltas(adapters[0])
    assert combined.keys() == first.keys()
    for key in list(first)[:20]:
        torch.testing.assert_close(combined[key], first[key], rtol=1e-4, atol=1e-6)


def test_ties_combination_published_to_a_tenant(adapters, merge_work):
    data_dir = merge_work / "data"
    out = _combine(merge_work, "combo-ties", combination="ties", density=0.5,
                   adapters=[{"path": str(a), "weight": 1.0} for a in adapters],
                   publish={"tenant": "acme", "name": "mix"})
    listed = json.loads(cli("adapters", "list", "acme", data_dir=data_dir).stdout)
    assert [(r["name"], r["version"]) for r in listed] == [("mix", 1)]
    assert Path(listed[0]["gguf_path"]).is_file()  # converted for llama.cpp like any upload
    combined, first, second = _deltas(out), _deltas(adapters[0]), _deltas(adapters[1])
    key = next(iter(first))
    assert not torch.allclose(combined[key], first[key]) and not torch.allclose(combined[key], second[key])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c, m: c.update(merge_method="averaging"), "key 'merge_method': unknown method 'averaging'"),
        (lambda c, m: c["models"][1].update(model=str(m / "nope")), "models[1].model: model " ),
        (lambda c, m: c["models"][0]["parameters"].update(weight="heavy"), "models[0].parameters.weight: weight must be a finite number"),
        (lambda c, m: c["models"][1]["parameters"].pop("weight"), "models[1].parameters.weight: required by merge_method linear"),
        (lambda c, m: c["models"][0]["parameters"].update(densty=0.5), "models[0].parameters.densty: unknown parameter"),
        (lambda c, m: c.update(base_model=str(HF_DIR), merge_method="ties", parameters={"density": 1.5}), "parameters.density: density must be in (0, 1]"),
        (lambda c, m: c.update(merge_method="slerp", parameters={"t": 0.5}), "base"),
        (lambda c, m: c.update(bogus=1), "unknown key 'bogus'"),
    ],
    ids=["method", "missing-model", "bad-weight", "missing-weight", "unknown-param", "density", "slerp-needs-base", "unknown-key"],
)
def test_invalid_configs_are_rejected_before_loading(change, message, merge_work, capsys):
    from tuneserve.cli.main import main

    twin = merge_work / "base-twin"  # a second, distinct input without copying weights
    if not twin.exists():
        twin.symlink_to(HF_DIR)
    config = {
        "merge_method": "linear",
        "models": [
            {"model": str(HF_DIR), "parameters": {"weight": 0.5}},
            {"model": str(twin), "parameters": {"weight": 0.5}},
        ],
    }
    change(config, merge_work)
    path = write_yaml(merge_work / "bad.yaml", config)
    out = merge_work / "never"
    assert main(["merge", str(path), "--out", str(out), "--data_dir", str(merge_work / "data")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("tuneserve merge: error: ")
    assert not out.exists()


def test_mismatched_architectures_name_the_model(merge_work, capsys):
    from tuneserve.cli.main import main

    other = merge_work / "other-arch"
    other.mkdir(exist_ok=True)
    config = json.loads((HF_DIR / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 12}))
    path = write_yaml(merge_work / "arch.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(HF_DIR), "parameters": {"weight": 1}}, {"model": str(other), "parameters": {"weight": 1}}],
    })
    assert main(["merge", str(path), "--out", str(merge_work / "never"), "--data_dir", str(merge_work / "data")]) == 2
    err = capsys.readouterr().err
    assert "models[1].model:" in err and "num_hidden_layers=12" in err


def test_bad_adapter_operation_names_the_key(merge_work, adapters, capsys):
    from tuneserve.cli.main import main

    path = write_yaml(merge_work / "bad-op.yaml", {
        "operation": "combine_adapters", "base": str(HF_DIR), "combination": "ties",
        "adapters": [{"path": str(adapters[0])}, {"path": str(merge_work / "missing")}],
    })
    assert main(["merge", str(path), "--out", str(merge_work / "never"), "--data_dir", str(merge_work / "data")]) == 2
    err = capsys.readouterr().err
    assert "adapters[1].path:" in err or "density: required" in err
