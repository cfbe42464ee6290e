"""The store's cost on the gateway's hot path: what an adapter request reads from it.

`measure_store_latency(dsn)` times, per request, `Authenticator.authenticate` (header
parsing, the key's hash, one indexed lookup, a constant-time compare) and then the
adapter lookup of the request's `model` (the registry index's `acurrent`: on the
embedded default two small file reads, on PostgreSQL one indexed join), against the
embedded SQLite + file index and against the PostgreSQL at `dsn` (through the async
pool the gateway uses), the two alternating request by request so that the machine's
drift hits both alike. A base-model request does the key check only (reported too).
Goal: PostgreSQL adds <= 0.5 ms at p50 to an adapter request. benchmarks/scale_out.py calls it; run alone, it starts
a PostgreSQL like the tests do (or takes --dsn) and writes
benchmarks/results/scale_out_store.json.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common import summary_ms, write_result  # before the project imports: it puts the repo root on sys.path

from serving.auth import Authenticator
from tuneserve.adapters.registry_index import MANIFEST_FILE, AdapterManifest, FileIndex, RegistryIndex, index_for
from tuneserve.config import AuthConfig, StoreConfig
from tuneserve.db import Store
from tuneserve.db.postgres import PostgresStore, migrate
from tuneserve.db.sqlite import SQLiteStore, db_path
from tuneserve.tenants.store import TenantStore

GOAL_ADDED_P50_MS = 0.5


ADAPTER = "support"


async def _time(auth: Authenticator, index: RegistryIndex, header: str) -> tuple[float, float]:
    """(key check, key check + adapter lookup) of one request, in seconds."""
    started = time.perf_counter()
    principal = await auth.authenticate(header)
    checked = time.perf_counter()
    assert principal.tenant is not None
    manifest = await index.acurrent(principal.tenant, ADAPTER)
    done = time.perf_counter()
    assert manifest is not None
    return checked - started, done - started


def _store_adapter(index: RegistryIndex, tenant: str) -> None:
    """One current version, as a publish leaves it (the version dir's files on the
    file index; the rows on the database's)."""
    manifest = AdapterManifest(
        tenant=tenant, name=ADAPTER, version=1, rank=8, alpha=16.0, target_modules=["q_proj", "v_proj"],
        base="bench", sha256="0" * 64, size_bytes=1, created_at=datetime.now(timezone.utc), uid=secrets.token_hex(6),
    )
    if isinstance(index, FileIndex):
        version_dir = index.root / tenant / ADAPTER / "v1"
        version_dir.mkdir(parents=True)
        (version_dir / MANIFEST_FILE).write_text(manifest.model_dump_json())
    with index.writing(tenant) as writer:
        writer.publish(manifest)


async def _measure(
    stores: dict[str, Store], indexes: dict[str, RegistryIndex], requests: int, warmup: int
) -> dict[str, dict[str, list[float]]]:
    name = f"bench-{secrets.token_hex(4)}"  # the DSN's database may be shared: a tenant of our own
    auths, headers = {}, {}
    for backend, store in stores.items():
        tenants = TenantStore(store)
        headers[backend] = f"Bearer {tenants.create(name).api_key.get_secret_value()}"
        auths[backend] = Authenticator(AuthConfig(enabled=True), tenants)
        _store_adapter(indexes[backend], name)
    try:
        latencies: dict[str, dict[str, list[float]]] = {b: {"key": [], "adapter": []} for b in stores}
        order = list(stores)
        for i in range(warmup + requests):
            for backend in order if i % 2 == 0 else reversed(order):
                key_only, with_adapter = await _time(auths[backend], indexes[backend], headers[backend])
                if i >= warmup:
                    latencies[backend]["key"].append(key_only)
                    latencies[backend]["adapter"].append(with_adapter)
        return latencies
    finally:
        for backend, store in stores.items():
            TenantStore(store).delete(name)
            with indexes[backend].writing(name) as writer:
                writer.remove_tenant(name)
            await store.aclose()


def measure_store_latency(dsn: str, requests: int = 2000, warmup: int = 200) -> dict[str, Any]:
    """Per-request key verification latency, SQLite against PostgreSQL at `dsn` (migrated here)."""
    config = StoreConfig()
    migrate(dsn, config)
    with tempfile.TemporaryDirectory(prefix="tuneserve-bench-") as tmp:
        with SQLiteStore(db_path(Path(tmp))) as sqlite, PostgresStore(dsn, config) as postgres:
            indexes = {"sqlite": index_for(sqlite, Path(tmp) / "adapters"), "postgresql": index_for(postgres, Path(tmp))}
            latencies = asyncio.run(_measure({"sqlite": sqlite, "postgresql": postgres}, indexes, requests, warmup))
    # An adapter request: key check + adapter lookup (the goal's figure); a base request: the key check.
    result: dict[str, Any] = {backend: summary_ms(values["adapter"]) for backend, values in latencies.items()}
    result["key_check_only"] = {backend: summary_ms(values["key"]) for backend, values in latencies.items()}
    added = round(result["postgresql"]["p50_ms"] - result["sqlite"]["p50_ms"], 3)
    result["postgresql_added_p50_ms"] = added
    result["key_check_only"]["postgresql_added_p50_ms"] = round(
        result["key_check_only"]["postgresql"]["p50_ms"] - result["key_check_only"]["sqlite"]["p50_ms"], 3
    )
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
