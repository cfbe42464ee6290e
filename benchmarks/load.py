"""Load and soak: N concurrent streaming clients for a bounded time, mixing tenants and
their adapters with the base model, through a gateway this script starts (auth on,
tenants created with the CLI, adapters uploaded through the API).

Beside them, `--hostile-clients` loop over what a hostile client sends (an oversized
chunked upload, a broken archive, an adapter with a catastrophic-backtracking regex,
JSON nested 10,000 deep, a 5,000-digit integer, a lone surrogate, an unknown model, a
bad key): every answer must be its 4xx, never a 5xx, and must not grow the gateway.

Reports errors, end-to-end p50/p99, TTFT p50/p99 and tokens/s, the hostile probes'
statuses, and the gateway's RSS sampled over the run: start (after warm-up), end, max
and the least-squares slope. Goal: RSS stays flat over a 10-minute soak (end within 5%
of start after warm-up). Writes benchmarks/results/load-<engine>.json.

    python benchmarks/load.py                       # llama.cpp, 8 clients, 10 minutes
    python benchmarks/load.py --engine vllm --duration-s 120
    python benchmarks/load.py --dashboard-png docs/dashboard.png   # + Prometheus, drawn dashboard
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
from common import summary_ms, write_result  # before the project imports: it puts the repo root on sys.path

from tests.support.adapters import make_adapter, tar_gz_bytes
from tests.support.prometheus import Prometheus, bearer_token_file, host
from tests.support.servers import DATA_DIR, MODEL, ServerProcess, gateway, vllm_server

MODEL_DIR = DATA_DIR / "models" / MODEL
ADMIN_KEY = "load-benchmark-admin-key-0123456789"
METRICS_TOKEN = "load-benchmark-metrics-token-0123456789"  # with auth on, /metrics needs one
PROMPTS = (
    "Write one sentence about the sea.",
    "Name three primary colors.",
    "What is the capital of France?",
    "Give me a tip for learning to cook.",
)
RSS_FLAT_GOAL = 0.05


def cli(data_dir: Path, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "tuneserve.cli.main", *args],
        capture_output=True, text=True, check=True, env={"TUNESERVE_DATA_DIR": str(data_dir), "PATH": "/usr/bin:/bin"},
    )
    return out.stdout.strip()


class Stats:
    def __init__(self) -> None:
        self.latency: list[float] = []
        self.ttft: list[float] = []
        self.tokens = 0
        self.statuses: dict[str, int] = {}
        self.by_model: dict[str, int] = {}

    def count(self, status: str) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1


async def stream_chat(client: httpx.AsyncClient, key: str, model: str, prompt: str, max_tokens: int, stats: Stats) -> None:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as r:
            if r.status_code != 200:
                await r.aread()
                stats.count(str(r.status_code))
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    stats.count("stream_error")
                    return
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
                if first is None and any(c["delta"].get("content") for c in event.get("choices", [])):
                    first = time.perf_counter() - start
    except httpx.HTTPError as exc:
        stats.count(type(exc).__name__)
        return
    stats.count("200")
    stats.latency.append(time.perf_counter() - start)
    if first is not None:
        stats.ttft.append(first)
    stats.tokens += tokens
    stats.by_model[model] = stats.by_model.get(model, 0) + 1


async def client_loop(index: int, base_url: str, mix: list[tuple[str, str]], deadline: float, max_tokens: int, stats: Stats) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        i = index
        while time.monotonic() < deadline:
            key, model = mix[i % len(mix)]
            await stream_chat(client, key, model, PROMPTS[i % len(PROMPTS)], max_tokens, stats)
            i += 1


def hostile_probes(work: Path, adapter: Path, key: str) -> list[tuple[str, int, dict[str, Any]]]:
    """(probe, expected status, httpx request arguments). Each hostile client gets its
    own tenant's key: a tenant has one upload slot, and a 429 would hide the answer."""
    auth = {"Authorization": f"Bearer {key}"}
    regex_adapter = work / "regex-adapter"
    if not regex_adapter.exists():
        import shutil

        shutil.copytree(adapter, regex_adapter)
        config = json.loads((regex_adapter / "adapter_config.json").read_text())
        config["target_modules"] = r"(.*\.)*(.*)*(.*_proj)+(_)*$x"  # backtracks on every module name
        (regex_adapter / "adapter_config.json").write_text(json.dumps(config))
    boundary = "hostile-boundary"

    async def oversized() -> Any:  # async: an AsyncClient sends it chunked
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nhuge\r\n'.encode()
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'.encode()
        for _ in range(48):
            yield b"\0" * (1 << 20)
        yield f"\r\n--{boundary}--\r\n".encode()

    chat = "/v1/chat/completions"
    return [
        ("oversized_chunked_upload", 413, {"method": "POST", "url": "/v1/adapters", "content_factory": oversized,
                                           "headers": {**auth, "Content-Type": f"multipart/form-data; boundary={boundary}"}}),
        ("broken_archive", 400, {"method": "POST", "url": "/v1/adapters", "headers": auth, "data": {"name": "broken"},
                                 "files": {"file": ("a.tar.gz", b"\x1f\x8b not really gzip", "application/gzip")}}),
        ("catastrophic_regex_adapter", 400, {"method": "POST", "url": "/v1/adapters", "headers": auth, "data": {"name": "regex"},
                                             "files": {"file": ("a.tar.gz", tar_gz_bytes(regex_adapter), "application/gzip")}}),
        ("deep_json", 400, {"method": "POST", "url": chat, "headers": {**auth, "Content-Type": "application/json"},
                            "content": b'{"model": "' + MODEL.encode() + b'", "messages": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"}),
        ("huge_integer", 400, {"method": "POST", "url": chat, "headers": {**auth, "Content-Type": "application/json"},
                               "content": b'{"model": "' + MODEL.encode() + b'", "max_tokens": ' + b"9" * 5000 + b', "messages": []}'}),
        ("lone_surrogate", 400, {"method": "POST", "url": chat, "headers": {**auth, "Content-Type": "application/json"},
                                 "content": b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\\ud800"}]}'}),
        ("unknown_model", 404, {"method": "POST", "url": chat, "headers": auth,
                                "json": {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}}),
        ("bad_key", 401, {"method": "POST", "url": chat, "headers": {"Authorization": "Bearer ts-not-a-key"},
                          "json": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}}),
    ]


async def hostile_loop(base_url: str, probes: list[tuple[str, int, dict[str, Any]]], deadline: float, seen: dict[str, dict[str, int]]) -> None:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as client:
        i = 0
        while time.monotonic() < deadline:
            name, expected, request = probes[i % len(probes)]
            options = dict(request)
            factory = options.pop("content_factory", None)
            if factory is not None:
                options["content"] = factory()
            try:
                status = str((await client.request(**options)).status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            counts = seen.setdefault(name, {})
            counts[status] = counts.get(status, 0) + 1
            if status != str(expected):
                counts["unexpected"] = counts.get("unexpected", 0) + 1
            i += 1


async def sample_rss(pid: int, deadline: float, every_s: float, samples: list[tuple[float, float]], t0: float) -> None:
    process = psutil.Process(pid)
    while time.monotonic() < deadline:
        samples.append((time.monotonic() - t0, process.memory_info().rss / 2**20))
        await asyncio.sleep(every_s)
    samples.append((time.monotonic() - t0, process.memory_info().rss / 2**20))


def rss_summary(samples: list[tuple[float, float]], warmup_s: float) -> dict[str, Any]:
    steady = [(t, m) for t, m in samples if t >= warmup_s] or samples
    ts, ms = [t for t, _ in steady], [m for _, m in steady]
    slope = statistics.linear_regression(ts, ms).slope * 60 if len(steady) > 1 else 0.0
    start, end = ms[0], ms[-1]
    return {
        "warmup_s": warmup_s,
        "start_mib": round(start, 1),
        "end_mib": round(end, 1),
        "max_mib": round(max(ms), 1),
        "growth": round((end - start) / start, 4),
        "slope_mib_per_min": round(slope, 3),
        "flat": abs(end - start) / start <= RSS_FLAT_GOAL,
        "samples": [[round(t, 1), round(m, 1)] for t, m in samples],
    }


async def warm_up(base_url: str, mix: list[tuple[str, str]], max_tokens: int) -> Stats:
    """One request per tenant and model first, so every adapter is loaded before RSS is watched."""
    stats = Stats()
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        for key, model in mix:
            await stream_chat(client, key, model, PROMPTS[0], max_tokens, stats)
    if stats.statuses.get("200") != len(mix):
        raise RuntimeError(f"warm-up requests failed: {stats.statuses}")
    return stats


async def drive(
    base_url: str, pid: int, mix: list[tuple[str, str]], probes: list[list[tuple[str, int, dict[str, Any]]]], args: argparse.Namespace
) -> dict[str, Any]:
    await warm_up(base_url, mix, args.max_tokens)
    stats = Stats()
    samples: list[tuple[float, float]] = []
    hostile: dict[str, dict[str, int]] = {}
    load_before = os.getloadavg()
    t0 = time.monotonic()
    deadline = t0 + args.duration_s
    await asyncio.gather(
        sample_rss(pid, deadline, args.rss_every_s, samples, t0),
        *(client_loop(i, base_url, mix, deadline, args.max_tokens, stats) for i in range(args.clients)),
        *(hostile_loop(base_url, client_probes, deadline, hostile) for client_probes in probes),
    )
    elapsed = time.monotonic() - t0
    ok = stats.statuses.get("200", 0)
    return {
        "requests": sum(stats.statuses.values()),
        "ok": ok,
        "errors": {k: v for k, v in stats.statuses.items() if k != "200"},
        "error_rate": round(1 - ok / max(1, sum(stats.statuses.values())), 4),
        "latency": summary_ms(stats.latency) if stats.latency else None,
        "ttft": summary_ms(stats.ttft) if stats.ttft else None,
        "tokens_per_s": round(stats.tokens / elapsed, 2),
        "requests_per_s": round(ok / elapsed, 3),
        "requests_by_model": stats.by_model,
        "elapsed_s": round(elapsed, 1),
        # Other work on the machine: the benchmark shares the CPU with it.
        "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "hostile": {
            "probes": hostile,
            "unexpected": sum(counts.get("unexpected", 0) for counts in hostile.values()),
            "server_errors": sum(v for counts in hostile.values() for k, v in counts.items() if k.startswith("5")),
        },
        "gateway_rss": rss_summary(samples, args.warmup_s),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["llamacpp", "vllm"], default="llamacpp")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration-s", type=float, default=600)
    parser.add_argument("--warmup-s", type=float, default=60, help="RSS start is taken after this")
    parser.add_argument("--tenants", type=int, default=2)
    parser.add_argument("--adapters-per-tenant", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rss-every-s", type=float, default=5)
    parser.add_argument("--hostile-clients", type=int, default=2, help="clients sending only hostile probes")
    parser.add_argument("--dashboard-png", type=Path, help="scrape with Prometheus and draw the dashboard here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="tuneserve-load-") as tmp:
        work = Path(tmp)
        data_dir = work / "data"
        data_dir.mkdir()
        tenants = {f"tenant{i}": cli(data_dir, "tenants", "create", f"tenant{i}") for i in range(args.tenants)}
        settings: dict[str, Any] = {
            "data_dir": data_dir,
            "model.hf_path": MODEL_DIR / "hf",
            "model.gguf_path": MODEL_DIR / "model.gguf",
            "auth.enabled": "true",
            "auth.admin_key": ADMIN_KEY,
            "server.metrics.token_file": work / "metrics-token",
            # The adapters here are about 10 MB; the hostile oversized upload sends 48 MiB.
            "adapters.max_bytes": 32 << 20,
        }
        (work / "metrics-token").write_text(METRICS_TOKEN)
        vllm: ServerProcess | None = None
        if args.engine == "vllm":
            vllm = vllm_server().start(timeout_s=600)
            settings |= {"engines.vllm.enabled": "true", "engines.vllm.url": vllm.base_url}
        server = gateway("gw-load", settings, env={"TUNESERVE_DATA_DIR": str(data_dir)}).start(ready_path="/ready")
        prometheus: Prometheus | None = None
        try:
            if args.dashboard_png:
                (work / "prom").mkdir()
                targets = {"gateway": [host(server)], **({"vllm": [host(vllm)]} if vllm else {})}
                jobs = {"gateway": bearer_token_file(work / "metrics-token")}
                prometheus = Prometheus(work / "prom", targets, interval="2s", jobs=jobs).start()
            started = time.time()
            mix: list[tuple[str, str]] = []
            for t, (tenant, key) in enumerate(tenants.items()):
                mix.append((key, MODEL))
                for a in range(args.adapters_per_tenant):
                    name = f"a{a}"
                    make_adapter(work / tenant / name, seed=1000 + 10 * t + a)
                    r = httpx.post(
                        server.base_url + "/v1/adapters", headers={"Authorization": f"Bearer {key}"},
                        data={"name": name}, files={"file": ("a.tar.gz", tar_gz_bytes(work / tenant / name), "application/gzip")},
                        timeout=300,
                    )
                    r.raise_for_status()
                    mix.append((key, name))
            assert server.process is not None
            keys = list(tenants.values())
            probes = [hostile_probes(work, work / "tenant0" / "a0", keys[i % len(keys)]) for i in range(args.hostile_clients)]
            result = asyncio.run(drive(server.base_url, server.process.pid, mix, probes, args))
            if prometheus is not None:
                from scripts.dashboard_png import render

                time.sleep(5)
                render(prometheus.url, args.dashboard_png, started, time.time(), title=(
                    f"tuneserve dashboard, benchmarks/load.py: {args.clients} streaming clients, {args.engine}, "
                    f"{args.tenants} tenants x (base + {args.adapters_per_tenant} adapters), {args.duration_s:.0f} s"
                ))
                result["dashboard_png"] = str(args.dashboard_png)
        finally:
            if prometheus is not None:
                prometheus.stop()
            server.stop()
            if vllm is not None:
                vllm.stop()
    write_result(
        f"load-{args.engine}",
        {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "mix": f"{args.tenants} tenants x (base + {args.adapters_per_tenant} adapters), round-robin per client",
            "goal": f"gateway RSS end within {RSS_FLAT_GOAL:.0%} of its start after warm-up",
            **result,
        },
    )


if __name__ == "__main__":
    main()
