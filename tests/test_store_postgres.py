"""The PostgreSQL store, on a real server (tests/support/postgres_server.py): explicit,
concurrent-safe migrations, schema refusals, store.url_file, clear connection errors,
and a key rotated or revoked through one gateway refused by another at once.

The CLI runs as a subprocess, as an operator runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from serving.auth import Authenticator
from serving.errors import StoreUnavailable, Unauthorized
from tests.support.adapters import HF_DIR
from tests.support.postgres_server import migrated_store, start_postgres
from tests.support.servers import ROOT
from tuneserve.config import AuthConfig, StoreConfig, load_settings
from tuneserve.db import StoreError, open_store
from tuneserve.db.migrations import POSTGRESQL
from tuneserve.db.postgres import PostgresStore, migrate
from tuneserve.models.prepare import GGUF_NAME
from tuneserve.tenants.store import TenantStore


def tuneserve(*args: str, data_dir: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TUNESERVE_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "tuneserve.cli.main", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
    )


def schema_of_release(dsn: str, version: int) -> None:
    """The schema an older release's `db migrate` left: its first `version` migrations."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER NOT NULL)")
        conn.execute("INSERT INTO schema_version VALUES (1, %s)", (version,))
        for statements in POSTGRESQL[:version]:
            for statement in statements:
                conn.execute(statement)


def set_version(dsn: str, version: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (version,))


def test_two_concurrent_migrations_give_one_schema(postgres_dsn: str, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "tuneserve.cli.main", "db", "migrate", "--store.url", postgres_dsn]
    env = {**os.environ, "TUNESERVE_DATA_DIR": str(tmp_path)}
    racers = [
        subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [racer.communicate(timeout=120) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], outputs
    reports = sorted((json.loads(out)["from"], json.loads(out)["to"]) for out, _ in outputs)
    # The lock made one apply everything and the other find it done.
    assert reports == [(0, len(POSTGRESQL)), (len(POSTGRESQL), len(POSTGRESQL))]
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(len(POSTGRESQL),)]
        columns = {row[0] for row in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'jobs'"
        )}
    assert {"owner", "lease_expires_at"} <= columns

    status = tuneserve("db", "status", "--store.url", postgres_dsn, data_dir=tmp_path)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)
    assert (shown["backend"], shown["version"], shown["state"]) == ("postgresql", len(POSTGRESQL), "current")
    assert shown["database"].startswith("postgresql://postgres@127.0.0.1:")


def test_an_older_schema_is_refused_until_migrated(postgres_dsn: str, tmp_path: Path) -> None:
    """Nothing but `tuneserve db migrate` changes a PostgreSQL schema."""
    listed = tuneserve("tenants", "list", "--store.url", postgres_dsn, data_dir=tmp_path)
    assert listed.returncode == 2 and "Traceback" not in listed.stderr
    assert "schema version 0, older than this tuneserve needs" in listed.stderr
    assert "run `tuneserve db migrate`" in listed.stderr

    status = tuneserve("db", "status", "--store.url", postgres_dsn, data_dir=tmp_path)
    assert status.returncode == 1 and json.loads(status.stdout)["state"] == "behind"

    schema_of_release(postgres_dsn, len(POSTGRESQL) - 1)
    settings = load_settings(overrides={"store.url": postgres_dsn, "data_dir": str(tmp_path)}, environ={})
    with pytest.raises(StoreError, match=f"version {len(POSTGRESQL) - 1}, older .* run `tuneserve db migrate`"):
        open_store(settings)
    migrated = tuneserve("db", "migrate", "--store.url", postgres_dsn, data_dir=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    # Only the missing migration ran (the tables it does not add were there already).
    assert json.loads(migrated.stdout)["from"] == len(POSTGRESQL) - 1
    with open_store(settings) as store:
        assert store.schema_version() == len(POSTGRESQL)


def test_the_gateway_refuses_a_schema_it_does_not_know(postgres_dsn: str, tmp_path: Path) -> None:
    from serving.access import Tenancy

    migrate(postgres_dsn, StoreConfig())
    set_version(postgres_dsn, len(POSTGRESQL) + 1)  # a newer tuneserve migrated it
    settings = load_settings(
        overrides={"store.url": postgres_dsn, "data_dir": str(tmp_path), "auth.enabled": True}, environ={}
    )
    with pytest.raises(StoreError, match="newer than this tuneserve knows .*; upgrade tuneserve"):
        Tenancy.from_settings(settings)
    refused = tuneserve("db", "migrate", "--store.url", postgres_dsn, data_dir=tmp_path)
    assert refused.returncode == 2 and "upgrade tuneserve" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_serve_exits_with_the_schema_error(postgres_dsn: str, tmp_path: Path) -> None:
    """The real `tuneserve serve` on an unmigrated database: a clear error, exit 2."""
    served = tuneserve(
        "serve", "--store.url", postgres_dsn, "--server.port", "1",
        "--model.hf_path", str(HF_DIR), "--model.gguf_path", str(HF_DIR.parent / GGUF_NAME),
        data_dir=tmp_path, timeout=300,
    )
    assert served.returncode == 2, served.stderr[-3000:]
    assert "run `tuneserve db migrate`" in served.stderr and "Traceback" not in served.stderr


def test_store_url_from_a_file(postgres_dsn: str, tmp_path: Path) -> None:
    migrate(postgres_dsn, StoreConfig())
    secret = tmp_path / "store-url"
    secret.write_text(postgres_dsn + "\n")  # as a mounted Secret holds it, newline and all
    created = tuneserve("tenants", "create", "acme", "--store.url_file", str(secret), data_dir=tmp_path / "d")
    assert created.returncode == 0, created.stderr
    with migrated_store(postgres_dsn) as store:
        assert [t.name for t in TenantStore(store).list()] == ["acme"]
    assert not (tmp_path / "d" / "tuneserve.db").exists()  # no SQLite beside it

    both = tuneserve(
        "tenants", "list", "--store.url_file", str(secret), "--store.url", postgres_dsn, data_dir=tmp_path
    )
    assert both.returncode == 2 and "set store.url or store.url_file, not both" in both.stderr
    missing = tuneserve("tenants", "list", "--store.url_file", str(tmp_path / "nope"), data_dir=tmp_path)
    assert missing.returncode == 2 and "cannot read store.url_file" in missing.stderr
    secret.write_text("hunter2-not-a-url")
    wrong = tuneserve("tenants", "list", "--store.url_file", str(secret), data_dir=tmp_path)
    assert wrong.returncode == 2 and "does not hold a sqlite:/// or postgresql:// URL" in wrong.stderr
    assert "hunter2" not in wrong.stderr  # the file's content is never echoed


def test_unreachable_database_is_a_clear_cli_error(postgres_server, tmp_path: Path) -> None:
    from tests.support.servers import free_port

    refused = f"postgresql://tuneserve:s3cret-pw@127.0.0.1:{free_port()}/nope"
    for args in (("tenants", "list"), ("db", "migrate"), ("jobs", "list")):
        done = tuneserve(*args, "--store.url", refused, data_dir=tmp_path)
        assert done.returncode == 2 and done.stdout == "", (args, done.stderr)
        assert "cannot connect to postgresql://tuneserve@127.0.0.1:" in done.stderr
        assert "Traceback" not in done.stderr and "s3cret-pw" not in done.stderr
    unknown_db = tuneserve("tenants", "list", "--store.url", postgres_server.dsn("no_such_db"), data_dir=tmp_path)
    assert unknown_db.returncode == 2 and 'database "no_such_db" does not exist' in unknown_db.stderr


async def test_a_key_rotated_or_revoked_on_one_gateway_is_refused_by_the_other(postgres_dsn: str) -> None:
    """Two gateways (an Authenticator and its store each) on one PostgreSQL."""
    config = AuthConfig(enabled=True)
    with migrated_store(postgres_dsn) as store_a, migrated_store(postgres_dsn) as store_b:
        tenants_a, tenants_b = TenantStore(store_a), TenantStore(store_b)
        gateway_a, gateway_b = Authenticator(config, tenants_a), Authenticator(config, tenants_b)
        key = tenants_a.create("acme").api_key.get_secret_value()
        for gateway in (gateway_a, gateway_b):
            assert (await gateway.authenticate(f"Bearer {key}")).tenant == "acme"

        new_key = tenants_a.rotate("acme").api_key.get_secret_value()
        with pytest.raises(Unauthorized):
            await gateway_b.authenticate(f"Bearer {key}")
        assert (await gateway_b.authenticate(f"Bearer {new_key}")).tenant == "acme"

        tenants_b.delete("acme")  # revoked through the other one, this time
        for gateway in (gateway_a, gateway_b):
            with pytest.raises(Unauthorized):
                await gateway.authenticate(f"Bearer {new_key}")
        await store_a.aclose()
        await store_b.aclose()


async def test_key_hashes_are_bytea_and_lookups_use_the_async_pool(postgres_dsn: str) -> None:
    with migrated_store(postgres_dsn) as store:
        assert isinstance(store, PostgresStore)
        key = TenantStore(store).create("acme").api_key.get_secret_value()
        rows = await store.aquery("SELECT key_hash FROM tenants WHERE name = ?", ("acme",))
        assert isinstance(rows[0]["key_hash"], bytes) and len(rows[0]["key_hash"]) == 32
        assert await TenantStore(store).verify(key) == "acme"
        await store.aclose()


async def test_a_database_outage_refuses_tenant_keys_with_a_retryable_503() -> None:
    """A key that cannot be checked is neither let through nor a 500: a 503 with
    Retry-After (store_unavailable), and keys work again once the database is back."""
    server = start_postgres()
    try:
        dsn = server.create_database("outage")
        with migrated_store(dsn, StoreConfig(connect_timeout_s=1.0)) as store:
            tenants = TenantStore(store)
            gateway = Authenticator(AuthConfig(enabled=True), tenants)
            key = tenants.create("acme").api_key.get_secret_value()
            assert (await gateway.authenticate(f"Bearer {key}")).tenant == "acme"
            server.stop_keeping_data()
            with pytest.raises(StoreUnavailable) as refused:
                await gateway.authenticate(f"Bearer {key}")
            assert refused.value.status_code == 503 and refused.value.code == "store_unavailable"
            assert 1 <= int(refused.value.headers["Retry-After"]) <= 60
            server.start()
            assert (await gateway.authenticate(f"Bearer {key}")).tenant == "acme"
            await store.aclose()
    finally:
        server.stop()
