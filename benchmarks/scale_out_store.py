"""The store's cost on the gateway's hot path: API key verification, once per request.

`measure_store_latency(dsn)` times `Authenticator.authenticate` (header parsing, the
key's hash, one indexed lookup, a constant-time compare) against the embedded SQLite
and against the PostgreSQL at `dsn` (through the async pool the gateway uses), the two
alternating request by request so that the machine's drift hits both alike. Goal:
PostgreSQL adds <= 0.5 ms at p50. benchmarks/scale_out.py calls it; run alone, it starts
a PostgreSQL like the tests do (or takes --dsn) and writes
benchmarks/results/scale_out_store.json.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from common import summary_ms, write_result  # before the project imports: it puts the repo root on sys.path

from serving.auth import Authenticator
from tuneserve.config import AuthConfig, StoreConfig
from tuneserve.db import Store
from tuneserve.db.postgres import PostgresStore, migrate
from tuneserve.db.sqlite import SQLiteStore, db_path
from tuneserve.tenants.store import TenantStore

GOAL_ADDED_P50_MS = 0.5


async def _time(auth: Authenticator, header: str) -> float:
    started = time.perf_counter()
    principal = await auth.authenticate(header)
    elapsed = time.perf_counter() - started
    assert principal.tenant is not None
    return elapsed


async def _measure(stores: dict[str, Store], requests: int, warmup: int) -> dict[str, list[float]]:
    name = f"bench-{secrets.token_hex(4)}"  # the DSN's database may be shared: a tenant of our own
    auths, headers = {}, {}
    for backend, store in stores.items():
        tenants = TenantStore(store)
        headers[backend] = f"Bearer {tenants.create(name).api_key.get_secret_value()}"
        auths[backend] = Authenticator(AuthConfig(enabled=True), tenants)
    try:
        latencies: dict[str, list[float]] = {backend: [] for backend in stores}
        order = list(stores)
        for index in range(warmup + requests):
            for backend in order if index % 2 == 0 else reversed(order):
                elapsed = await _time(auths[backend], headers[backend])
                if index >= warmup:
                    latencies[backend].append(elapsed)
        return latencies
    finally:
        for store in stores.values():
            TenantStore(store).delete(name)
            await store.aclose()


def measure_store_latency(dsn: str, requests: int = 2000, warmup: int = 200) -> dict[str, Any]:
    """Per-request key verification latency, SQLite against PostgreSQL at `dsn` (migrated here)."""
    config = StoreConfig()
    migrate(dsn, config)
    with tempfile.TemporaryDirectory(prefix="tuneserve-bench-") as tmp:
        with SQLiteStore(db_path(Path(tmp))) as sqlite, PostgresStore(dsn, config) as postgres:
            latencies = asyncio.run(_measure({"sqlite": sqlite, "postgresql": postgres}, requests, warmup))
    result: dict[str, Any] = {backend: summary_ms(values) for backend, values in latencies.items()}
    added = round(result["postgresql"]["p50_ms"] - result["sqlite"]["p50_ms"], 3)
    result["postgresql_added_p50_ms"] = added
    result["goal_added_p50_ms"] = GOAL_ADDED_P50_MS
    result["goal_met"] = added <= GOAL_ADDED_P50_MS
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dsn", help="a PostgreSQL to measure (default: start one like the tests do)")
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    if args.dsn:
        result = measure_store_latency(args.dsn, args.requests)
    else:
        from tests.support.postgres_server import start_postgres

        server = start_postgres()
        try:
            result = measure_store_latency(server.create_database("bench"), args.requests)
        finally:
            server.stop()
    write_result("scale_out_store", {"store_latency": result})


if __name__ == "__main__":
    main()
