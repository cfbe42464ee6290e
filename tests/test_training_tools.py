"""Function calling in training and eval (issue 18, point 6): tool turns and multi-step
examples in the data, rendered through the shared tool format (tuneserve/tool_calls),
the generator's new kinds, no-call scoring, and `tuneserve eval --base-url` through a
running gateway. The real tokenizer of the prepared model; no mocks."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support.servers import DATA_DIR, MODEL, ServerProcess, gateway
from training import data as D
from training.datagen.function_calling import (
    OUTCOMES,
    QUESTIONS,
    TOOLS,
    generate,
    preference_pairs,
    split_questions,
    split_templates,
    write_jsonl,
)
from training.evaluate import CallCase, load_call_cases, parse_answers, score_calls
from training.model import load_tokenizer
from tuneserve.cli.main import main
from tuneserve.tool_calls.formats import COMPACT, HERMES
from tuneserve.tool_calls.parse import ParsedOutput
from tuneserve.tool_calls.render import call_text, tools_prompt, with_tools
from tuneserve.tool_calls.spec import ToolCall

HF_DIR = DATA_DIR / "models" / MODEL / "hf"

WEATHER: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ALARM: dict[str, Any] = {
    "type": "function",
    "function": {"name": "set_alarm", "parameters": {"type": "object", "properties": {"time": {"type": "string"}}}},
}


def multi_step(**call: Any) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": "Weather in Seoul?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Seoul"}'}, **call,
            }]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "condition": "sunny"}'},
            {"role": "assistant", "content": "It is 21°C and sunny in Seoul."},
        ],
        "tools": [WEATHER, ALARM],
    }


def trained_text(tokenizer: Any, encoded: D.Encoded) -> list[str]:
    """Each run of trained tokens, decoded."""
    runs: list[list[int]] = []
    for i, label in enumerate(encoded.labels):
        if label == D.IGNORE_INDEX:
            continue
        if i > 0 and encoded.labels[i - 1] != D.IGNORE_INDEX:
            runs[-1].append(label)
        else:
            runs.append([label])
    return [tokenizer.decode(run) for run in runs]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(str(HF_DIR))


@pytest.fixture(autouse=True)
def _data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESERVE_DATA_DIR", str(DATA_DIR))


# ---------------------------------------------------------------- data


def test_tool_turn_errors_name_file_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def line(obj: dict[str, Any]) -> str:
        return json.dumps(obj, ensure_ascii=False) + "\n"

    bad_args = multi_step()
    bad_args["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{city: Seoul"
    not_object = multi_step()
    not_object["messages"][1]["tool_calls"][0]["function"]["arguments"] = "[1, 2]"
    wrong_id = multi_step()
    wrong_id["messages"][2]["tool_call_id"] = "call_9"
    early_result = {"messages": [
        {"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "ok"},
    ]}
    unoffered = multi_step()
    unoffered["messages"][1]["tool_calls"][0]["function"]["name"] = "book_flight"
    no_name = multi_step()
    del no_name["messages"][1]["tool_calls"][0]["function"]["name"]
    result_not_text = multi_step()
    result_not_text["messages"][2]["content"] = {"temperature": 21}
    duplicate_tool = multi_step()
    duplicate_tool["tools"] = [WEATHER, WEATHER]
    bad = tmp_path / "tools.jsonl"
    bad.write_text(
        line(multi_step()) + line(bad_args) + line(not_object) + line(wrong_id) + line(early_result)
        + line(unoffered) + line(no_name) + line(result_not_text) + line(duplicate_tool)
    )
    out = tmp_path / "run"
    assert main(["train", "--output_dir", str(out), "--data.train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:1" not in err and "8 problem(s)" in err
    assert f"{bad}:2: messages[1].tool_calls[0].function.arguments: is not valid JSON" in err
    assert f"{bad}:3: messages[1].tool_calls[0].function.arguments: must be a JSON object" in err
    assert f"{bad}:4: messages[2].tool_call_id: 'call_9' matches no earlier assistant tool call" in err
    assert f"{bad}:5: messages[1]: a tool result needs an earlier assistant turn with tool_calls" in err
    assert f"{bad}:6: messages[1].tool_calls[0].function.name: 'book_flight' is not in tools" in err
    assert f"{bad}:7: messages[1].tool_calls[0]: needs function.name" in err
    assert f"{bad}:8: messages[2].content: must be a string, got dict" in err
    assert f"{bad}:9: tools[1].name: duplicate tool name 'get_weather'" in err
    assert not out.exists()


def test_calls_and_results_stay_structured_until_rendering(tmp_path: Path) -> None:
    example = multi_step()
    del example["messages"][2]["tool_call_id"]  # optional: it answers the call before it
    example["messages"][1]["tool_calls"][0]["function"]["arguments"] = {"city": "Seoul"}  # an object is fine too
    del example["messages"][1]["tool_calls"][0]["id"]
    write_jsonl(tmp_path / "d.jsonl", [example])
    (conversation,) = D.load_examples([tmp_path / "d.jsonl"])
    assert isinstance(conversation, D.Conversation)
    call_turn, result = conversation.messages[1], conversation.messages[2]
    assert call_turn["content"] is None
    assert call_turn["tool_calls"] == (ToolCall("call_1_0", "get_weather", '{"city": "Seoul"}'),)
    assert result == {"role": "tool", "content": '{"temperature": 21, "condition": "sunny"}', "tool_call_id": "call_1_0"}
    assert [t.name for t in conversation.tools or ()] == ["get_weather", "set_alarm"]


def test_multi_step_example_renders_through_the_compact_format(tokenizer: Any, tmp_path: Path) -> None:
    assert D.tool_format(tokenizer) is COMPACT  # SmolLM2's template cannot render tools
    write_jsonl(tmp_path / "d.jsonl", [multi_step()])
    (example,) = D.load_examples([tmp_path / "d.jsonl"])
    prompt = tools_prompt([WEATHER["function"], ALARM["function"]])
    assert D.render(tokenizer, example.messages, example.tools) == (
        f"<|im_start|>system\n{prompt}<|im_end|>\n"
        "<|im_start|>user\nWeather in Seoul?<|im_end|>\n"
        '<|im_start|>assistant\n{"name": "get_weather", "arguments": {"city": "Seoul"}}<|im_end|>\n'
        '<|im_start|>tool\n{"temperature": 21, "condition": "sunny"}<|im_end|>\n'
        "<|im_start|>assistant\nIt is 21°C and sunny in Seoul.<|im_end|>\n"
    )
    # The prompt before the final answer, as eval and the gateway render it.
    assert D.prompt_text(tokenizer, example.messages[:-1], example.tools).endswith(
        '<|im_start|>tool\n{"temperature": 21, "condition": "sunny"}<|im_end|>\n<|im_start|>assistant\n'
    )


def test_single_call_data_renders_byte_identical_to_the_json_content_it_was(tokenizer: Any, tmp_path: Path) -> None:
    """SmolLM2: a call as `tool_calls` and the same call as JSON content (the earlier
    data format, rendered by with_tools + call_text) are the same prompt text."""
    rows = [r for r in generate("train", 40) if r["meta"]["kind"] == "call"]
    write_jsonl(tmp_path / "d.jsonl", rows)
    for row, example in zip(rows, D.load_examples([tmp_path / "d.jsonl"])):
        fn = row["messages"][1]["tool_calls"][0]["function"]
        old = with_tools(
            [row["messages"][0], {"role": "assistant", "content": call_text([{"name": fn["name"], "arguments": json.loads(fn["arguments"])}])}],
            [t["function"] for t in row["tools"]],
        )
        assert D.render(tokenizer, example.messages, example.tools) == tokenizer.apply_chat_template(old, tokenize=False)
        assert D.prompt_text(tokenizer, example.messages[:1], example.tools) == tokenizer.apply_chat_template(
            old[:-1], tokenize=False, add_generation_prompt=True
        )


def test_loss_mask_covers_the_call_and_the_final_answer(tokenizer: Any, tmp_path: Path) -> None:
    write_jsonl(tmp_path / "d.jsonl", [multi_step()])
    (example,) = D.load_examples([tmp_path / "d.jsonl"])
    encoded = D.encode(tokenizer, example, max_length=512)
    assert trained_text(tokenizer, encoded) == [
        '{"name": "get_weather", "arguments": {"city": "Seoul"}}<|im_end|>\n',
        "It is 21°C and sunny in Seoul.<|im_end|>\n",
    ]
    untrained = tokenizer.decode([t for t, lab in zip(encoded.input_ids, encoded.labels) if lab == D.IGNORE_INDEX])
    assert "Weather in Seoul?" in untrained and '"condition": "sunny"' in untrained


def test_a_hermes_template_renders_tools_itself_and_trains_the_tagged_calls(tmp_path: Path) -> None:
    """A base whose template renders `tools` (tests/templates/hermes.jinja): the tools go to
    the template, calls are <tool_call> blocks, results <tool_response> blocks; the loss
    covers the call block and the final answer."""
    hermes = load_tokenizer(str(HF_DIR))
    hermes.chat_template = (Path(__file__).parent / "templates" / "hermes.jinja").read_text()
    assert D.tool_format(hermes) is HERMES
    write_jsonl(tmp_path / "d.jsonl", [multi_step()])
    (example,) = D.load_examples([tmp_path / "d.jsonl"])
    text = D.render(hermes, example.messages, example.tools)
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call><|im_end|>' in text
    assert '<|im_start|>user\n<tool_response>\n{"temperature": 21, "condition": "sunny"}\n</tool_response><|im_end|>' in text
    assert trained_text(hermes, D.encode(hermes, example, max_length=1024)) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call><|im_end|>\n',
        "It is 21°C and sunny in Seoul.<|im_end|>\n",
    ]
    # Eval reads the model's tagged call with the same parser the gateway uses.
    case = load_call_cases(tmp_path / "d.jsonl")[0]
    (parsed,) = parse_answers(HERMES, [case], ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Seoul"}}\n</tool_call>'])
    assert [(c.name, c.arguments_value()) for c in parsed.calls] == [("get_weather", {"city": "Seoul"})]


def test_dpo_lines_take_calls_and_tool_results(tmp_path: Path) -> None:
    rows = generate("train", 50)
    pairs = preference_pairs(rows)
    write_jsonl(tmp_path / "dpo.jsonl", pairs)
    loaded = D.load_examples([tmp_path / "dpo.jsonl"], preference=True)
    assert len(loaded) == 50
    by_kind = {r["meta"]["kind"]: p for r, p in zip(rows, loaded)}
    assert by_kind["call"].chosen["tool_calls"] and by_kind["call"].rejected["tool_calls"]
    assert by_kind["call"].chosen["tool_calls"][0].name != by_kind["call"].rejected["tool_calls"][0].name
    # No tool fits: text is chosen over a call.
    assert by_kind["no_fit"].chosen["content"] and by_kind["no_fit"].rejected["tool_calls"]
    # After the result: the answer is chosen over calling again.
    multi = by_kind["multi_step"]
    assert multi.prompt[-1]["role"] == "tool" and multi.chosen["content"] and multi.rejected["tool_calls"]


# ---------------------------------------------------------------- generator


def test_generator_makes_multi_step_and_no_fit_examples_in_both_languages(tmp_path: Path) -> None:
    rows = generate("train", 200)
    kinds = Counter(r["meta"]["kind"] for r in rows)
    assert kinds == {"call": 152, "multi_step": 24, "no_fit": 24}
    assert generate("train", 200) == rows and generate("train", 200, seed=1) != rows  # deterministic per seed
    for kind in ("multi_step", "no_fit"):
        assert {r["meta"]["lang"] for r in rows if r["meta"]["kind"] == kind} == {"en", "ko"}
    for row in rows:
        messages, offered = row["messages"], {t["function"]["name"] for t in row["tools"]}
        if row["meta"]["kind"] == "multi_step":
            assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]
            call = messages[1]["tool_calls"][0]
            assert call["function"]["name"] in offered & set(OUTCOMES)
            assert messages[2]["tool_call_id"] == call["id"] and json.loads(messages[2]["content"])
            assert isinstance(messages[3]["content"], str) and "tool_calls" not in messages[3]
        elif row["meta"]["kind"] == "no_fit":
            assert [m["role"] for m in messages] == ["user", "assistant"] and isinstance(messages[1]["content"], str)
            for tool in TOOLS:  # a tool's request never offers that tool
                if row["meta"]["template"] in {t.text for t in tool.templates}:
                    assert tool.name not in offered
        else:
            assert messages[1]["tool_calls"][0]["function"]["name"] in offered
    assert generate("train", 10, multi_step=0, no_fit=0) == [r for r in generate("train", 10, multi_step=0, no_fit=0)]
    assert {r["meta"]["kind"] for r in generate("train", 10, multi_step=0, no_fit=0)} == {"call"}
    # The split holds for the new kinds too: test requests are phrased as no training one is.
    test_rows = generate("test", 100)
    assert not {r["meta"]["template"] for r in rows} & {r["meta"]["template"] for r in test_rows}
    for lang in ("en", "ko"):
        assert not set(split_questions(lang, "train")) & set(split_questions(lang, "test"))
        assert len(split_questions(lang, "train")) + len(split_questions(lang, "test")) == len(QUESTIONS[lang])
    for tool in TOOLS:
        assert split_templates(tool, "test")
    write_jsonl(tmp_path / "train.jsonl", rows)
    assert len(D.load_examples([tmp_path / "train.jsonl"])) == 200  # the trainer takes them


# ---------------------------------------------------------------- eval scoring


def test_no_call_lines_are_right_when_the_answer_makes_no_call(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "fc.jsonl", generate("test", 50))
    cases = load_call_cases(tmp_path / "fc.jsonl")
    assert Counter(c.kind for c in cases) == {"call": 38, "multi_step": 6, "no_fit": 6}
    assert all((c.name is None) == (c.kind != "call") for c in cases)
    assert all(c.prompt[-1]["role"] == "tool" for c in cases if c.kind == "multi_step")

    def right(case: CallCase) -> str:
        if case.name is None:
            return case.content or ""
        return json.dumps({"name": case.name, "arguments": case.arguments}, ensure_ascii=False)

    perfect = score_calls(cases, parse_answers(COMPACT, cases, [right(c) for c in cases]))
    assert perfect["no_call_accuracy"] == 1 and perfect["exact_call_accuracy"] == 1 and perfect["json_validity"] == 1
    assert perfect["call_examples"] == 38 and perfect["no_call_examples"] == 12
    assert set(perfect["by_kind"]) == {"call", "multi_step", "no_fit"}
    assert perfect["by_kind"]["call"]["no_call_accuracy"] is None
    assert perfect["by_kind"]["no_fit"]["tool_name_accuracy"] is None

    # Calling where text was right is an error; calling again after the result too.
    def always_call(case: CallCase) -> str:
        name = case.name or case.tool_names[0]
        return json.dumps({"name": name, "arguments": case.arguments})

    trigger_happy = score_calls(cases, parse_answers(COMPACT, cases, [always_call(c) for c in cases]))
    assert trigger_happy["no_call_accuracy"] == 0 and trigger_happy["tool_name_accuracy"] == 1
    assert trigger_happy["by_kind"]["multi_step"]["no_call_accuracy"] == 0


def test_scoring_reads_calls_as_the_gateway_parser_does() -> None:
    tools = D._tools([WEATHER, ALARM])
    cases = [
        CallCase("a:1", [], tools, "get_weather", {"city": "Seoul"}),
        CallCase("a:2", [], tools, "set_alarm", {"time": "07:30"}),
        CallCase("a:3", [], tools, "get_weather", {"city": "Paris"}),
        CallCase("a:4", [], tools, "get_weather", {"city": "Rome"}),
        CallCase("a:5", [], tools, None, content="Hello!"),
        CallCase("a:6", [], tools, None, content="Paris."),
    ]
    texts = [
        ' {"name": "get_weather", "arguments": {"city": "Seoul"}}',
        '{"name": "set_alarm", "arguments": {"time": "08:00"}}',
        '{"name": "book_flight", "arguments": {"city": "Paris"}}',  # not offered: text, as the gateway sends it
        'It is {"name": "get_weather"}',
        "Hello there!",
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    ]
    parsed = parse_answers(COMPACT, cases, texts)
    assert [bool(p.calls) for p in parsed] == [True, True, False, False, False, True]
    scores = score_calls(cases, parsed)
    assert scores["json_validity"] == pytest.approx(2 / 4)
    assert scores["tool_name_accuracy"] == pytest.approx(2 / 4)
    assert scores["exact_call_accuracy"] == pytest.approx(1 / 4)
    assert scores["argument_accuracy"] == pytest.approx(1 / 4)
    assert scores["no_call_accuracy"] == pytest.approx(1 / 2)
    # An API answer, message.tool_calls and content, is scored by the same code.
    api = [ParsedOutput(None, (ToolCall("call_x", "get_weather", '{"city": "Seoul"}'),))] + list(parsed[1:])
    assert score_calls(cases, api) == scores


# ---------------------------------------------------------------- through a gateway


@pytest.fixture(scope="module")
def f16_gateway() -> Any:
    """llama.cpp on the f16 GGUF, exact to the HF copy eval runs in process."""
    server = gateway("gw-eval", {"model.gguf_path": DATA_DIR / "models" / MODEL / "model.f16.gguf"}).start()
    yield server
    server.stop()


def test_eval_through_the_gateway_scores_what_the_api_returns(
    f16_gateway: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = generate("test", 50)
    picked = [next(r for r in rows if r["meta"]["kind"] == kind) for kind in ("call", "multi_step", "no_fit")]
    write_jsonl(tmp_path / "fc.jsonl", picked)
    common = ["--function-calling", str(tmp_path / "fc.jsonl"), "--max-new-tokens", "24"]
    http, local = tmp_path / "http.json", tmp_path / "local.json"
    assert main(["eval", "--base-url", f16_gateway.base_url, "--model", MODEL, *common, "--output", str(http)]) == 0
    table = capsys.readouterr().out
    assert "no_call" in table and f"\n{MODEL}" in table
    assert main(["eval", *common, "--threads", "1", "--batch-size", "1", "--output", str(local)]) == 0
    over_http = json.loads(http.read_text())["models"][MODEL]
    in_process = json.loads(local.read_text())["models"]["base"]
    assert over_http["function_calling"]["examples"] == 3
    assert set(over_http["function_calling"]["by_kind"]) == {"call", "multi_step", "no_fit"}
    # The same prompts through the same parser: the same decisions and the same figures.
    assert over_http["function_calling"] == in_process["function_calling"]
    for a, b in zip(over_http["samples"], in_process["samples"]):
        assert [c["name"] for c in a["parsed"]["tool_calls"]] == [c["name"] for c in b["parsed"]["tool_calls"]]


def test_eval_base_url_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_jsonl(tmp_path / "fc.jsonl", generate("test", 3))
    fc = ["--function-calling", str(tmp_path / "fc.jsonl")]
    assert main(["eval", "--base-url", "http://127.0.0.1:9", *fc]) == 2
    assert "give --model NAME" in capsys.readouterr().err
    assert main(["eval", "--model", MODEL, *fc]) == 2
    assert "--model needs --base-url" in capsys.readouterr().err
    assert main(["eval", "--base-url", "http://127.0.0.1:9", "--model", MODEL, "--general", str(tmp_path / "fc.jsonl"), *fc]) == 2
    assert "--general is for in-process evaluation" in capsys.readouterr().err
    assert main(["eval", "--base-url", "http://127.0.0.1:9", "--model", MODEL, *fc]) == 2
    assert "cannot connect" in capsys.readouterr().err
