"""`tuneserve train --method orpo` and `--method cpt` (issue 20, points 1 and 5) on the tiny
model, on CPU, with real torch/peft/trl/bitsandbytes: a few steps each, one torch thread.
The ORPO run is QLoRA (the default) and its adapter is published and answered by the
session's llama.cpp gateway (tests/conftest.py); the others train plain LoRA, faster on CPU."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest
from safetensors import safe_open

from tests.support.servers import DATA_DIR, MODEL
from tests.test_training import FAST, report
from training import data as D
from training.config import load_train_config
from training.cpt import cut_sequences
from training.datagen.function_calling import generate, preference_pairs, write_jsonl
from training.evaluate import load_model
from training.model import load_tokenizer
from training.orpo import build_orpo_trainer, text_row
from training.preference import load_preference_rows
from tuneserve.cli.main import main
from tuneserve.errors import ConfigError

HF_DIR = DATA_DIR / "models" / MODEL / "hf"
TENANT = "default"


@pytest.fixture(autouse=True)
def _data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESERVE_DATA_DIR", str(DATA_DIR))


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(str(HF_DIR))


def pairs(n: int) -> list[dict[str, Any]]:
    """Short pairs whose chosen answer the base does not give: both ORPO terms have room."""
    return [
        {"prompt": f"Say the code word {i}.", "chosen": f"The code word is {i * 7 % 50}.", "rejected": "I don't know."}
        for i in range(n)
    ]


# ---------------------------------------------------------------- configuration and data (no training)


def test_packing_is_on_by_default_for_cpt_only_and_orpo_needs_no_adapter(tmp_path: Path) -> None:
    def config(**keys: Any) -> Any:
        return load_train_config(None, {"output_dir": str(tmp_path / "run"), "data.train": "d.jsonl", **keys})

    assert config(method="cpt").packing_on() is True
    assert config(method="sft").packing_on() is False
    assert config(method="cpt", **{"data.packing": False}).packing_on() is False
    assert config(method="sft", **{"data.packing": True}).packing_on() is True
    orpo = config(method="orpo", **{"orpo.beta": 0.2})
    assert orpo.orpo.sft_adapter is None and orpo.orpo.beta == 0.2
    with pytest.raises(ConfigError, match="replay.path"):
        config(method="orpo", **{"replay.path": "general.jsonl"})
    config(method="cpt", **{"replay.path": "general.jsonl"})  # general text mixed into a domain: fine


def test_cpt_takes_text_lines_only_and_names_file_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus, held = tmp_path / "corpus.jsonl", tmp_path / "held.jsonl"
    write_jsonl(corpus, [
        {"text": "Rivers carry sand to the sea."},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"instruction": "Say hi.", "output": "hi"},
        {"text": ""},
    ])
    write_jsonl(held, [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}])
    out = tmp_path / "run"
    assert main(["train", "--method", "cpt", "--output_dir", str(out), "--data.train", str(corpus),
                 "--data.eval", str(held), *FAST]) == 2
    err = capsys.readouterr().err
    assert f'{corpus}:2: (line): method cpt takes {{"text"}} lines only' in err
    assert f"{corpus}:3: (line): method cpt takes" in err
    assert f"{corpus}:4: text: is empty" in err
    assert f"{held}:1: (line): method cpt takes" in err
    assert f"{corpus}:1" not in err and "4 problem(s)" in err
    assert not out.exists()


def test_cpt_sequences_keep_every_token() -> None:
    def item(where: str, n: int, start: int) -> D.Encoded:
        ids = list(range(start, start + n))
        return D.Encoded(where, ids, list(ids), False)

    items = [item("a:1", 5, 0), item("a:2", 7, 100), item("a:3", 3, 200)]
    tokens = [t for i in items for t in i.input_ids]
    packed = cut_sequences(items, 4, packing=True)
    assert [len(s.input_ids) for s in packed] == [4, 4, 4, 3]  # one stream, no padding
    assert [t for s in packed for t in s.input_ids] == tokens
    alone = cut_sequences(items, 4, packing=False)
    # Long texts are cut, not truncated; only a lone last token (it predicts nothing) goes.
    assert [(s.where, len(s.input_ids)) for s in alone] == [("a:1", 4), ("a:2", 4), ("a:2", 3), ("a:3", 3)]
    assert all(s.labels == s.input_ids for s in packed + alone)  # loss on every token


def test_orpo_rows_keep_the_tools_and_end_with_one_end_of_turn(tmp_path: Path, tokenizer: Any) -> None:
    data = tmp_path / "pairs.jsonl"
    examples = generate("train", 25)  # calls, no-fit requests and multi-step (a tool result last)
    lines = preference_pairs(examples)
    write_jsonl(data, lines)
    config = load_train_config(None, {"method": "orpo", "output_dir": str(tmp_path / "o"), "data.train": str(data),
                                      "data.eval_ratio": 0})
    rows = load_preference_rows(config, tokenizer)
    assert len(rows.train) == 25 and {e["meta"]["kind"] for e in examples} == {"call", "no_fit", "multi_step"}
    for example, line, row in zip(examples, lines, rows.train):
        text = text_row(tokenizer, row)
        # SmolLM2's template ignores `tools`: the compact format put them in the system prompt.
        assert all(f"\n- {t['function']['name']}(" in text["prompt"] for t in line["tools"])
        assert text["prompt"].endswith("<|im_start|>assistant\n")
        answers = {}
        for key in ("chosen", "rejected"):
            assert text[key].endswith(tokenizer.eos_token) and text[key].count(tokenizer.eos_token) == 1
            answers[key] = text[key].removesuffix(tokenizer.eos_token)
        if example["meta"]["kind"] == "call":  # the call sent to another tool is rejected
            assert json.loads(answers["chosen"])["name"] != json.loads(answers["rejected"])["name"]
        else:  # text is chosen over a call
            assert not answers["chosen"].startswith("{") and json.loads(answers["rejected"])["name"]


@pytest.mark.parametrize("assistant_only", [True, False])
def test_orpo_nll_follows_assistant_only_loss(tmp_path: Path, tokenizer: Any, assistant_only: bool) -> None:
    import torch

    data = tmp_path / "pairs.jsonl"
    write_jsonl(data, pairs(1))
    config = load_train_config(None, {
        "method": "orpo", "output_dir": str(tmp_path / "o"), "data.train": str(data), "data.eval_ratio": 0,
        "data.max_length": 96, "data.assistant_only_loss": assistant_only, "quantization.enabled": False,
        "optim.gradient_checkpointing": False, "run.tensorboard": False, "lora.r": 8,
    })
    trainer = build_orpo_trainer(config, str(HF_DIR), tokenizer).trainer
    batch = trainer.data_collator([trainer.train_dataset[0]])  # CPU tensors, where the model is
    with torch.no_grad():
        _, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    # logps/chosen is the answer's mean token log-probability. On the answer only, the NLL
    # is exactly its negative; TRL's own NLL also counts the system prompt and the question.
    answer_only = metrics["nll_loss"] == pytest.approx(-metrics["logps/chosen"], rel=1e-4)
    assert answer_only is assistant_only, metrics


# ---------------------------------------------------------------- ORPO runs


@pytest.fixture(scope="module")
def orpo_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, str, int]]:
    """3 QLoRA ORPO steps from the bare base (no SFT adapter, no reference), published as default/<name>."""
    tmp = tmp_path_factory.mktemp("orpo")
    data = tmp / "pairs.jsonl"
    write_jsonl(data, pairs(4))
    name = f"orpo-test-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TUNESERVE_DATA_DIR", str(DATA_DIR))
        rc = main([
            "train", "--method", "orpo", "--output_dir", str(tmp / "run"), "--data.train", str(data),
            "--quantization.enabled", "true", "--optim.max_steps", "3", "--optim.learning_rate", "3e-3",
            "--run.save_steps", "3", "--publish", f"{TENANT}/{name}", *FAST,
        ])
    yield tmp / "run", data, name, rc
    from tuneserve.adapters.registry import AdapterRegistry
    from tuneserve.config import load_settings

    registry = AdapterRegistry(load_settings(environ={"TUNESERVE_DATA_DIR": str(DATA_DIR)}))
    if registry.get(TENANT, name) is not None:
        registry.remove(TENANT, name)


def _answer_logprob(model: Any, tokenizer: Any, prompt: str, answer: str) -> float:
    """Mean log-probability of the answer's tokens after the prompt, as ORPO scores them."""
    import torch

    context = D.prompt_text(tokenizer, [{"role": "user", "content": prompt}])
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = tokenizer(context + answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    logps = logits.log_softmax(-1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    return logps[start - 1 :].mean().item()


def test_orpo_trains_a_fresh_adapter_towards_chosen_and_away_from_rejected(
    orpo_run: tuple[Path, Path, str, int], tokenizer: Any
) -> None:
    run_dir, data, _, rc = orpo_run
    assert rc == 0
    rep = report(run_dir)
    assert rep["method"] == "orpo" and rep["status"] == "completed" and rep["steps"] == 3
    assert rep["config"]["quantization"]["enabled"] and rep["config"]["orpo"]["sft_adapter"] is None
    assert len(rep["loss_curve"]) == 3 and rep["train_tokens"] > 0 and rep["tokens_per_s"]
    assert rep["data"]["train_examples"] == 4 and len(rep["data"]["sha256"]) == 64
    adapter = run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8  # the fresh adapter of --lora.r, not an SFT one
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as weights:
        assert any(weights.get_tensor(k).abs().sum() > 0 for k in weights.keys() if "lora_B" in k)  # it trained
    # Both terms of the loss: the chosen answers more likely (NLL), and more likely than the
    # rejected ones by a wider margin (odds ratio), than under the base.
    margins = {}
    for variant, path in (("base", None), ("orpo", adapter)):
        model = load_model(str(HF_DIR), path)
        scores = [(_answer_logprob(model, tokenizer, p["prompt"], p["chosen"]),
                   _answer_logprob(model, tokenizer, p["prompt"], p["rejected"])) for p in pairs(4)]
        margins[variant] = (sum(c for c, _ in scores) / 4, sum(c - r for c, r in scores) / 4)
        del model
    assert margins["orpo"][0] > margins["base"][0] + 0.5, margins
    assert margins["orpo"][1] > margins["base"][1] + 0.5, margins


def test_orpo_adapter_is_published_and_answered_by_the_running_gateway(
    orpo_run: tuple[Path, Path, str, int], client: Any
) -> None:
    run_dir, _, name, rc = orpo_run
    assert rc == 0
    published = report(run_dir)["published"]
    assert published["tenant"] == TENANT and published["name"] == name
    assert name in {m.id for m in client.models.list().data}
    answer = client.chat.completions.with_raw_response.create(
        model=name, messages=[{"role": "user", "content": "Say the code word 1."}], max_tokens=8, temperature=0
    )
    assert answer.headers["x-tuneserve-backend"] == "llamacpp"
    assert answer.parse().choices[0].message.content


def test_orpo_continues_an_sft_adapter_when_given_one(
    orpo_run: tuple[Path, Path, str, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, data, _, rc = orpo_run
    assert rc == 0
    start = run_dir / "adapter"
    out = tmp_path / "again"
    assert main([
        "train", "--method", "orpo", "--orpo.sft_adapter", str(start), "--output_dir", str(out),
        "--data.train", str(data), "--quantization.enabled", "false", "--optim.max_steps", "1",
        "--optim.learning_rate", "1e-3", "--run.save_steps", "1", *FAST, "--lora.r", "4",
    ]) == 0
    # The adapter it started from, trained on: its rank, not --lora.r's.
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), framework="pt") as tuned, \
            safe_open(str(start / "adapter_model.safetensors"), framework="pt") as before:
        assert set(tuned.keys()) == set(before.keys())
        assert any((tuned.get_tensor(k) - before.get_tensor(k)).abs().max() > 0 for k in before.keys())
    bad = tmp_path / "not-an-adapter"
    bad.mkdir()
    assert main(["train", "--method", "orpo", "--orpo.sft_adapter", str(bad), "--output_dir", str(tmp_path / "x"),
                 "--data.train", str(data), "--quantization.enabled", "false", *FAST]) == 2
    assert f"orpo.sft_adapter: {bad} is not a PEFT adapter dir" in capsys.readouterr().err


# ---------------------------------------------------------------- CPT run


def domain_text(i: int) -> dict[str, str]:
    """A made-up, repetitive domain: the base finds it surprising, a few steps teach it."""
    return {"text": f"Zorblat log {i}: the frobnitz gleeps {i * 3 % 17} wumbles at the quarn gate, and the quarn gate hums."}


def test_cpt_lowers_held_out_perplexity_of_its_domain(tmp_path: Path, tokenizer: Any) -> None:
    corpus, held = tmp_path / "corpus.jsonl", tmp_path / "held.jsonl"
    write_jsonl(corpus, [domain_text(i) for i in range(16)])
    write_jsonl(held, [domain_text(i) for i in (40, 41)])  # same domain, lines not trained on
    out = tmp_path / "cpt"
    assert main([
        "train", "--method", "cpt", "--output_dir", str(out), "--data.train", str(corpus), "--data.eval", str(held),
        "--quantization.enabled", "false", "--optim.max_steps", "4", "--optim.learning_rate", "3e-3",
        "--run.save_steps", "4", "--run.eval_steps", "4", *FAST,
    ]) == 0
    rep = report(out)
    assert rep["method"] == "cpt" and rep["status"] == "completed" and rep["steps"] == 4
    data = rep["data"]
    assert data["packing"] is True and data["train_texts"] == 16 and data["eval_texts"] == 2
    text_tokens = sum(len(tokenizer(domain_text(i)["text"], add_special_tokens=False)["input_ids"]) + 1 for i in range(16))
    assert data["tokens"] == text_tokens  # every token of every text, each with its end of sequence
    assert data["train_sequences"] == -(-text_tokens // 96) < data["train_texts"]  # packed full
    ppl = rep["held_out_perplexity"]
    assert ppl["texts"] == 2 and ppl["base"] > 1 and ppl["adapter"] > 1
    assert ppl["adapter"] < 0.5 * ppl["base"], ppl
    assert ppl["change_pct"] == pytest.approx(100 * (ppl["adapter"] / ppl["base"] - 1))
    assert rep["eval_perplexity"] is not None and rep["eval_curve"]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
