"""Tenants and their API keys. A key is shown once, when issued; only its hash is kept.

A key is `ts-` + a key id (12 url-safe characters, 72 random bits) + a secret (43
characters, 256 random bits), fixed length so the id needs no separator. The key id
is not secret: it is stored in clear and finds the tenant's row through an index, so
verifying a key is one lookup and one constant-time hash comparison.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, SecretStr

from tuneserve.db import Store
from tuneserve.errors import TuneserveError
from tuneserve.names import NAME_RULES, is_valid_name, reserved_name_error

KEY_PREFIX = "ts-"
_KEY_ID_BYTES = 9  # 12 characters: at 72 bits, ids do not collide in practice
_SECRET_BYTES = 32  # 43 characters
_KEY_RE = re.compile(r"ts-([A-Za-z0-9_-]{12})[A-Za-z0-9_-]{43}")


class TenancyError(TuneserveError):
    """A tenant operation was refused; the message says why."""


class InvalidTenantName(TenancyError):
    pass


class TenantExists(TenancyError):
    pass


class TenantNotFound(TenancyError):
    pass


class Tenant(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    key_id: str  # non-secret prefix of the current key, to tell keys apart
    created_at: datetime
    key_rotated_at: datetime


class IssuedKey(BaseModel):
    """A freshly issued key. SecretStr keeps it out of reprs and logs by accident;
    the caller shows `api_key.get_secret_value()` once."""

    model_config = ConfigDict(frozen=True)

    tenant: Tenant
    api_key: SecretStr


def validate_name(name: str) -> str:
    if not is_valid_name(name):
        raise InvalidTenantName(f"invalid tenant name {name!r}: {NAME_RULES}")
    if (reserved := reserved_name_error(name)) is not None:
        raise InvalidTenantName(f"invalid tenant name: {reserved}")
    return name


def hash_key(key: str) -> bytes:
    # Plain SHA-256, no salt or slow KDF: those protect guessable passwords. A key
    # carries 256 random bits, so its hash can be neither inverted nor brute-forced,
    # and a fast hash keeps per-request verification at microseconds.
    return hashlib.sha256(key.encode()).digest()


def _new_key() -> tuple[str, str]:
    key_id = secrets.token_urlsafe(_KEY_ID_BYTES)
    return key_id, f"{KEY_PREFIX}{key_id}{secrets.token_urlsafe(_SECRET_BYTES)}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


class TenantStore:
    """Tenants in the database (SQLite or PostgreSQL). Every call reads or writes the
    database directly (no cache), so changes made by another process, or another
    gateway on the same PostgreSQL, apply at once."""

    def __init__(self, store: Store) -> None:
        self._store = store

    async def aclose(self) -> None:
        """Release the async pool of this event loop (the gateway's shutdown). The sync
        connections stay: CLI-style callers may go on using the store."""
        await self._store.aclose()

    def create(self, name: str) -> IssuedKey:
        validate_name(name)
        key_id, key = _new_key()
        now = _now()
        created = self._store.execute(
            "INSERT INTO tenants (name, key_id, key_hash, created_at, key_rotated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
            (name, key_id, hash_key(key), now, now),
        )
        if not created:
            raise TenantExists(f"tenant '{name}' already exists")
        tenant = Tenant(name=name, key_id=key_id, created_at=now, key_rotated_at=now)
        return IssuedKey(tenant=tenant, api_key=SecretStr(key))

    def list(self) -> list[Tenant]:
        rows = self._store.query(
            "SELECT name, key_id, created_at, key_rotated_at FROM tenants ORDER BY name"
        )
        return [Tenant(**dict(row)) for row in rows]

    def get(self, name: str) -> Tenant:
        rows = self._store.query(
            "SELECT name, key_id, created_at, key_rotated_at FROM tenants WHERE name = ?",
            (name,),
        )
        if not rows:
            raise TenantNotFound(f"no tenant named '{name}'")
        return Tenant(**dict(rows[0]))

    def delete(self, name: str) -> None:
        if not self._store.execute("DELETE FROM tenants WHERE name = ?", (name,)):
            raise TenantNotFound(f"no tenant named '{name}'")

    def rotate(self, name: str) -> IssuedKey:
        """Issue a new key; the old one stops working with this commit."""
        key_id, key = _new_key()
        with self._store.transaction() as tx:
            changed = tx.execute(
                "UPDATE tenants SET key_id = ?, key_hash = ?, key_rotated_at = ? WHERE name = ?",
                (key_id, hash_key(key), _now(), name),
            )
            if not changed:
                raise TenantNotFound(f"no tenant named '{name}'")
            [row] = tx.query(
                "SELECT name, key_id, created_at, key_rotated_at FROM tenants WHERE name = ?",
                (name,),
            )
        return IssuedKey(tenant=Tenant(**dict(row)), api_key=SecretStr(key))

    async def verify(self, key: str) -> str | None:
        """The tenant that owns `key`, or None for a malformed, unknown or old key.

        Async: the gateway calls it on every request, and on PostgreSQL the lookup is
        a network round trip that must not block the event loop."""
        match = _KEY_RE.fullmatch(key)
        if match is None:
            return None
        rows = await self._store.aquery(
            "SELECT name, key_hash FROM tenants WHERE key_id = ?", (match.group(1),)
        )
        if rows and hmac.compare_digest(bytes(rows[0]["key_hash"]), hash_key(key)):
            return rows[0]["name"]
        return None
