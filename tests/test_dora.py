"""DoRA adapters (PEFT's use_dora): served merged into their base, refused as adapters.

A real DoRA adapter of the tiny model, its magnitude vectors moved off their initial
values as training moves them: `tuneserve merge` (operation merge_adapter) folds it
into a full model with the DoRA model's logits, mergekit's BASE+ADAPTER folds it the
same way, and the merged model exports through the quality gate. Everything that would
hand it to an engine as an adapter (training's publish, the registry and its upload
API, GGUF LoRA export, adapter combination) refuses it, naming DoRA and the merge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.adapters import HF_DIR, tar_gz_bytes
from tests.support.merges import GGUF, cli, job_of, write_yaml
from tests.support.servers import DATA_DIR, MODEL, ServerProcess, gateway
from tuneserve.adapters.registry import AdapterRegistry
from tuneserve.adapters.validation import AdapterRejected
from tuneserve.cli.main import main
from tuneserve.config import load_settings

PROBE = "What is the capital of France?"
MAGNITUDE = "lora_magnitude_vector"
ADVICE = "DoRA adapters cannot be served as adapters: merge it into its base with `tuneserve merge"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dora")


def _base() -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(HF_DIR, dtype=torch.float32)


@pytest.fixture(scope="module")
def dora_adapter(work: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False
    )
    model = get_peft_model(_base(), config)
    # PEFT starts each magnitude at ||W + s*BA||, where DoRA equals plain LoRA; moved
    # off it, a merge that dropped the magnitudes answers differently.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if MAGNITUDE in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
    out = work / "dora"
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def merged(work: Path, dora_adapter: Path) -> Path:
    config = write_yaml(work / "merge.yaml", {"operation": "merge_adapter", "base": str(HF_DIR), "adapter": str(dora_adapter)})
    out = work / "merged"
    job = job_of(cli("merge", str(config), "--out", str(out), data_dir=work / "data"))
    assert job["status"] == "succeeded" and job["outputs"] == [str(out)]
    return out


def _as_plain_lora(adapter: Path, out: Path) -> Path:
    """The same A and B without the magnitudes: what an engine adding only B(Ax) serves."""
    shutil.copytree(adapter, out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    weights = load_file(out / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if MAGNITUDE not in k}, out / "adapter_model.safetensors")
    return out


def _logits(model: Any) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(HF_DIR)
    ids: Any = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROBE}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        return model.eval()(**ids).logits[0]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


# ---------------------------------------------------------------- merged: served


def test_merged_model_has_the_dora_models_logits(dora_adapter: Path, merged: Path, work: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dora = _logits(PeftModel.from_pretrained(_base(), dora_adapter))
    full = _logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32))
    torch.testing.assert_close(full, dora, rtol=1e-4, atol=1e-3)
    # The magnitudes matter, so the equality above says they were applied.
    plain = _logits(PeftModel.from_pretrained(_base(), _as_plain_lora(dora_adapter, work / "plain")))
    assert (plain - dora).abs().max() > 0.5
    assert not (merged / "adapter_config.json").exists()  # a full model, not an adapter


def test_mergekit_base_plus_adapter_folds_dora_the_same_way(dora_adapter: Path, merged: Path, work: Path) -> None:
    """A mergekit config may name BASE+ADAPTER; mergekit folds that in first (as
    run_mergekit configures it: a LoRA cache, no lora_merge_dtype). It must apply the
    magnitudes too, or a DoRA adapter in a mergekit merge would silently be plain LoRA."""
    from mergekit.common import ModelReference

    folded = ModelReference.parse(f"{HF_DIR}+{dora_adapter}").merged(cache_dir=str(work / "lora-cache"))
    theirs, ours, base = _weights(Path(folded.model.path)), _weights(merged), _weights(HF_DIR)
    adapted = [k for k in ours if k.endswith(("q_proj.weight", "v_proj.weight"))]
    assert len(adapted) == 2 * 30
    for key in adapted:
        torch.testing.assert_close(theirs[key], ours[key], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[adapted[0]], base[adapted[0]])


def test_merged_model_exports_through_the_quality_gate(merged: Path, work: Path) -> None:
    prompts = work / "gate-prompts.txt"  # two of the gate's eight: the check stays cheap
    prompts.write_text("What is the capital of France?\nName three primary colors.\n")
    out = work / "merged-f16.gguf"
    job = job_of(cli("export", str(merged), "--out", str(out), "--type", "f16", "--gate-prompts", str(prompts),
                     data_dir=work / "data"))
    assert job["status"] == "succeeded" and job["outputs"] == [str(out)] and out.is_file()
    gate = job["report"]["gate"]
    assert gate["passed"] and gate["prompts"] == 2 and gate["perplexity_ratio"] <= 1.05


# ---------------------------------------------------------------- as an adapter: refused


def _train_data(tmp_path: Path) -> Path:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    return data


def test_training_publish_refuses_dora(
    tmp_path: Path, dora_adapter: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.config import load_train_config

    monkeypatch.setenv("TUNESERVE_DATA_DIR", str(tmp_path / "data"))
    data, out = _train_data(tmp_path), tmp_path / "run"
    common = ["--output_dir", str(out), "--data.train", str(data), "--publish", "acme/dora"]
    assert main(["train", *common, "--lora.use_dora", "true"]) == 2
    err = capsys.readouterr().err
    assert "publish: lora.use_dora trains a DoRA adapter" in err and ADVICE in err
    assert f"adapter: {out / 'adapter'}" in err and "operation: merge_adapter" in err
    # DPO continues its SFT adapter: from a DoRA one it trains DoRA, whatever lora.use_dora says.
    assert main(["train", *common, "--method", "dpo", "--dpo.sft_adapter", str(dora_adapter)]) == 2
    err = capsys.readouterr().err
    assert f"publish: dpo.sft_adapter {dora_adapter} is a DoRA adapter" in err and ADVICE in err
    assert not out.exists()  # refused before anything trained
    # Without publish, DoRA trains; and publishing plain LoRA or rsLoRA stays allowed.
    assert load_train_config(None, {"output_dir": out, "data.train": data, "lora.use_dora": True}).lora.use_dora
    load_train_config(None, {"output_dir": out, "data.train": data, "publish": "acme/x", "lora.use_rslora": True})


def _registry(data_dir: Path) -> AdapterRegistry:
    return AdapterRegistry(load_settings(overrides={"data_dir": str(data_dir), "model.hf_path": str(HF_DIR)}, environ={}))


def test_registry_refuses_dora_naming_the_merge(dora_adapter: Path, tmp_path: Path) -> None:
    registry = _registry(tmp_path / "data")
    with pytest.raises(AdapterRejected) as refused:
        registry.add("acme", "dora", dora_adapter)
    assert refused.value.reason == "dora_not_servable"
    assert "use_dora true" in refused.value.message and ADVICE in refused.value.message
    assert "operation: merge_adapter" in refused.value.message
    # A config that hides it: the magnitude tensors still give it away.
    hidden = tmp_path / "hidden"
    shutil.copytree(dora_adapter, hidden)
    config = json.loads((hidden / "adapter_config.json").read_text())
    (hidden / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(AdapterRejected) as refused:
        registry.add("acme", "dora", hidden)
    assert refused.value.reason == "dora_not_servable" and MAGNITUDE in refused.value.message
    assert ADVICE in refused.value.message
    assert registry.get("acme", "dora") is None


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    data_dir = tmp_path_factory.mktemp("dora-gw")
    model_dir = DATA_DIR / "models" / MODEL
    server = gateway(
        "gw-dora",
        {"data_dir": data_dir, "model.hf_path": model_dir / "hf", "model.gguf_path": model_dir / "model.gguf"},
        env={"TUNESERVE_DATA_DIR": str(data_dir)},
    ).start()
    try:
        yield server, data_dir
    finally:
        server.stop()


def test_upload_api_answers_400_naming_dora_and_the_merge(gw: tuple[ServerProcess, Path], dora_adapter: Path) -> None:
    server, data_dir = gw
    answer = httpx.post(
        server.base_url + "/v1/adapters",
        data={"name": "dora"},
        files={"file": ("adapter.tar.gz", tar_gz_bytes(dora_adapter), "application/gzip")},
        timeout=120,
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "dora_not_servable" and error["param"] == "file"
    assert ADVICE in error["message"] and "operation: merge_adapter" in error["message"]
    assert str(data_dir) not in error["message"] and str(HF_DIR) not in error["message"]
    listed = httpx.get(server.base_url + "/v1/adapters", timeout=30).json()["data"]
    assert not [a for a in listed if "dora" in a["id"]]


def test_gguf_lora_export_refuses_dora(dora_adapter: Path, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = work / "dora.gguf"
    argv = ["export", str(dora_adapter), "--out", str(out), "--data_dir", str(work / "data"),
            "--model.hf_path", str(HF_DIR), "--model.gguf_path", str(GGUF)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"source: {dora_adapter.resolve()} is a DoRA adapter" in err and ADVICE in err
    assert f"adapter: {dora_adapter.resolve()}" in err and not out.exists()


def test_combining_dora_adapters_is_refused(dora_adapter: Path, work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """PEFT's add_weighted_adapter re-initialises DoRA magnitudes (weights [1, 0] do not
    give the adapter back), so the result could be neither right nor published."""
    config = write_yaml(work / "combine.yaml", {
        "operation": "combine_adapters", "base": str(HF_DIR), "combination": "linear",
        "adapters": [{"path": str(dora_adapter), "weight": 1.0}, {"path": str(dora_adapter), "weight": 0.0}],
        "publish": {"tenant": "acme", "name": "mix"},
    })
    out = work / "combined"
    assert main(["merge", str(config), "--out", str(out), "--data_dir", str(work / "data")]) == 2
    err = capsys.readouterr().err
    assert f"adapters[0].path: {dora_adapter} is a DoRA adapter" in err and ADVICE in err
    assert "BASE+ADAPTER" in err and not out.exists()
