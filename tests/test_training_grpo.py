"""`tuneserve train --method grpo`: the function-calling rewards on hand-written completions,
the config errors, and short runs on the tiny model, on CPU, from an SFT adapter.

The runs use one torch thread (the CPU is shared with the servers other tests start)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import pytest
from safetensors import safe_open

from tests.support.servers import DATA_DIR
from tests.test_training import FAST, report
from training.datagen.function_calling import TOOLS, call_turn, write_jsonl
from training.report import TrainingReport
from training.rewards import no_call, parses, right_arguments, right_tool
from tuneserve.cli.main import main


@pytest.fixture(autouse=True)
def _data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESERVE_DATA_DIR", str(DATA_DIR))


# ---------------------------------------------------------------- rewards (no model)

OFFERED = ["get_weather", "get_stock_price"]


def score(completions: Sequence[Any], expected_name: str | None, expected_arguments: dict[str, Any] | None = None,
          tool_format: str = "compact") -> dict[str, list[float | None]]:
    """Each built-in reward of `completions` to one prompt that offered OFFERED."""
    n = len(completions)
    columns: dict[str, Any] = {
        "prompts": ["(prompt)"] * n,
        "completion_ids": [[]] * n,
        "tool_format": [tool_format] * n,
        "tool_names": [OFFERED] * n,
        "expected_name": [expected_name] * n,
        "expected_arguments": [json.dumps(expected_arguments or {})] * n,
        "expected_content": [None] * n,
    }
    return {f.__name__: f(completions=list(completions), **columns) for f in (parses, right_tool, right_arguments, no_call)}


def call(name: str, arguments: dict[str, Any]) -> str:
    return json.dumps({"name": name, "arguments": arguments})


def test_right_call_scores_full_marks_and_the_no_call_reward_abstains() -> None:
    got = score([call("get_weather", {"city": "Seoul"}), call("get_weather", {"city": "Seoul"}) + "\nDone."],
                "get_weather", {"city": "Seoul"})
    assert got == {"parses": [1.0, 1.0], "right_tool": [1.0, 1.0], "right_arguments": [1.0, 1.0], "no_call": [None, None]}


def test_wrong_tool_parses_but_earns_no_tool_or_argument_credit() -> None:
    got = score([call("get_stock_price", {"city": "Seoul"})], "get_weather", {"city": "Seoul"})
    assert got["parses"] == [1.0] and got["right_tool"] == [0.0] and got["right_arguments"] == [0.0]


def test_arguments_earn_partial_credit_and_extra_arguments_count_against() -> None:
    expected = {"city": "Seoul", "unit": "celsius"}
    got = score([
        call("get_weather", {"city": "Seoul", "unit": "fahrenheit"}),  # one of two right
        call("get_weather", {"city": "Seoul"}),  # one missing
        call("get_weather", {"city": "Seoul", "unit": "celsius", "days": 3}),  # an extra one
        call("get_weather", {"city": "Busan", "unit": "fahrenheit"}),
        call("get_weather", expected),
    ], "get_weather", expected)
    assert got["right_arguments"] == [0.5, 0.5, pytest.approx(2 / 3), 0.0, 1.0]
    assert got["right_tool"] == [1.0] * 5
    assert score([call("get_weather", {})], "get_weather", {})["right_arguments"] == [1.0]  # nothing to get wrong


def test_text_is_right_where_no_offered_tool_fits_and_a_call_there_scores_zero() -> None:
    got = score(["Sorry, none of my tools can book a flight.", call("get_weather", {"city": "Seoul"}), "  "], None)
    assert got["no_call"] == [1.0, 0.0, 0.0]  # an empty answer is no answer
    assert got["parses"] == got["right_tool"] == got["right_arguments"] == [None, None, None]


def test_garbage_and_calls_to_tools_not_offered_earn_nothing() -> None:
    got = score([
        "The weather in Seoul is nice.",
        '{"name": "get_weather", "arguments": {"city": "Se',  # cut off at max_completion_length
        call("send_email", {"to": "a@b.c"}),  # not offered: the gateway sends it back as text
        '{"city": "Seoul"}',
        "",
    ], "get_weather", {"city": "Seoul"})
    assert got["parses"] == [0.0] * 5
    # The cut-off call named the right tool (the gateway would still send it as a call).
    assert got["right_tool"] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert got["right_arguments"] == [0.0] * 5


def test_rewards_read_the_base_models_tool_format_and_chat_completions() -> None:
    tagged = "<tool_call>\n" + call("get_weather", {"city": "Seoul"}) + "\n</tool_call>"
    assert score([tagged], "get_weather", {"city": "Seoul"}, tool_format="hermes")["right_arguments"] == [1.0]
    assert score([tagged], "get_weather", {"city": "Seoul"})["parses"] == [0.0]  # not the compact protocol
    chat = [[{"role": "assistant", "content": call("get_weather", {"city": "Seoul"})}]]
    assert score(chat, "get_weather", {"city": "Seoul"})["right_arguments"] == [1.0]


# ---------------------------------------------------------------- config errors


def _weather_rows(cities: Sequence[str]) -> list[dict[str, Any]]:
    weather = next(t for t in TOOLS if t.name == "get_weather")
    return [
        {"messages": [{"role": "user", "content": f"What's the weather in {city}?"}, call_turn("get_weather", {"city": city})],
         "tools": [weather.spec()]}
        for city in cities
    ]


def test_grpo_config_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "fc.jsonl"
    write_jsonl(data, _weather_rows(["Seoul"]))
    base = ["train", "--method", "grpo", "--output_dir", str(tmp_path / "run"), "--data.train", str(data)]
    assert main(base) == 2
    assert "grpo.sft_adapter: GRPO starts from an SFT adapter" in capsys.readouterr().err
    base += ["--grpo.sft_adapter", str(tmp_path / "sft")]
    cases = [
        ("[training.rewards:parses, training.rewards:nope]",
         "grpo.rewards[1]: 'training.rewards:nope': training.rewards has no function 'nope'"),
        ("[no_such_module.rewards:score]", "grpo.rewards[0]: 'no_such_module.rewards:score': cannot import no_such_module"),
        ("[parses]", "key 'grpo.rewards'"),
        ("[training.rewards:parses, tests.test_training_grpo:parses]", "grpo.rewards[1]"),  # two named `parses`
    ]
    for rewards, message in cases:
        assert main([*base, "--grpo.rewards", rewards]) == 2, rewards
        assert message in capsys.readouterr().err, rewards
    assert main([*base, "--grpo.reward_weights", "[1, 2]"]) == 2
    assert "key 'grpo.reward_weights'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing trained


def test_grpo_data_errors_name_file_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    long, unanswered = tmp_path / "long.jsonl", tmp_path / "unanswered.jsonl"
    write_jsonl(long, _weather_rows(["Seoul"]))
    rows = _weather_rows(["Seoul", "Busan"])
    rows[1]["messages"].append({"role": "user", "content": "Thanks!"})  # no expected answer last
    write_jsonl(unanswered, rows)
    rc = main(["train", "--method", "grpo", "--grpo.sft_adapter", str(tmp_path), "--output_dir", str(tmp_path / "run"),
               "--data.train", str(long), "--data.eval", str(unanswered), "--data.max_length", "32"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{long}:1: messages: the prompt has" in err and "over data.max_length=32" in err
    assert f"{unanswered}:2: messages: the last turn must be the assistant's expected answer" in err


# ---------------------------------------------------------------- runs

CITIES = ["Seoul", "Busan", "Tokyo", "Paris", "London", "Berlin", "Sydney", "Toronto", "Madrid", "Rome", "Bangkok", "Oslo"]
RUN = [*FAST, "--data.max_length", "160", "--quantization.enabled", "false", "--run.save_steps", "1000"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """One tool, one request per city, and an SFT adapter that has half learned to answer
    them: sampled at temperature 0.7 about half its calls parse and a third name the city
    (measured: 1.35 of 3 on average), so completions of one prompt differ in reward and
    GRPO has something to move towards. (After 3 SFT steps almost nothing parses: no signal.)"""
    tmp = tmp_path_factory.mktemp("grpo")
    data = tmp / "weather.jsonl"
    write_jsonl(data, _weather_rows(CITIES))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TUNESERVE_DATA_DIR", str(DATA_DIR))
        rc = main(["train", "--output_dir", str(tmp / "sft"), "--data.train", str(data), *RUN,
                   "--optim.max_steps", "4", "--optim.learning_rate", "1e-3"])
    assert rc == 0
    yield data, tmp / "sft" / "adapter"


def test_grpo_raises_the_reward_from_the_sft_adapter(toy: tuple[Path, Path], tmp_path: Path) -> None:
    data, sft = toy
    out = tmp_path / "grpo"
    steps = 14
    rc = main([
        "train", "--method", "grpo", "--grpo.sft_adapter", str(sft), "--output_dir", str(out), "--data.train", str(data),
        *RUN, "--optim.max_steps", str(steps), "--optim.learning_rate", "1e-3", "--optim.batch_size", "1",
        # Warmup: Adam's first step moves every LoRA weight by about the learning rate, whatever
        # the gradient; unwarmed, one step at 1e-3 left this adapter naming no tool at all.
        "--optim.warmup_ratio", "0.15",
        "--optim.seed", "0", "--grpo.num_generations", "4", "--grpo.max_completion_length", "24",
    ])
    assert rc == 0
    rep = report(out)
    assert TrainingReport.model_validate(rep).model_dump(mode="json") == rep  # the file is the model
    assert rep["method"] == "grpo" and rep["steps"] == steps
    assert rep["data"]["train_examples"] == rep["data"]["call_examples"] == len(CITIES)
    assert rep["data"]["rewards"] == rep["config"]["grpo"]["rewards"] and len(rep["data"]["rewards"]) == 4
    curve = rep["reward_curve"]
    assert [p["step"] for p in curve] == list(range(1, steps + 1))
    for point in curve:
        # no_call applies to no prompt here (every answer is a call), so it is left out
        assert set(point["rewards"]) == {"parses", "right_tool", "right_arguments"}
        assert point["reward"] == pytest.approx(sum(point["rewards"].values()))
    rewards = [p["reward"] for p in curve]
    # The first 3 steps sample the SFT policy (warmup: lr 0, then a third of it); each step's
    # mean is over only 4 completions, so the windows are noisy: over 7 runs (seeds 0-5, 14
    # and 16 steps) the first 3 averaged 1.7-2.0 of 3, the last 4 2.4-3.0, always higher by 0.4+.
    first, last = sum(rewards[:3]) / 3, sum(rewards[-4:]) / 4
    assert last > first, rewards
    assert len(rep["loss_curve"]) == steps and rep["train_tokens"] > 0
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), framework="pt") as tuned, \
            safe_open(str(sft / "adapter_model.safetensors"), framework="pt") as start:
        assert set(tuned.keys()) == set(start.keys())
        assert any((tuned.get_tensor(k) - start.get_tensor(k)).abs().max() > 0 for k in start.keys())  # it moved


def brevity(completions: Sequence[str], **_: Any) -> list[float]:
    """A reward of the test's own: shorter is better."""
    return [1.0 / (1 + len(c)) for c in completions]


def test_grpo_with_a_kl_term_weights_eval_and_a_reward_of_ones_own(toy: tuple[Path, Path], tmp_path: Path) -> None:
    data, sft = toy
    out = tmp_path / "grpo"
    rc = main([
        "train", "--method", "grpo", "--grpo.sft_adapter", str(sft), "--output_dir", str(out), "--data.train", str(data),
        *RUN, "--data.eval_ratio", "0.2", "--optim.max_steps", "1", "--optim.batch_size", "1", "--grpo.num_generations", "2",
        "--grpo.max_completion_length", "8", "--grpo.beta", "0.04",
        "--grpo.rewards", "[training.rewards:parses, tests.test_training_grpo:brevity]", "--grpo.reward_weights", "[2, 10]",
    ])
    assert rc == 0
    rep = report(out)
    assert rep["data"]["train_examples"] == 10 and rep["data"]["eval_examples"] == 2
    assert rep["eval_loss"] is not None  # sampled and scored on the held-out prompts too
    (point,) = rep["reward_curve"]
    assert set(point["rewards"]) == {"parses", "brevity"}
    assert point["reward"] == pytest.approx(2 * point["rewards"]["parses"] + 10 * point["rewards"]["brevity"])
    assert not (out / "adapter" / "ref").exists()  # the frozen reference copy is not saved
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
