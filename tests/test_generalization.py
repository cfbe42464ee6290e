"""Generalization, measured (issue 20, point 6): tools held out of training, no-call and
multi-step lines, each line labelled by split; `tuneserve eval` scoring per split and
language, in process and through a gateway with the same code; factual retention as a
second measure of forgetting. Generator and scoring checks need no model; one eval run on
the tiny base (and an adapter that changes nothing) covers the command."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.support.servers import DATA_DIR, MODEL, ServerProcess, gateway
from training import data as D
from training.datagen import factual as F
from training.datagen.function_calling import (
    CATALOGUE,
    QUESTIONS,
    TOOLS,
    UNSEEN_TOOLS,
    generate,
    split_templates,
    write_jsonl,
)
from training.datagen.function_calling import main as datagen_main
from training.evaluate import CallCase, format_table, load_call_cases, parse_answers, score_calls
from training.retention import FactualQuestion, is_right, load_questions, normalize, retention, score
from tuneserve.cli.main import main
from tuneserve.tool_calls.formats import COMPACT
from tuneserve.tool_calls.parse import ParsedOutput
from tuneserve.tool_calls.spec import ToolCall

HF_DIR = DATA_DIR / "models" / MODEL / "hf"
UNSEEN = {t.name for t in UNSEEN_TOOLS}
SPLITS = {"seen_tools", "unseen_tools", "no_call", "multi_step"}


@pytest.fixture(autouse=True)
def _data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESERVE_DATA_DIR", str(DATA_DIR))


def template_owner(text: str) -> str | None:
    """The tool whose phrasing `text` is (phrasings are unique across the catalogue)."""
    owners = [t.name for t in CATALOGUE if text in {p.text for p in t.templates}]
    assert len(owners) <= 1, (text, owners)
    return owners[0] if owners else None


# ---------------------------------------------------------------- the generator


def test_held_out_tools_never_reach_training(tmp_path: Path) -> None:
    assert len(CATALOGUE) >= 17 and len(UNSEEN_TOOLS) >= 4 and len(TOOLS) >= 13
    assert len({t.name for t in CATALOGUE}) == len(CATALOGUE) and not UNSEEN & {t.name for t in TOOLS}
    for tool in UNSEEN_TOOLS:
        assert not split_templates(tool, "train") and split_templates(tool, "test") == tool.templates
        assert {t.lang for t in tool.templates} == {"en", "ko"}
    assert datagen_main(["--out", str(tmp_path), "--train", "300", "--test", "100"]) == 0
    train = (tmp_path / "train.jsonl").read_text()
    # Not as a call, not among the offered tools, not in any text: nowhere in a training line.
    assert not [name for name in UNSEEN if name in train]
    test_rows = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    unseen_rows = [r for r in test_rows if r["meta"]["split"] == "unseen_tools"]
    assert len(unseen_rows) == 20  # the command line's 20%
    called = Counter(r["messages"][-1]["tool_calls"][0]["function"]["name"] for r in unseen_rows)
    assert set(called) == UNSEEN and max(called.values()) - min(called.values()) <= 1
    for row in unseen_rows:
        offered = {t["function"]["name"] for t in row["tools"]}
        assert row["messages"][-1]["tool_calls"][0]["function"]["name"] in offered and len(offered) == 4
        assert template_owner(row["meta"]["template"]) in UNSEEN
    # A held-out share asked of the train split is ignored: training never sees those tools.
    assert not [r for r in generate("train", 100, unseen_tools=0.5) if r["meta"]["split"] == "unseen_tools"]
    with pytest.raises(SystemExit):
        datagen_main(["--out", str(tmp_path), "--no-fit", "0.5", "--multi-step", "0.3", "--unseen-tools", "0.3"])


def test_every_split_is_present_in_both_languages_and_labels_its_lines(tmp_path: Path) -> None:
    train, test = generate("train", 200), generate("test", 200, unseen_tools=0.2)
    assert {(r["meta"]["split"], r["meta"]["lang"]) for r in test} == {(s, lang) for s in SPLITS for lang in ("en", "ko")}
    assert {r["meta"]["split"] for r in train} == SPLITS - {"unseen_tools"}
    kind_of = {"seen_tools": "call", "unseen_tools": "call", "no_call": "no_fit", "multi_step": "multi_step"}
    assert all(kind_of[r["meta"]["split"]] == r["meta"]["kind"] for r in train + test)
    # Phrasings of training tools keep to their split, as before.
    seen = [r for r in test if r["meta"]["split"] == "seen_tools"]
    assert not {r["meta"]["template"] for r in seen} & {r["meta"]["template"] for r in train}
    # The trainer takes the labelled lines; eval reads the label.
    write_jsonl(tmp_path / "train.jsonl", train)
    write_jsonl(tmp_path / "test.jsonl", test)
    assert len(D.load_examples([tmp_path / "train.jsonl"])) == 200
    cases = load_call_cases(tmp_path / "test.jsonl")
    assert Counter(c.split for c in cases) == Counter(r["meta"]["split"] for r in test)
    write_jsonl(tmp_path / "bad.jsonl", [{**test[0], "meta": {"split": ""}}])
    with pytest.raises(D.DataError, match=r"bad\.jsonl:1: meta\.split"):
        load_call_cases(tmp_path / "bad.jsonl")


def test_multi_step_lines_answer_the_call_they_follow() -> None:
    rows = [r for r in generate("train", 150) + generate("test", 150) if r["meta"]["split"] == "multi_step"]
    assert len(rows) == 36
    for row in rows:
        user, call, result, answer = row["messages"]
        assert (user["role"], call["role"], result["role"], answer["role"]) == ("user", "assistant", "tool", "assistant")
        (made,) = call["tool_calls"]
        assert result["tool_call_id"] == made["id"] and isinstance(json.loads(result["content"]), dict)
        assert made["function"]["name"] in {t["function"]["name"] for t in row["tools"]}
        assert isinstance(answer["content"], str) and answer["content"] and "tool_calls" not in answer


def test_no_call_lines_offer_no_tool_that_fits() -> None:
    rows = [r for r in generate("train", 200) + generate("test", 200, unseen_tools=0.2) if r["meta"]["split"] == "no_call"]
    questions = {q for pairs in QUESTIONS.values() for q, _ in pairs}
    sources: Counter[bool] = Counter()
    for row in rows:
        request, answer = row["messages"]
        offered = {t["function"]["name"] for t in row["tools"]}
        owner = template_owner(row["meta"]["template"])
        if owner is None:  # a general question: no tool in the catalogue answers one
            assert request["content"] in questions
        else:  # another tool's request: that tool is left out
            assert owner not in offered and owner not in UNSEEN
        assert offered and offered <= {t.name for t in TOOLS}  # held-out tools stay out of these too
        assert "tool_calls" not in answer and answer["content"]
        sources[owner is None] += 1
    assert sources[True] and sources[False]


# ---------------------------------------------------------------- scoring per split


def _right(case: CallCase) -> str:
    if case.name is None:
        return case.content or ""
    return json.dumps({"name": case.name, "arguments": case.arguments}, ensure_ascii=False)


def test_scores_per_split_and_language_on_hand_made_answers(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "fc.jsonl", generate("test", 120, unseen_tools=0.2))
    cases = load_call_cases(tmp_path / "fc.jsonl")
    seen_names = {t.name for t in TOOLS}

    # Right on the tools it trained on; on a held-out tool it calls a familiar offered one
    # instead (a call, the wrong tool); it calls where no tool fits, and answers in text
    # after a tool result.
    def answer(case: CallCase) -> str:
        if case.split == "unseen_tools":
            familiar = next(n for n in case.tool_names if n in seen_names)
            return json.dumps({"name": familiar, "arguments": case.arguments})
        if case.split == "no_call":
            return json.dumps({"name": case.tool_names[0], "arguments": {}})
        return _right(case)

    texts = [answer(c) for c in cases]
    parsed = parse_answers(COMPACT, cases, texts)
    scores = score_calls(cases, parsed)
    by_split = scores["by_split"]
    assert list(by_split) == ["seen_tools", "unseen_tools", "no_call", "multi_step"]
    assert by_split["seen_tools"]["exact_call_accuracy"] == 1 and by_split["seen_tools"]["no_call_accuracy"] is None
    assert by_split["unseen_tools"]["json_validity"] == 1 and by_split["unseen_tools"]["tool_name_accuracy"] == 0
    assert by_split["no_call"]["no_call_accuracy"] == 0  # a call where no tool fits is an error
    assert by_split["no_call"]["tool_name_accuracy"] is None
    assert by_split["multi_step"]["no_call_accuracy"] == 1
    for split, group in by_split.items():
        langs = group["by_language"]
        assert set(langs) == {"en", "ko"}, split
        assert sum(s["examples"] for s in langs.values()) == group["examples"] == sum(c.split == split for c in cases)
        assert all("by_language" not in s for s in langs.values())
    # Headline figures still cover every case; the older breakdowns are still there.
    assert scores["examples"] == len(cases) and set(scores["by_kind"]) == {"call", "multi_step", "no_fit"}
    unseen_share = by_split["unseen_tools"]["call_examples"] / scores["call_examples"]
    assert scores["tool_name_accuracy"] == pytest.approx(1 - unseen_share)

    # A wrong language on held-out tools shows in that split's language row only.
    texts_ko_wrong = [
        "Sorry." if c.split == "unseen_tools" and c.lang == "ko" else _right(c) for c in cases
    ]
    ko_wrong = score_calls(cases, parse_answers(COMPACT, cases, texts_ko_wrong))["by_split"]
    assert ko_wrong["unseen_tools"]["by_language"]["en"]["exact_call_accuracy"] == 1
    assert ko_wrong["unseen_tools"]["by_language"]["ko"]["json_validity"] == 0
    assert ko_wrong["seen_tools"]["by_language"]["ko"]["exact_call_accuracy"] == 1

    # The gateway's answers (message.tool_calls and content) go through the same scorer.
    api = [ParsedOutput(p.content, tuple(ToolCall(f"call_{i}", c.name, c.arguments) for c in p.calls))
           for i, p in enumerate(parsed)]
    assert score_calls(cases, api) == scores

    table = format_table({"models": {"tuned": {"function_calling": scores}}})
    rows = [line.split()[0:2] for line in table.splitlines()[1:]]
    assert ["tuned", "[unseen_tools]"] in rows and ["tuned", "[unseen_tools/ko]"] in rows
    assert ["tuned", "[no_call]"] in rows and ["tuned", "[ko]"] in rows
    assert ["tuned", "[no_fit]"] not in rows  # splits refine kinds: the table shows splits


# ---------------------------------------------------------------- factual retention


def test_factual_answers_are_matched_as_whole_words_in_the_first_sentence() -> None:
    assert is_right("The capital of Japan is Tokyo.", ["Tokyo"])
    assert is_right("  tokyo!", ["Tokyo"])
    assert is_right("The answer is four. Or five.", ["4", "four"])
    assert is_right("5 times 5 is twenty-five", ["25", "twenty five"])
    assert is_right("The chemical symbol for water is H2O.", ["H2O"])
    assert not is_right("The capital of Japan is Kyoto.", ["Tokyo"])
    assert not is_right("Tokyoite food is great.", ["Tokyo"])
    assert not is_right("The answer is 44.", ["4", "four"])
    assert not is_right("The answer is 1. A square has four sides.", ["4", "four"])  # past the first sentence
    assert not is_right("Let me think.\nTokyo", ["Tokyo"])
    assert not is_right("", ["Tokyo"])
    assert is_right("It is 3.5 km away. Or so.", ["3.5 km"])  # a decimal point ends no sentence


def test_factual_retained_is_the_share_of_the_base_s_right_answers_kept() -> None:
    questions = [FactualQuestion(f"f:{i}", q, (a,)) for i, (q, a) in
                 enumerate([("Capital of Japan?", "Tokyo"), ("2 plus 2?", "4"), ("Capital of Egypt?", "Cairo"),
                            ("5 plus 3?", "8")])]
    base = score(questions, ["Tokyo.", "It is 4.", "Cairo, of course.", "It is 9."])
    assert (base["right"], base["accuracy"]) == (3, 0.75)
    # Forgot two of the base's three, and got right one the base missed (that one does not count).
    tuned = score(questions, ["Tokyo.", "It is 5.", "Alexandria.", "It is 8."])
    kept = retention(base, tuned)
    assert kept["base_right"] == 3 and kept["retained"] == pytest.approx(1 / 3)
    assert kept["lost"] == ["2 plus 2?", "Capital of Egypt?"]
    assert retention(base, base)["retained"] == 1
    nothing_known = score(questions, ["?", "?", "?", "?"])
    assert retention(nothing_known, tuned) == {"base_right": 0, "retained": None, "lost": []}
    with pytest.raises(ValueError):
        retention(base, score(questions[:3], ["Tokyo.", "4", "Cairo"]))


def test_factual_set_is_answerable_fair_and_loads(tmp_path: Path) -> None:
    training_questions = {normalize(q) for pairs in QUESTIONS.values() for q, _ in pairs}
    assert len(F.FACTS) >= 50 and len({q for q, _ in F.FACTS}) == len(F.FACTS)
    for question, answers in F.FACTS:
        assert normalize(question) not in training_questions  # not taught by the function-calling data
        for answer in answers:  # echoing the question is never right
            assert f" {normalize(answer)} " not in f" {normalize(question)} ", (question, answer)
        assert is_right(f"The answer is {answers[0]}.", answers)
    path = F.write_factual(tmp_path)
    loaded = load_questions(path)
    assert [(q.question, q.answers, q.lang) for q in loaded] == [(q, a, "en") for q, a in F.FACTS]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q?", "answers": ["A"]}\n{"question": "", "answers": ["A"]}\n'
                   '{"question": "Q?", "answers": []}\n{nope\n')
    with pytest.raises(D.DataError) as failed:
        load_questions(bad)
    assert failed.value.problems == [
        f"{bad}:2: question: must be a non-empty string",
        f"{bad}:3: answers: must be a non-empty list of non-empty strings",
        f"{bad}:4: (line): bad JSON: Expecting property name enclosed in double quotes at column 2",
    ]


# ---------------------------------------------------------------- `tuneserve eval` on the tiny base


@pytest.fixture(scope="module")
def unchanged_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter as initialized (B = 0): the base's outputs exactly, so it forgets nothing."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(str(HF_DIR), dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def eval_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("eval")
    rows = generate("test", 60, unseen_tools=0.2)
    picked = [next(r for r in rows if r["meta"]["split"] == split) for split in sorted(SPLITS)]
    write_jsonl(tmp / "fc.jsonl", picked)
    facts = {q: a for q, a in F.FACTS}
    # Two the tiny base answers right, one it gets wrong ("1.5").
    chosen = ["What is the capital of Japan?", "What is the capital of Germany?", "What is 5 plus 3?"]
    write_jsonl(tmp / "factual.jsonl", [{"question": q, "answers": list(facts[q])} for q in chosen])
    write_jsonl(tmp / "general.jsonl", [{"text": "Rivers carry sand to the sea and build wide plains."}])
    return {"fc": tmp / "fc.jsonl", "factual": tmp / "factual.jsonl", "general": tmp / "general.jsonl"}


@pytest.fixture(scope="module")
def in_process(unchanged_adapter: Path, eval_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("out") / "eval.json"
    assert main([
        "eval", "--function-calling", str(eval_files["fc"]), "--general", str(eval_files["general"]),
        "--factual", str(eval_files["factual"]), "--adapter", f"same={unchanged_adapter}",
        "--max-new-tokens", "16", "--threads", "1", "--batch-size", "1", "--output", str(out),
    ]) == 0
    return dict(json.loads(out.read_text()))


def test_eval_reports_splits_and_factual_retention(in_process: dict[str, Any]) -> None:
    results = in_process["models"]
    assert in_process["factual_base_right"] == 2
    base, same = results["base"], results["same"]
    assert base["factual"]["accuracy"] == pytest.approx(2 / 3) and "factual_retained" not in base
    assert same["factual_retained"] == 1 and same["factual"]["base_right"] == 2 and same["factual"]["lost"] == []
    for result in (base, same):
        fc = result["function_calling"]
        assert list(fc["by_split"]) == ["seen_tools", "unseen_tools", "no_call", "multi_step"]
        assert all(sum(s["examples"] for s in g["by_language"].values()) == g["examples"] == 1 for g in fc["by_split"].values())
        for key in ("json_validity", "tool_name_accuracy", "exact_call_accuracy", "no_call_accuracy", "by_language", "by_kind"):
            assert key in fc, key  # the keys reported before stay
        assert result["general_perplexity"] > 1
    assert same["function_calling"] == base["function_calling"]  # an adapter that changes nothing
    assert same["perplexity_change_pct"] == pytest.approx(0, abs=1e-6)


def test_eval_without_the_base_still_measures_retention_against_it(
    unchanged_adapter: Path, eval_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", "--factual", str(eval_files["factual"]), "--adapter", f"same={unchanged_adapter}",
                 "--no-base", "--threads", "1", "--output", str(out)]) == 0
    assert "factual_kept" in capsys.readouterr().out
    results = json.loads(out.read_text())
    assert list(results["models"]) == ["same"] and results["factual_base_right"] == 2
    assert results["models"]["same"]["factual_retained"] == 1


@pytest.fixture(scope="module")
def f16_gateway() -> Iterator[ServerProcess]:
    """llama.cpp on the f16 GGUF, exact to the HF copy eval runs in process."""
    server = gateway("gw-generalization", {"model.gguf_path": DATA_DIR / "models" / MODEL / "model.f16.gguf"}).start()
    yield server
    server.stop()


def test_eval_through_the_gateway_reports_the_same_splits(
    f16_gateway: ServerProcess, in_process: dict[str, Any], eval_files: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "http.json"
    common = ["eval", "--base-url", f16_gateway.base_url, "--model", MODEL, "--function-calling", str(eval_files["fc"])]
    assert main([*common, "--max-new-tokens", "16", "--output", str(out)]) == 0
    assert f"{MODEL} [unseen_tools]" in capsys.readouterr().out
    over_http = json.loads(out.read_text())["models"][MODEL]["function_calling"]
    assert over_http["by_split"] == in_process["models"]["base"]["function_calling"]["by_split"]
    assert main([*common, "--factual", str(eval_files["factual"])]) == 2
    assert "--factual is for in-process evaluation" in capsys.readouterr().err
