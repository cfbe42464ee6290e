"""CPU engine efficiency: generation tokens/s through the gateway vs raw llama-cpp-python,
same GGUF, same prompt, same greedy sampling. Goal: ratio >= 0.9.
Writes benchmarks/results/cpu_engine.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx

from common import write_result  # noqa: E402  (sets sys.path)
from serving.prompting import ChatTemplate
from tests.conftest import MODEL
from tests.servers import DATA_DIR, gateway

MESSAGES = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]


def raw_llama(max_tokens: int, runs: int, threads: int | None) -> list[float]:
    import os

    from llama_cpp import Llama

    model_dir = DATA_DIR / "models" / MODEL
    llama = Llama(model_path=str(model_dir / "model.gguf"), n_ctx=2048, n_threads=threads or os.cpu_count(), verbose=False)
    text = ChatTemplate.from_hf_dir(model_dir / "hf").render(MESSAGES)
    tokens = llama.tokenize(text.encode(), add_bos=False, special=True)
    rates = []
    for _ in range(runs + 1):
        llama.reset()
        start = time.perf_counter()
        n = 0
        for token in llama.generate(tokens, temp=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0):
            n += 1
            llama.detokenize([token])
            if n >= max_tokens:
                break
        rates.append(n / (time.perf_counter() - start))
    llama.close()
    return rates[1:]  # first run warms caches


def through_gateway(base: str, max_tokens: int, runs: int) -> list[float]:
    rates = []
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    for _ in range(runs + 1):
        start = time.perf_counter()
        tokens = 0
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=300) as r:
            for line in r.iter_lines():
                if '"usage":{' in line:
                    tokens = int(line.split('"completion_tokens":')[1].split(",")[0].rstrip("}"))
        rates.append(tokens / (time.perf_counter() - start))
    return rates[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    raw = raw_llama(args.max_tokens, args.runs, None)
    gw = gateway("bench-cpu", {}).start()
    try:
        served = through_gateway(gw.base_url, args.max_tokens, args.runs)
    finally:
        gw.stop()
    raw_median, gw_median = statistics.median(raw), statistics.median(served)
    ratio = gw_median / raw_median
    write_result("cpu_engine", {
        "setup": f"llama-cpp-python 0.3.36, {MODEL} GGUF from `make prepare`, greedy, {args.max_tokens} tokens, "
                 "gateway timed end to end over HTTP streaming (prompt included, as raw)",
        "raw_tokens_per_s": [round(r, 2) for r in raw],
        "gateway_tokens_per_s": [round(r, 2) for r in served],
        "raw_median": round(raw_median, 2),
        "gateway_median": round(gw_median, 2),
        "ratio": round(ratio, 4),
        "goal_ratio": 0.9,
        "meets_goal": ratio >= 0.9,
    })


if __name__ == "__main__":
    main()
