"""`tuneserve train --method galore` (full-parameter, GaLore's optimizer) and optim.optimizer,
on the tiny model on CPU with real torch/transformers/galore-torch/bitsandbytes, one thread."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors import safe_open

from tests.support.servers import DATA_DIR
from training.config import load_train_config
from training.datagen.function_calling import write_jsonl
from tuneserve.cli.main import main

BASE = DATA_DIR / "models/smollm2-135m-instruct/hf"
FAST = [
    "--data.max_length", "96", "--optim.batch_size", "2", "--optim.warmup_ratio", "0",
    "--optim.gradient_checkpointing", "false", "--run.logging_steps", "1", "--run.progress_bar", "false",
    "--run.threads", "1", "--data.eval_ratio", "0", "--run.tensorboard", "false",
]
# A constant rate: the resume below extends max_steps, and a cosine schedule would end at the old one.
GALORE = ["--method", "galore", "--galore.rank", "16", "--optim.learning_rate", "1e-4", "--optim.scheduler", "constant",
          *FAST]
RANK = 16


def short_chats(n: int) -> list[dict[str, Any]]:
    return [{"instruction": f"Say the code word {i}.", "output": f"The code word is {i * 7 % 50}."} for i in range(n)]


def report(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "training_report.json").read_text())


def weights(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        return {n: f.get_tensor(n) for n in names}


@pytest.fixture(autouse=True)
def _data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESERVE_DATA_DIR", str(DATA_DIR))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("galore-data") / "train.jsonl"
    write_jsonl(path, short_chats(6))
    return path


@pytest.fixture(scope="module")
def galore_run(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Iterator[tuple[Path, int]]:
    out = tmp_path_factory.mktemp("galore") / "run"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TUNESERVE_DATA_DIR", str(DATA_DIR))
        rc = main(["train", "--output_dir", str(out), "--data.train", str(data), "--optim.max_steps", "2",
                   "--run.save_steps", "2", *GALORE])
    yield out, rc


def test_galore_trains_every_weight_and_writes_a_whole_model(galore_run: tuple[Path, int]) -> None:
    out, rc = galore_run
    assert rc == 0
    rep = report(out)
    assert rep["method"] == "galore" and rep["status"] == "completed" and rep["steps"] == 2
    assert rep["adapter_dir"] is None and rep["model_dir"] == str(out / "model") and rep["published"] is None
    losses = [p["loss"] for p in rep["loss_curve"]]
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)
    model = out / "model"
    assert not (out / "adapter").exists() and not (model / "adapter_config.json").exists()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"):
        assert (model / name).is_file(), name
    config = json.loads((model / "config.json").read_text())
    assert config["use_cache"] is True  # off only while training

    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        trained_keys = set(f.keys())
    with safe_open(str(BASE / "model.safetensors"), framework="pt") as f:
        assert trained_keys == set(f.keys())
    # A projected layer (GaLore's low-rank states) and one with plain AdamW states (the embedding)
    # both moved; LoRA would have left every base weight as it was.
    names = ["model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight", "model.embed_tokens.weight"]
    trained, base = weights(model, names), weights(BASE, names)
    for name in names:
        assert (trained[name] - base[name]).abs().max() > 0, name


def test_galore_optimizer_states_are_low_rank(galore_run: tuple[Path, int]) -> None:
    out, rc = galore_run
    assert rc == 0
    state = torch.load(out / "checkpoints/checkpoint-2/optimizer.pt", weights_only=False)
    ranks = [group.get("rank") for group in state["param_groups"]]
    assert ranks == [None, RANK]  # the embedding and norms, then the attention and MLP projections
    projected = [s for s in state["state"].values() if "projector" in s]
    assert len(projected) == 30 * 7  # every q/k/v/o/gate/up/down of the 30 layers
    for s in projected:
        assert RANK in s["exp_avg"].shape and s["exp_avg"].numel() <= RANK * 1536
        ortho = s["projector"].ortho_matrix
        # The projection is stored compact, not as a view of the whole SVD factor.
        assert ortho.untyped_storage().nbytes() == ortho.numel() * ortho.element_size()


def test_galore_run_resumes_from_its_checkpoint(galore_run: tuple[Path, int], data: Path) -> None:
    out, rc = galore_run
    assert rc == 0
    before = weights(out / "model", ["model.layers.3.self_attn.q_proj.weight"])
    # The checkpoint's optimizer.pt holds GaLore's projector objects, which the Trainer's
    # weights_only load refuses unless they are allow-listed.
    assert main(["train", "--output_dir", str(out), "--data.train", str(data), "--optim.max_steps", "3",
                 "--run.save_steps", "2", "--resume", *GALORE]) == 0
    rep = report(out)
    assert rep["status"] == "completed" and rep["steps"] == 3 and rep["resumed_at_step"] == 2
    assert [p["step"] for p in rep["loss_curve"]] == [1, 2, 3]  # the checkpoint's history, then step 3
    after = weights(out / "model", list(before))
    assert all((after[n] - before[n]).abs().max() > 0 for n in before)


def test_galore_refuses_publish_and_adapter_only_settings(tmp_path: Path, data: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    common = ["train", "--output_dir", str(out), "--data.train", str(data), *GALORE]
    assert main([*common, "--publish", "default/full"]) == 2
    err = capsys.readouterr().err
    assert "publish: method galore trains the whole model, not an adapter" in err
    assert f"tuneserve serve --model.hf_path {out / 'model'}" in err and "tuneserve export" in err
    assert main([*common, "--quantization.enabled", "true"]) == 2
    assert "quantization.enabled: method galore trains every weight" in capsys.readouterr().err
    assert main([*common, "--optim.optimizer", "adamw_8bit"]) == 2
    assert "optim.optimizer: method galore uses its own optimizer; set galore.optimizer" in capsys.readouterr().err
    assert main([*common, "--galore.target_modules", "no_such_layer"]) == 2
    assert "galore.target_modules: 'no_such_layer' matches no linear layer" in capsys.readouterr().err
    assert not (out / "model").exists() and not (out / "checkpoints").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for hosts without CUDA")
def test_cuda_only_optimizers_are_refused_on_cpu(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    common = ["train", "--output_dir", str(out), "--data.train", str(data), *FAST]
    # Valid config (a GPU host runs it); refused when the run starts on this host, before loading.
    assert load_train_config(None, {"output_dir": str(out), "data.train": [str(data)],
                                    "optim.optimizer": "paged_adamw_8bit"}).optim.optimizer == "paged_adamw_8bit"
    for paged, unpaged in (("paged_adamw_8bit", "adamw_8bit"), ("paged_adamw_32bit", "adamw_torch"),
                           ("paged_lion_8bit", "lion_8bit")):
        assert main([*common, "--optim.optimizer", paged]) == 2
        err = capsys.readouterr().err
        assert f"optim.optimizer: {paged} is a paged optimizer, which needs CUDA" in err, err
        assert f"on CPU use {unpaged}" in err
    assert main([*common, "--method", "galore", "--galore.optimizer", "adamw_8bit"]) == 2
    assert "galore.optimizer: adamw_8bit (galore_adamw_8bit) needs CUDA" in capsys.readouterr().err
    assert not out.exists()


def test_8bit_optimizer_trains_on_cpu(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--output_dir", str(out), "--data.train", str(data), "--optim.optimizer", "adamw_8bit",
                 "--quantization.enabled", "false", "--lora.r", "4", "--optim.max_steps", "1",
                 "--run.save_steps", "1", *FAST]) == 0
    assert report(out)["config"]["optim"]["optimizer"] == "adamw_8bit"
    state = torch.load(out / "checkpoints/checkpoint-1/optimizer.pt", weights_only=False)["state"]
    # bitsandbytes' 8-bit moments, not torch's float32 ones (it keeps tensors under 4096 values in 32 bits).
    moments = [s.get("__bnb_optimizer_quant_state__", s)["state1"] for s in state.values()]
    large = [m for m in moments if m.numel() >= 4096]
    assert large and all(m.dtype == torch.uint8 for m in large)


def test_eval_scores_the_whole_model_galore_wrote_beside_the_base(
    galore_run: tuple[Path, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, rc = galore_run
    assert rc == 0
    general = tmp_path / "general.jsonl"
    write_jsonl(general, [{"text": f"The code word is {i * 7 % 50}. It opens the door number {i}."} for i in range(4)])
    result = tmp_path / "eval.json"
    assert main(["eval", "--general", str(general), "--full-model", f"galore={out / 'model'}",
                 "--output", str(result), "--threads", "1"]) == 0
    models = json.loads(result.read_text())["models"]
    assert list(models) == ["base", "galore"]
    assert models["galore"]["model"] == str(out / "model") and models["galore"]["adapter"] is None
    # Two steps on "code word" lines moved the weights: the trained model scores that text better.
    assert models["galore"]["general_perplexity"] < models["base"]["general_perplexity"]
    assert models["galore"]["perplexity_change_pct"] < 0
    assert "galore" in capsys.readouterr().out


def test_eval_full_model_flag_is_checked(galore_run: tuple[Path, int], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = galore_run
    general = tmp_path / "general.jsonl"
    write_jsonl(general, [{"text": "hello"}])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    for spec, message in (
        (f"x={tmp_path}", f"--full-model x={tmp_path}: {tmp_path} is not a model dir (no config.json)"),
        (f"x={adapter}", "(an adapter: use --adapter)"),
        (f"base={out / 'model'}", "the name 'base' is taken"),
    ):
        assert main(["eval", "--general", str(general), "--full-model", spec]) != 0
        assert message in capsys.readouterr().err
    assert main(["eval", "--general", str(general), "--adapter", f"m={adapter}", "--full-model", f"m={out / 'model'}"]) != 0
    assert "the name 'm' is taken" in capsys.readouterr().err
