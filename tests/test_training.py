"""`tuneserve train` and `tuneserve eval` on the tiny model, on CPU, with real torch/peft/trl/bitsandbytes.

Runs are a few steps on short examples, one torch thread (the CPU is shared with
the servers other tests start)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator, get_args

import pytest
from safetensors import safe_open

from tests.support.servers import DATA_DIR, ROOT
from training.config import TrainConfig
from training.data import DataError
from training.datagen.function_calling import TOOLS, generate, split_templates, write_jsonl
from training.evaluate import CallCase, load_call_cases, parse_answers, score_calls
from training.report import TrainingReport
from training.run import METHODS
from training.sft import mix_replay
from tuneserve.cli.main import main
from tuneserve.tool_calls.formats import COMPACT
from tuneserve.tool_calls.spec import ToolSpec

FAST = [
    "--data.max_length", "96", "--optim.batch_size", "2", "--optim.warmup_ratio", "0",
    "--optim.gradient_checkpointing", "false", "--run.logging_steps", "1", "--run.progress_bar", "false",
    "--run.threads", "1", "--data.eval_ratio", "0", "--lora.r", "8", "--lora.alpha", "16",
]


def short_chats(n: int) -> list[dict[str, Any]]:
    """Short alpaca lines: cheap steps on CPU, and a loss that falls within a few of them."""
    return [{"instruction": f"Say the code word {i}.", "output": f"The code word is {i * 7 % 50}."} for i in range(n)]


def train(args: list[str]) -> int:
    return main(["train", *args])


def report(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "training_report.json").read_text())


@pytest.fixture(autouse=True)
def _data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESERVE_DATA_DIR", str(DATA_DIR))


# ---------------------------------------------------------------- validation (no model)


def test_validation_errors_name_file_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        "{not json\n"
        '{"messages": [{"role": "bot", "content": "hi"}]}\n'
        "\n"
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}\n'
        '{"messages": [{"role": "user", "content": "only a question"}]}\n'
        '{"instruction": "x", "output": ""}\n'
        '{"messages": [{"role": "user", "content": "' + "word " * 200 + '"}, {"role": "assistant", "content": "ok"}]}\n'
    )
    out = tmp_path / "run"
    assert train(["--output_dir", str(out), "--data.train", str(bad), "--data.max_length", "64"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: (line): bad JSON" in err
    assert f"{bad}:3: messages[0].role: unknown role 'bot'" in err
    assert f"{bad}:5: messages[1].content: empty assistant turn" in err
    assert f"{bad}:6: messages: no assistant turn: no trainable tokens" in err
    assert f"{bad}:7: output: empty assistant turn" in err
    assert f"{bad}:8: messages: no trainable tokens within data.max_length=64" in err
    assert f"{bad}:1" not in err and "6 problem(s)" in err
    assert not out.exists()  # nothing trained, nothing written


def test_config_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.jsonl"
    write_jsonl(data, short_chats(2))
    config = tmp_path / "train.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\ndata: {{train: {data}}}\nlora: {{r: 0}}\n")
    assert train([str(config)]) == 2
    assert "key 'lora.r'" in capsys.readouterr().err
    assert train([str(config), "--lora.r", "4", "--optim.scheduler", "zigzag"]) == 2
    assert "key 'optim.scheduler'" in capsys.readouterr().err
    assert train([str(config), "--lora.r", "4", "--resume"]) == 2
    assert "resume: no checkpoint" in capsys.readouterr().err
    assert train([str(config), "--lora.r", "4", "--publish", "no-slash"]) == 2
    assert "key 'publish'" in capsys.readouterr().err


def test_function_calling_generator_splits_by_template(tmp_path: Path) -> None:
    assert len(TOOLS) >= 10
    for tool in TOOLS:
        train_t, test_t = split_templates(tool, "train"), split_templates(tool, "test")
        assert not {t.text for t in train_t} & {t.text for t in test_t}
        assert {t.lang for t in train_t} == {t.lang for t in test_t} == {"en", "ko"}
        types = {p["type"] for p in tool.properties.values()}
        assert types <= {"string", "integer", "number", "boolean"}
    assert {"integer", "number", "boolean"} <= {p["type"] for t in TOOLS for p in t.properties.values()}
    train_rows, test_rows = generate("train", 60), generate("test", 30)
    assert not {r["meta"]["template"] for r in train_rows} & {r["meta"]["template"] for r in test_rows}
    write_jsonl(tmp_path / "test.jsonl", test_rows)
    cases = load_call_cases(tmp_path / "test.jsonl")
    assert len(cases) == 30
    assert all(c.name is None or c.name in {t["function"]["name"] for t in tc} for c, tc in zip(cases, (r["tools"] for r in test_rows)))


def test_replay_makes_up_the_ratio_and_warns_when_its_pool_would_repeat(caplog: pytest.LogCaptureFixture) -> None:
    task, pool = [f"task{i}" for i in range(80)], [f"general{i}" for i in range(50)]
    mixed = mix_replay(task, pool, 0.2, seed=0)
    replayed = mixed[len(task):]
    assert mixed[: len(task)] == task and len(replayed) == 20 and len(set(replayed)) == 20
    assert not [r for r in caplog.records if "replay" in r.getMessage()]
    small = mix_replay(task, pool[:5], 0.2, seed=0)
    assert len(small) - len(task) == 20 and set(small[len(task):]) <= set(pool[:5])
    warning = next(r.getMessage() for r in caplog.records if "replay.ratio" in r.getMessage())
    assert "needs 20 replay examples but replay.path has 5" in warning and "4.0 times" in warning


def test_every_configurable_method_has_a_builder() -> None:
    assert set(METHODS) == set(get_args(TrainConfig.model_fields["method"].annotation))


def test_call_scoring() -> None:
    tools = [ToolSpec(t.name, t.description, t.spec()["function"]["parameters"]) for t in TOOLS]
    cases = [
        CallCase("a:1", [], tools, "get_weather", {"city": "Seoul"}),
        CallCase("a:2", [], tools, "set_alarm", {"time": "07:30", "label": "gym"}),
        CallCase("a:3", [], tools, "get_stock_price", {"symbol": "AAPL"}),
    ]
    answers = [
        '{"name": "get_weather", "arguments": {"city": "Seoul"}}',
        '{"name": "set_alarm", "arguments": {"time": "07:30", "label": "run"}}',
        "The price of AAPL is high.",
    ]
    scores = score_calls(cases, parse_answers(COMPACT, cases, answers))
    assert scores["json_validity"] == pytest.approx(2 / 3)
    assert scores["tool_name_accuracy"] == pytest.approx(2 / 3)
    assert scores["argument_accuracy"] == pytest.approx(2 / 4)
    assert scores["exact_call_accuracy"] == pytest.approx(1 / 3)
    assert scores["no_call_accuracy"] is None  # no case wants text
    assert "by_language" not in scores and "by_kind" not in scores  # nothing to group by


def test_call_scoring_by_language(tmp_path: Path) -> None:
    examples = generate("test", 12)
    examples[0]["meta"] = {"lang": ""}
    write_jsonl(tmp_path / "bad.jsonl", examples[:1])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: meta\.lang"):
        load_call_cases(tmp_path / "bad.jsonl")
    write_jsonl(tmp_path / "fc.jsonl", generate("test", 12, multi_step=0, no_fit=0))
    cases = load_call_cases(tmp_path / "fc.jsonl")
    langs = {case.lang for case in cases}
    assert langs == {"en", "ko"}
    # Right on every English request, wrong on every Korean one (a tool nobody offered:
    # text, as the gateway would send it back).
    answers = [json.dumps({"name": c.name if c.lang == "en" else "nope", "arguments": c.arguments}) for c in cases]
    scores = score_calls(cases, parse_answers(COMPACT, cases, answers))
    english = sum(c.lang == "en" for c in cases)
    assert scores["tool_name_accuracy"] == pytest.approx(english / len(cases))
    by_language = scores["by_language"]
    assert by_language["en"]["tool_name_accuracy"] == 1 and by_language["ko"]["tool_name_accuracy"] == 0
    assert by_language["en"]["examples"] + by_language["ko"]["examples"] == len(cases)
    assert by_language["en"]["json_validity"] == 1 and by_language["ko"]["json_validity"] == 0
    assert all("by_language" not in s for s in by_language.values())


# ---------------------------------------------------------------- training runs


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, int]]:
    """A short QLoRA run, published as default/<name> in the test data dir."""
    tmp = tmp_path_factory.mktemp("qlora")
    data = tmp / "train.jsonl"
    write_jsonl(data, short_chats(4))
    name = f"train-test-{uuid.uuid4().hex[:8]}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TUNESERVE_DATA_DIR", str(DATA_DIR))
        rc = main([
            "train", "--output_dir", str(tmp / "run"), "--data.train", str(data), "--quantization.enabled", "true",
            "--optim.max_steps", "5", "--optim.learning_rate", "3e-3", "--run.save_steps", "5",
            "--publish", f"default/{name}", *FAST,
        ])
    yield tmp / "run", name, rc
    from tuneserve.adapters.registry import AdapterRegistry
    from tuneserve.config import load_settings

    registry = AdapterRegistry(load_settings(environ={"TUNESERVE_DATA_DIR": str(DATA_DIR)}))
    if registry.get("default", name) is not None:
        registry.remove("default", name)


def test_qlora_run_lowers_loss_and_writes_a_peft_adapter(qlora_run: tuple[Path, str, int]) -> None:
    run_dir, _, rc = qlora_run
    assert rc == 0
    rep = report(run_dir)
    assert rep["status"] == "completed" and rep["steps"] == 5
    assert TrainingReport.model_validate(rep).model_dump(mode="json") == rep  # the file is the model
    cfg = rep["config"]["quantization"]
    assert cfg["enabled"] and cfg["quant_type"] == "nf4" and cfg["double_quant"] and cfg["compute_dtype"] == "bfloat16"
    losses = [p["loss"] for p in rep["loss_curve"]]
    assert len(losses) == 5 and losses[-1] < 0.7 * losses[0], losses
    for key in ("base_model", "wall_time_s", "tokens_per_s", "peak_rss_bytes", "loss_curve"):
        assert rep[key], key
    assert len(rep["data"]["sha256"]) == 64 and rep["data"]["train_examples"] == 4
    adapter = run_dir / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert Path(config["base_model_name_or_path"]) == (DATA_DIR / "models/smollm2-135m-instruct/hf").resolve()
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as weights:
        keys = list(weights.keys())
        assert any(".q_proj.lora_B" in k for k in keys) and any(".down_proj.lora_A" in k for k in keys)
        assert any(weights.get_tensor(k).abs().sum() > 0 for k in keys if "lora_B" in k)  # it trained
    assert (run_dir / "tensorboard").is_dir() and any((run_dir / "tensorboard").iterdir())
    assert (run_dir / "checkpoints" / "checkpoint-5").is_dir()


def test_published_adapter_is_answered_by_the_running_gateway(qlora_run: tuple[Path, str, int], client: Any) -> None:
    run_dir, name, rc = qlora_run
    assert rc == 0
    published = report(run_dir)["published"]
    assert published["tenant"] == "default" and published["name"] == name
    models = {m.id for m in client.models.list().data}
    assert name in models
    answer = client.chat.completions.with_raw_response.create(
        model=name, messages=[{"role": "user", "content": "Say the code word 1."}], max_tokens=8, temperature=0
    )
    assert answer.headers["x-tuneserve-backend"] == "llamacpp"
    assert answer.parse().choices[0].message.content


def _train_process(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tuneserve.cli.main", "train", *args],
        cwd=ROOT, env={**os.environ, "TUNESERVE_DATA_DIR": str(DATA_DIR)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


# Threaded CPU reductions differ run to run; at lr 1e-3 that drift reaches ~2.5% by step 8
# (measured in CI), still far below the 1.5x that tells one batch from another.
LOSS_NOISE = 5e-2


def test_ctrl_c_leaves_a_checkpoint_and_resume_continues_steps_and_data_order(tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    # Answers of very different difficulty: a batch's loss tells which examples it holds,
    # so a resume that replayed or skipped the wrong batches would show.
    rows = short_chats(8)
    for i, row in enumerate(rows):
        if i % 2:
            row["output"] = " ".join(str((i * 37 + k * 11) % 97) for k in range(12))
    write_jsonl(data, rows)
    common = [
        "--data.train", str(data), "--quantization.enabled", "false", "--optim.max_steps", "8",
        "--optim.learning_rate", "1e-3", "--lora.dropout", "0", "--run.save_steps", "2", *FAST,
    ]
    reference = tmp_path / "reference"
    assert main(["train", "--output_dir", str(reference), *common]) == 0
    expected = {p["step"]: p["loss"] for p in report(reference)["loss_curve"]}

    run_dir = tmp_path / "run"
    proc = _train_process(["--output_dir", str(run_dir), *common])
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "tuneserve.train: step 3/8" in line:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            break
    lines += proc.stdout.readlines()
    assert proc.wait(timeout=300) == 130, "".join(lines)[-3000:]
    stopped = report(run_dir)
    assert stopped["status"] == "interrupted" and 3 <= stopped["steps"] < 8
    for point in stopped["loss_curve"]:  # the same run up to the stop, in another process
        assert point["loss"] == pytest.approx(expected[point["step"]], rel=LOSS_NOISE)
    assert (run_dir / "checkpoints" / f"checkpoint-{stopped['steps']}").is_dir()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()

    assert main(["train", "--output_dir", str(run_dir), "--resume", *common]) == 0
    resumed = report(run_dir)
    assert resumed["status"] == "completed" and resumed["steps"] == 8
    assert resumed["resumed_at_step"] == stopped["steps"]
    after = {p["step"]: p["loss"] for p in resumed["loss_curve"] if p["step"] > stopped["steps"]}
    assert sorted(after) == list(range(stopped["steps"] + 1, 9))
    # Same batches in the same order with the same optimizer state: the same losses (up
    # to float noise; batches differ from each other by far more).
    assert max(expected.values()) > 1.5 * min(expected[s] for s in after)
    for step, loss in after.items():
        assert loss == pytest.approx(expected[step], rel=LOSS_NOISE), (step, after, expected)


def test_dpo_runs_a_few_steps_from_the_sft_adapter(qlora_run: tuple[Path, str, int], tmp_path: Path) -> None:
    run_dir, _, rc = qlora_run
    assert rc == 0
    pairs = [
        {"prompt": f"Say the code word {i}.", "chosen": f"The code word is {i * 7 % 50}.", "rejected": "I don't know."}
        for i in range(4)
    ]
    write_jsonl(tmp_path / "dpo.jsonl", pairs)
    out = tmp_path / "dpo"
    rc = main([
        "train", "--method", "dpo", "--dpo.sft_adapter", str(run_dir / "adapter"), "--output_dir", str(out),
        "--data.train", str(tmp_path / "dpo.jsonl"), "--quantization.enabled", "false",
        "--optim.max_steps", "2", "--optim.learning_rate", "1e-3", "--run.save_steps", "2", *FAST,
    ])
    assert rc == 0
    rep = report(out)
    assert rep["method"] == "dpo" and rep["steps"] == 2 and len(rep["loss_curve"]) == 2
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not (out / "adapter" / "ref").exists()
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), framework="pt") as tuned, \
            safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), framework="pt") as sft:
        assert set(tuned.keys()) == set(sft.keys())
        assert any((tuned.get_tensor(k) - sft.get_tensor(k)).abs().max() > 0 for k in sft.keys())  # it moved


def test_dpo_data_errors_name_file_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "dpo.jsonl"
    write_jsonl(bad, [{"prompt": "q", "chosen": "a"}, {"prompt": "q", "chosen": "", "rejected": "b"}])
    sft = tmp_path / "sft"
    sft.mkdir()
    (sft / "adapter_config.json").write_text("{}")
    rc = main(["train", "--method", "dpo", "--dpo.sft_adapter", str(sft), "--output_dir", str(tmp_path / "o"),
               "--data.train", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{bad}:1: rejected: missing" in err and f"{bad}:2: chosen: is empty" in err


def test_eval_compares_base_and_adapter(qlora_run: tuple[Path, str, int], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run_dir, _, rc = qlora_run
    assert rc == 0
    write_jsonl(tmp_path / "fc.jsonl", generate("test", 2))
    write_jsonl(tmp_path / "general.jsonl", [{"text": "Rivers carry sand to the sea and build wide plains."}])
    out = tmp_path / "eval.json"
    assert main([
        "eval", "--function-calling", str(tmp_path / "fc.jsonl"), "--general", str(tmp_path / "general.jsonl"),
        "--adapter", f"tuned={run_dir / 'adapter'}", "--max-new-tokens", "16", "--threads", "1", "--output", str(out),
    ]) == 0
    table = capsys.readouterr().out
    assert "tool_name" in table and "\nbase" in table and "\ntuned" in table
    results = json.loads(out.read_text())["models"]
    for name in ("base", "tuned"):
        fc = results[name]["function_calling"]
        assert fc["examples"] == 2 and 0 <= fc["json_validity"] <= 1
        assert sum(s["examples"] for s in fc.get("by_language", {"all": fc}).values()) == 2
        assert results[name]["general_perplexity"] > 1
    assert results["tuned"]["general_perplexity"] != results["base"]["general_perplexity"]
    assert "perplexity_change_pct" in results["tuned"]
