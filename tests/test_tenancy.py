"""Tenants, API keys, authentication and the audit log, on a real SQLite database and
(the TenantStore and Authenticator tests, through the parametrized `store` fixture) on a
real PostgreSQL.

The CLI runs as a subprocess, as an operator would run it, against a temp data dir;
in-process checks open the same database, so they also prove that changes made by
another process apply at once.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import AsyncIterator

import pytest
from pydantic import ValidationError

from serving.auth import (
    ADMIN_PRINCIPAL,
    DEV_PRINCIPAL,
    Authenticator,
    Principal,
    log_dev_mode_warning,
)
from serving.errors import Unauthorized
from tests.support.postgres_server import migrated_store
from tuneserve.audit import FileAuditLog, audit_path
from tuneserve.config import AuthConfig, load_settings
from tuneserve.db import Store, StoreError, open_store
from tuneserve.db.migrations import SQLITE as MIGRATIONS
from tuneserve.db.sqlite import SQLiteStore, db_path
from tuneserve.errors import ConfigError, TuneserveError
from tuneserve.tenants.store import (
    InvalidTenantName,
    TenantExists,
    TenantNotFound,
    TenantStore,
    hash_key,
)

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "admin-key-for-tests-0123456789"


def cli(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TUNESERVE_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "tuneserve.cli.main", "tenants", *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )


def audit_lines(data_dir: Path) -> list[dict]:
    return [json.loads(line) for line in audit_path(data_dir).read_text().splitlines()]


def all_bytes(data_dir: Path) -> bytes:
    """Everything under the data dir: database, its -wal/-shm files, the audit log."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file())


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    opened: Store
    if request.param == "sqlite":
        opened = SQLiteStore(db_path(tmp_path))
    else:
        opened = migrated_store(request.getfixturevalue("postgres_dsn"))
    with opened:
        yield opened
        await opened.aclose()


@pytest.fixture
def tenants(store: Store) -> TenantStore:
    return TenantStore(store)


async def rejects(auth: Authenticator, header: str | None) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        await auth.authenticate(header)
    return info.value


# ---------------------------------------------------------------- CLI


async def test_cli_lifecycle_key_shown_once_and_never_stored(tmp_path: Path) -> None:
    created = cli(tmp_path, "create", "acme")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert created.stdout == key + "\n"  # alone on stdout: KEY=$(tuneserve tenants create)
    assert key.startswith("ts-") and len(key) == 58
    assert key not in created.stderr and "only this once" in created.stderr

    listed = cli(tmp_path, "list")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["name"] == "acme" and key.startswith("ts-" + row["key_id"])
    assert key[15:] not in listed.stdout  # the secret part never comes back

    # One authenticator, opened before the changes below and kept open: what another
    # process changes must apply to it at once.
    with SQLiteStore(db_path(tmp_path)) as store:
        auth = Authenticator(AuthConfig(enabled=True), TenantStore(store))
        assert await auth.authenticate(f"Bearer {key}") == Principal(tenant="acme", is_admin=False)

        rotated = cli(tmp_path, "rotate-key", "acme")
        assert rotated.returncode == 0, rotated.stderr
        new_key = rotated.stdout.strip()
        assert new_key != key and new_key.startswith("ts-") and len(new_key) == 58
        await rejects(auth, f"Bearer {key}")  # rotated away
        assert (await auth.authenticate(f"Bearer {new_key}")).tenant == "acme"

        # Positive control: the files are readable and do hold the key's hash...
        assert hash_key(new_key) in all_bytes(tmp_path)

        deleted = cli(tmp_path, "delete", "acme")
        assert deleted.returncode == 0, deleted.stderr
        await rejects(auth, f"Bearer {new_key}")  # deleted tenant: refused at once
        await rejects(auth, f"Bearer {key}")

        # ...but never a key, nor its secret part, with the database open (WAL) or closed.
        data = all_bytes(tmp_path)
        for secret in (key, key[15:], new_key, new_key[15:]):
            assert secret.encode() not in data
    data = all_bytes(tmp_path)
    for secret in (key, key[15:], new_key, new_key[15:]):
        assert secret.encode() not in data

    assert json.loads(cli(tmp_path, "list").stdout) == []

    lines = audit_lines(tmp_path)
    assert [(line["action"], line["target"], line["result"]) for line in lines] == [
        ("tenant.create", "acme", "ok"),
        ("tenant.rotate_key", "acme", "ok"),
        ("tenant.delete", "acme", "ok"),
    ]
    assert {line["actor"] for line in lines} == {f"cli:{getpass.getuser()}"}
    assert lines[0]["key_id"] == key[3:15] and lines[1]["key_id"] == new_key[3:15]
    for line in lines:
        assert datetime.fromisoformat(line["ts"]).utcoffset() == timedelta(0)


def test_cli_refusals_exit_2_and_are_audited(tmp_path: Path) -> None:
    bad = cli(tmp_path, "create", "Acme")
    assert bad.returncode == 2 and bad.stdout == ""
    assert "invalid tenant name 'Acme'" in bad.stderr and "Traceback" not in bad.stderr

    assert cli(tmp_path, "create", "acme").returncode == 0
    duplicate = cli(tmp_path, "create", "acme")
    assert duplicate.returncode == 2 and duplicate.stdout == ""
    assert "tenant 'acme' already exists" in duplicate.stderr

    for action in ("delete", "rotate-key"):
        missing = cli(tmp_path, action, "nope")
        assert missing.returncode == 2 and missing.stdout == ""
        assert "no tenant named 'nope'" in missing.stderr

    refused = [line for line in audit_lines(tmp_path) if line["result"] == "refused"]
    assert [(line["action"], line["target"]) for line in refused] == [
        ("tenant.create", "Acme"),
        ("tenant.create", "acme"),
        ("tenant.delete", "nope"),
        ("tenant.rotate_key", "nope"),
    ]
    assert all(line["error"] for line in refused)


def test_concurrent_creates_on_a_fresh_database(tmp_path: Path) -> None:
    """Both processes migrate the new database and insert at once: one wins cleanly."""
    env = {**os.environ, "TUNESERVE_DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "tuneserve.cli.main", "tenants", "create", "race"]
    racers = [
        subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(3)
    ]
    results = [(racer.wait(timeout=120), racer.stderr.read().decode()) for racer in racers]
    assert sorted(code for code, _ in results) == [0, 2, 2], results
    assert all("already exists" in err for code, err in results if code == 2)
    with SQLiteStore(db_path(tmp_path)) as store:
        assert store.schema_version() == len(MIGRATIONS)
        assert [t.name for t in TenantStore(store).list()] == ["race"]


# ---------------------------------------------------------------- tenants


@pytest.mark.parametrize("name", ["a", "0", "acme", "a.b_c-d9", "a" * 64])
def test_valid_names(tenants: TenantStore, name: str) -> None:
    assert tenants.create(name).tenant.name == name
    assert tenants.get(name).name == name


@pytest.mark.parametrize(
    # The last three are metrics label values (no tenant, the admin, the base model).
    "name", ["", "Acme", "-a", ".a", "_a", "a b", "a/b", "acmé", "a" * 65, "acme\n", "none", "admin", "base"]
)
def test_bad_names(tenants: TenantStore, name: str) -> None:
    with pytest.raises(InvalidTenantName, match="invalid tenant name"):
        tenants.create(name)
    assert tenants.list() == []


def test_tenant_errors_are_typed(tenants: TenantStore) -> None:
    tenants.create("acme")
    with pytest.raises(TenantExists):
        tenants.create("acme")
    for call in (tenants.get, tenants.delete, tenants.rotate):
        with pytest.raises(TenantNotFound):
            call("nope")
    assert issubclass(TenantExists, TuneserveError)  # so the CLI exits 2


def test_issued_key_stays_out_of_reprs(tenants: TenantStore) -> None:
    issued = tenants.create("acme")
    key = issued.api_key.get_secret_value()
    assert key not in repr(issued) and key not in str(issued)


# ---------------------------------------------------------------- authentication


async def test_tenant_and_admin_keys(tenants: TenantStore) -> None:
    key = tenants.create("acme").api_key.get_secret_value()
    auth = Authenticator(AuthConfig(enabled=True, admin_key=ADMIN_KEY), tenants)
    assert await auth.authenticate(f"Bearer {key}") == Principal(tenant="acme", is_admin=False)
    assert await auth.authenticate(f"Bearer {ADMIN_KEY}") == ADMIN_PRINCIPAL
    assert ADMIN_PRINCIPAL == Principal(tenant=None, is_admin=True)
    # The scheme is case-insensitive and any whitespace separates it (RFC 9110).
    assert (await auth.authenticate(f"bearer\t{key} ")).tenant == "acme"
    with pytest.raises(ValidationError):
        ADMIN_PRINCIPAL.is_admin = False  # type: ignore[misc]  # frozen


async def test_refused_headers(tenants: TenantStore) -> None:
    key = tenants.create("acme").api_key.get_secret_value()
    other = tenants.create("other").api_key.get_secret_value()
    auth = Authenticator(AuthConfig(enabled=True, admin_key=ADMIN_KEY), tenants)
    same_id_wrong_secret = key[:15] + other[15:]  # finds acme's row, fails the hash
    missing = [None, "", "   ", "Bearer", "Bearer   "]
    wrong = [
        f"Basic {key}",
        key,
        f"Bearer {key} extra",
        f"Bearer {key}x",
        f"Bearer {key[:-1]}",
        f"Bearer {same_id_wrong_secret}",
        "Bearer ts-" + "A" * 55,  # well formed, unknown key id
        "Bearer not-a-key",
        f"Bearer {key[:-1]}é",  # non-ASCII
        f"Bearer {ADMIN_KEY}x",
        f"Bearer {ADMIN_KEY[:-1]}",
    ]
    for header in missing + wrong:
        error = await rejects(auth, header)
        assert error.status_code == 401 and error.headers == {"WWW-Authenticate": "Bearer"}
        body = error.body()["error"]
        assert (body["type"], body["code"]) == ("invalid_request_error", "invalid_api_key")
        assert key not in body["message"] and ADMIN_KEY not in body["message"]
        expected = "didn't provide an API key" if header in missing else "Incorrect API key"
        assert expected in body["message"], header


def test_authenticate_from_many_threads(store: Store, tenants: TenantStore) -> None:
    """One shared connection (SQLite) or pool (PostgreSQL, a loop's own): lookups from
    several threads, each with its event loop, while another writes."""
    keys = {f"t{n}": tenants.create(f"t{n}").api_key.get_secret_value() for n in range(4)}
    auth = Authenticator(AuthConfig(enabled=True), tenants)
    errors: list[BaseException] = []

    async def check_many(name: str) -> None:
        try:
            for _ in range(200):
                assert (await auth.authenticate(f"Bearer {keys[name]}")).tenant == name
        finally:
            await store.aclose()

    def check(name: str) -> None:
        try:
            asyncio.run(check_many(name))
        except BaseException as exc:  # surfaced below: threads swallow exceptions
            errors.append(exc)

    pool = [threading.Thread(target=check, args=(name,)) for name in keys]
    for thread in pool:
        thread.start()
    for n in range(20):
        tenants.create(f"extra{n}")
    for thread in pool:
        thread.join()
    assert errors == []


async def test_enabled_without_admin_key_accepts_tenants_only(tenants: TenantStore) -> None:
    key = tenants.create("acme").api_key.get_secret_value()
    auth = Authenticator(load_settings(environ={"TUNESERVE_AUTH__ENABLED": "true"}).auth, tenants)
    assert (await auth.authenticate(f"Bearer {key}")).tenant == "acme"
    await rejects(auth, f"Bearer {ADMIN_KEY}")


async def test_dev_mode_accepts_everything_and_warns(
    tenants: TenantStore, caplog: pytest.LogCaptureFixture
) -> None:
    key = tenants.create("acme").api_key.get_secret_value()
    auth = Authenticator(AuthConfig(admin_key=ADMIN_KEY), tenants)
    assert not auth.enabled
    for header in (None, "", "Bearer unused", f"Bearer {key}", f"Bearer {ADMIN_KEY}"):
        assert await auth.authenticate(header) == DEV_PRINCIPAL
    assert DEV_PRINCIPAL == Principal(tenant="default", is_admin=True)

    with caplog.at_level(logging.WARNING):
        log_dev_mode_warning()
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "AUTHENTICATION IS DISABLED" in record.getMessage()
    assert "TUNESERVE_AUTH__ENABLED" in record.getMessage()


# ---------------------------------------------------------------- config


def test_auth_config() -> None:
    defaults = load_settings(environ={}).auth
    assert (defaults.enabled, defaults.admin_key) == (False, None)
    env = {"TUNESERVE_AUTH__ENABLED": "true", "TUNESERVE_AUTH__ADMIN_KEY": ADMIN_KEY}
    settings = load_settings(environ=env)
    assert settings.auth.enabled and settings.auth.admin_key == ADMIN_KEY
    assert ADMIN_KEY not in repr(settings)


@pytest.mark.parametrize("admin_key", ["short-key", "1234567890123456789"])
def test_bad_admin_key_is_named_not_echoed(admin_key: str) -> None:
    # Env values parse as YAML: the all-digit key arrives as an int and is refused too.
    with pytest.raises(ConfigError, match=r"key 'auth\.admin_key'") as info:
        load_settings(environ={"TUNESERVE_AUTH__ADMIN_KEY": admin_key})
    assert admin_key not in str(info.value)


def test_empty_admin_key() -> None:
    with pytest.raises(ConfigError, match=r"key 'auth\.admin_key'"):
        load_settings(overrides={"auth.admin_key": ""}, environ={})
    # An empty env variable parses as YAML null: no admin key, so admin access fails closed.
    assert load_settings(environ={"TUNESERVE_AUTH__ADMIN_KEY": ""}).auth.admin_key is None


# ---------------------------------------------------------------- audit log


def test_audit_record_fields(tmp_path: Path) -> None:
    log = FileAuditLog(audit_path(tmp_path))
    log.record("cli:alice", "tenant.create", "acme", "ok", key_id="abc", note="two\nlines")
    with pytest.raises(ValueError), log.recording("cli:alice", "tenant.delete", "acme"):
        raise ValueError("boom")
    first, second = audit_lines(tmp_path)
    assert list(first)[:5] == ["ts", "actor", "action", "target", "result"]
    assert first["note"] == "two\nlines" and first["key_id"] == "abc"
    assert (second["result"], second["error"]) == ("failed", "boom")
    assert datetime.fromisoformat(first["ts"]).utcoffset() == timedelta(0)
    with pytest.raises(TypeError):
        log.record("a", "b", "c", "ok", ts="forged")
    assert audit_path(tmp_path).stat().st_mode & 0o777 == 0o600


def test_audit_concurrent_appends_give_whole_lines(tmp_path: Path) -> None:
    path = audit_path(tmp_path)
    log = FileAuditLog(path)
    threads, processes, per_writer = 6, 2, 25
    payload = "x" * 8192  # bigger than a page: a torn write would show
    writer = (
        "import sys; from pathlib import Path; from tuneserve.audit import FileAuditLog\n"
        "log = FileAuditLog(Path(sys.argv[1]))\n"
        "for i in range(int(sys.argv[3])):\n"
        "    log.record(sys.argv[2], 'test', str(i), 'ok', payload=sys.argv[4])\n"
    )
    children = [
        subprocess.Popen(
            [sys.executable, "-c", writer, str(path), f"proc-{n}", str(per_writer), payload],
            cwd=ROOT,
        )
        for n in range(processes)
    ]
    start = threading.Barrier(threads)

    def write(name: str) -> None:
        start.wait()
        for i in range(per_writer):
            log.record(name, "test", str(i), "ok", payload=payload)

    pool = [threading.Thread(target=write, args=(f"thread-{n}",)) for n in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    assert all(child.wait(timeout=120) == 0 for child in children)

    raw = path.read_bytes()
    assert raw.endswith(b"\n")
    records = [json.loads(line) for line in raw.decode().splitlines()]
    assert all(r["payload"] == payload for r in records)
    seen = sorted((r["actor"], int(r["target"])) for r in records)
    writers = [f"thread-{n}" for n in range(threads)] + [f"proc-{n}" for n in range(processes)]
    assert seen == sorted((w, i) for w in writers for i in range(per_writer))


# ---------------------------------------------------------------- store


def test_store_schema_and_wal(tmp_path: Path) -> None:
    path = db_path(tmp_path)
    with SQLiteStore(path) as store:
        assert store.schema_version() == len(MIGRATIONS)
        assert store.query("PRAGMA journal_mode")[0]["journal_mode"] == "wal"
    with SQLiteStore(path) as store:  # reopening applies nothing twice
        assert store.schema_version() == len(MIGRATIONS)
    assert path.stat().st_mode & 0o777 == 0o600

    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS) + 1,))
    conn.close()
    with pytest.raises(StoreError, match="newer than this tuneserve knows"):
        SQLiteStore(path)


def test_store_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = db_path(tmp_path)
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError, match="cannot open database"):
        SQLiteStore(path)


def test_store_url_selects_the_sqlite_file(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "state.db"
    overrides = {"store.url": f"sqlite:///{target}", "data_dir": str(tmp_path / "data")}
    with open_store(load_settings(overrides=overrides, environ={})) as store:
        assert isinstance(store, SQLiteStore) and store.path == target
        assert store.schema_version() == len(MIGRATIONS)  # migrated on open, as the default
    assert target.is_file() and not (tmp_path / "data" / "tuneserve.db").exists()
    with open_store(load_settings(overrides={"data_dir": str(tmp_path / "data")}, environ={})) as store:
        assert isinstance(store, SQLiteStore) and store.path == db_path(tmp_path / "data")
