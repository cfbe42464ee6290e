"""Adapter-affinity routing across vLLM replicas, for benchmarks/scale_out.py.

`simulate_affinity`: the gateway's real picker (serving/engines/replica_picker.py:
rendezvous hashing bounded by load) against round robin, on a request stream over 32
adapters of Zipf popularity and 2 replicas, each holding vLLM's LRU of max_cpu_loras
adapters. A request "hits" when its adapter is in its replica's LRU; a miss is a cold
load (vLLM reads the adapter from disk and evicts the least recently used one).
Requests arrive one per tick and last an exponential time, so the replicas carry real
in-flight load and bounded load has something to bound. Goals (issue 19): >= 90% of
requests land where their adapter is loaded, and >= 5x fewer cold loads than round robin.

`measure_throughput`: completion tokens/s of one gateway over replica lists (1 vs 2
vLLM replicas), with concurrent base-model requests.

Run alone: .venv/bin/python benchmarks/scale_out_routing.py [--replicas URL ...]
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import random
import tempfile
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence

import common  # noqa: F401 - puts the repo root on sys.path, before the project imports

from serving.engines.replica_picker import ReplicaLoad, pick, preference_order

RoutingPolicy = Callable[[str, list[int], int], int]


def zipf_weights(count: int, exponent: float) -> list[float]:
    raw = [1 / (rank**exponent) for rank in range(1, count + 1)]
    total = sum(raw)
    return [w / total for w in raw]


class LRU:
    """vLLM's CPU LoRA cache: max_cpu_loras adapters, least recently used evicted."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, None] = OrderedDict()

    def use(self, adapter: str) -> bool:
        """True when `adapter` was already loaded (a hit)."""
        hit = adapter in self._entries
        if hit:
            self._entries.move_to_end(adapter)
        else:
            self._entries[adapter] = None
            if len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return hit


def _run(
    policy: str,
    stream: Sequence[tuple[str, float]],
    replicas: list[str],
    max_cpu_loras: int,
    epsilon: float,
) -> dict[str, Any]:
    caches = [LRU(max_cpu_loras) for _ in replicas]
    loads = [0] * len(replicas)
    ending: list[tuple[float, int]] = []  # (end tick, replica)
    hits = 0
    decisions: Counter[str] = Counter()
    per_replica = [0] * len(replicas)
    for tick, (adapter, duration) in enumerate(stream):
        while ending and ending[0][0] <= tick:
            loads[heapq.heappop(ending)[1]] -= 1
        if policy == "round_robin":
            index = tick % len(replicas)
        else:
            order = pick(adapter, [ReplicaLoad(r, n) for r, n in zip(replicas, loads)], epsilon)
            index = replicas.index(order[0])
            decisions["affinity" if order[0] == preference_order(adapter, replicas)[0] else "spill"] += 1
        hits += caches[index].use(adapter)
        loads[index] += 1
        per_replica[index] += 1
        heapq.heappush(ending, (tick + duration, index))
    requests = len(stream)
    return {
        "hit_rate": round(hits / requests, 4),
        "cold_loads": requests - hits,
        "requests_per_replica": per_replica,
        # 1.0 = perfectly even; what bounded load keeps close to 1 + epsilon at worst.
        "max_over_mean_requests": round(max(per_replica) / (requests / len(replicas)), 4),
        **({"decisions": dict(decisions)} if decisions else {}),
    }


def simulate_affinity(
    adapters: int = 32,
    replicas: int = 2,
    max_cpu_loras: int = 20,
    requests: int = 20000,
    zipf_exponent: float = 1.0,
    mean_in_flight: float = 32.0,
    epsilon: float = 0.5,
    seed: int = 19,
) -> dict[str, Any]:
    """Rendezvous + bounded load against round robin on the same request stream.

    `max_cpu_loras` 20: each replica holds its own share of the 32 (16 under affinity)
    with room for the adapters bounded load spills to it, while round robin makes each
    hold every adapter. At exactly 16 spills evict owned adapters: 4.2x fewer cold loads
    than round robin at epsilon 0.5 (the epsilon_sweep and README show both).
    With 8 (16 slots for 32 adapters) no routing can reach 90%: the 16 most popular hold
    only ~83% of a Zipf(1) stream. `mean_in_flight`: requests in flight over the whole
    cluster on average (Little's law: one arrival per tick times the mean duration).
    """
    rng = random.Random(seed)
    # Versioned engine names, as the gateway hashes them (tenant--name--vN--uid).
    names = [f"tenant{i % 8}--adapter{i}--v1--{rng.getrandbits(32):08x}" for i in range(adapters)]
    weights = zipf_weights(adapters, zipf_exponent)
    chosen = rng.choices(names, weights=weights, k=requests)
    stream = [(name, rng.expovariate(1 / mean_in_flight)) for name in chosen]
    urls = [f"http://10.0.0.{i + 1}:8000" for i in range(replicas)]
    affinity = _run("rendezvous_bounded_load", stream, urls, max_cpu_loras, epsilon)
    round_robin = _run("round_robin", stream, urls, max_cpu_loras, epsilon)
    ratio = round_robin["cold_loads"] / max(1, affinity["cold_loads"])
    # The trade-off epsilon sets: a tighter bound spills more, and a spilled request
    # is often a cold load on the next replica (llm-d #709's thrash, bounded).
    sweep = {}
    for other in sorted({0.0, 0.25, 0.5, 1.0, epsilon}):
        run = _run("rendezvous_bounded_load", stream, urls, max_cpu_loras, other)
        sweep[str(other)] = {
            "hit_rate": run["hit_rate"],
            "cold_loads": run["cold_loads"],
            "cold_load_ratio_round_robin_over_affinity": round(round_robin["cold_loads"] / max(1, run["cold_loads"]), 2),
            "max_over_mean_requests": run["max_over_mean_requests"],
        }
    return {
        "setup": {
            "adapters": adapters,
            "replicas": replicas,
            "max_cpu_loras": max_cpu_loras,
            "requests": requests,
            "zipf_exponent": zipf_exponent,
            "top_adapter_share": round(weights[0], 4),
            "mean_in_flight": mean_in_flight,
            "load_bound_epsilon": epsilon,
            "seed": seed,
        },
        "rendezvous_bounded_load": affinity,
        "round_robin": round_robin,
        "cold_load_ratio_round_robin_over_affinity": round(ratio, 2),
        "epsilon_sweep": sweep,
        "goals": {
            "hit_rate_at_least_0_90": affinity["hit_rate"] >= 0.90,
            "cold_loads_at_least_5x_fewer": ratio >= 5,
        },
    }


# -- real replicas


def _gateway_over(urls: Sequence[str], data_dir: Path) -> Any:
    from tests.support.servers import DATA_DIR, MODEL, gateway
    from tuneserve.models.prepare import GGUF_NAME

    model_dir = DATA_DIR / "models" / MODEL
    return gateway(
        f"gw-scale-out-{len(urls)}",
        {
            "data_dir": data_dir,
            "model.hf_path": model_dir / "hf",
            "model.gguf_path": model_dir / GGUF_NAME,
            "engines.vllm.enabled": "true",
            "engines.vllm.replicas": json.dumps(list(urls)),
            "engines.vllm.health_interval_s": 0.5,
        },
    )


async def _drive(base_url: str, model: str, requests: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    counter = itertools.count()
    tokens = 0
    backends: Counter[str] = Counter()

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while next(counter) < requests:
            r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]
            backends[r.headers.get("x-tuneserve-backend", "?")] += 1

    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {
        "requests": requests,
        "completion_tokens": tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(tokens / elapsed, 2),
        "backends": dict(backends),
    }


def measure_throughput(
    urls_1: Sequence[str],
    urls_2: Sequence[str],
    requests: int = 32,
    concurrency: int = 8,
    max_tokens: int = 32,
) -> dict[str, Any]:
    """Completion tokens/s through one gateway over `urls_1` (one replica) and `urls_2`
    (two), each after a warm-up; on a 2-core machine the cores, not routing, bound it."""
    from tests.support.servers import MODEL

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, urls in (("one_replica", urls_1), ("two_replicas", urls_2)):
            server = _gateway_over(urls, Path(tmp) / label).start(ready_path="/ready", timeout_s=120)
            try:
                asyncio.run(_drive(server.base_url, MODEL, concurrency, concurrency, 4))  # warm-up
                results[label] = {"replicas": list(urls), **asyncio.run(
                    _drive(server.base_url, MODEL, requests, concurrency, max_tokens)
                )}
            finally:
                server.stop()
    one, two = results["one_replica"]["tokens_per_s"], results["two_replicas"]["tokens_per_s"]
    results["speedup_two_over_one"] = round(two / one, 3) if one else None
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", nargs="*", default=[], help="two vLLM URLs for the throughput part")
    args = parser.parse_args()
    result: dict[str, Any] = {"affinity": simulate_affinity()}
    if len(args.replicas) >= 2:
        result["throughput"] = measure_throughput(args.replicas[:1], args.replicas[:2])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
