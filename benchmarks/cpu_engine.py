"""CPU engine efficiency: generation tokens/s through the gateway vs raw llama-cpp-python,
same GGUF, same prompt, same greedy sampling. Goal: ratio >= 0.9.
Writes benchmarks/results/cpu_engine.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx
from common import alternating_rounds, write_result  # before the project imports: it puts the repo root on sys.path

from tests.support.servers import DATA_DIR, MODEL, gateway
from tuneserve.gguf.llama_loader import load_llama
from tuneserve.models.chat_template import ChatTemplate

MESSAGES = [{"role": "user", "content": "Count from 1 to 1000, separated by commas."}]


class RawLlama:
    """llama-cpp-python alone, generating as the engine does (token by token, detokenized)."""

    def __init__(self, threads: int | None) -> None:
        import os

        model_dir = DATA_DIR / "models" / MODEL
        self.llama = load_llama(model_dir / "model.gguf", n_ctx=2048, n_threads=threads or os.cpu_count())
        text = ChatTemplate.from_hf_dir(model_dir / "hf").render(MESSAGES)
        self.tokens = self.llama.tokenize(text.encode(), add_bos=False, special=True)

    def rate(self, max_tokens: int) -> float:
        self.llama.reset()
        start = time.perf_counter()
        n = 0
        for token in self.llama.generate(self.tokens, temp=0.0, top_k=0, min_p=0.0, repeat_penalty=1.0):
            n += 1
            self.llama.detokenize([token])
            if n >= max_tokens:
                break
        return n / (time.perf_counter() - start)

    def close(self) -> None:
        self.llama.close()


def gateway_rate(base: str, max_tokens: int) -> float:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    tokens = 0
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if '"usage":{' in line:
                tokens = int(line.split('"completion_tokens":')[1].split(",")[0].rstrip("}"))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=11, help="rounds of one raw and one gateway run")
    args = parser.parse_args()

    raw = RawLlama(None)
    gw = gateway("bench-cpu", {}).start()
    try:
        raw.rate(args.max_tokens), gateway_rate(gw.base_url, args.max_tokens)  # warm caches
        rounds, ratio = alternating_rounds({
            "raw": lambda: round(raw.rate(args.max_tokens), 2),
            "gateway": lambda: round(gateway_rate(gw.base_url, args.max_tokens), 2),
        }, args.rounds)
    finally:
        gw.stop()
        raw.close()
    write_result("cpu_engine", {
        "setup": f"llama-cpp-python 0.3.36, {MODEL} GGUF from `make prepare`, greedy, {args.max_tokens} tokens, "
                 "gateway timed end to end over HTTP streaming (prompt included, as raw); rounds of a raw and a "
                 "gateway run in alternating order",
        "rounds": rounds,
        "raw_median": statistics.median(r["raw"] for r in rounds),
        "gateway_median": statistics.median(r["gateway"] for r in rounds),
        "ratio": round(ratio, 4),
        "ratio_is": "median of the rounds' gateway/raw tokens/s",
        "goal_ratio": 0.9,
        "meets_goal": ratio >= 0.9,
    })


if __name__ == "__main__":
    main()
