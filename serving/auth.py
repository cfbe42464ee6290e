"""Who is calling: the gateway turns each request's Authorization header into a Principal.

Keys are looked up in the database on every request, without a cache. The lookup is
one indexed SELECT (microseconds on SQLite, a fraction of a millisecond on PostgreSQL)
next to generation that takes milliseconds to minutes, and tenants are changed by
other processes (`tuneserve tenants` while the gateway runs, other gateways on the
same PostgreSQL), which an in-memory cache could not hear about: reading every time is
what makes a deleted tenant's or a rotated-away key stop working at once, everywhere.
`authenticate` is async so that lookup never blocks the event loop.
"""

from __future__ import annotations

import hmac
import logging

from pydantic import BaseModel, ConfigDict

from serving.errors import StoreUnavailable, Unauthorized
from tuneserve.config import AuthConfig
from tuneserve.db.base import StoreError
from tuneserve.tenants.store import TenantStore, hash_key

log = logging.getLogger(__name__)

MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. Provide it in an Authorization header using "
    "Bearer auth (Authorization: Bearer YOUR_KEY)."
)


class Principal(BaseModel):
    model_config = ConfigDict(frozen=True)

    tenant: str | None  # whose adapters and usage the request acts on; None: no tenant
    is_admin: bool  # may use admin routes (tenants, every tenant's adapters)


ADMIN_PRINCIPAL = Principal(tenant=None, is_admin=True)

# Dev mode (auth.enabled false) has no access control to keep: anyone who reaches the
# port is already let in. So the dev principal may do everything, admin routes
# included, and acts as tenant "default" so tenant-scoped routes (adapters) work
# without a key. Making it a plain tenant would protect nothing and only make admin
# routes unusable in development. The Authorization header is ignored entirely, so
# SDKs that always send some key ("unused") work.
DEV_TENANT = "default"
DEV_PRINCIPAL = Principal(tenant=DEV_TENANT, is_admin=True)

DEV_MODE_WARNING = (
    "AUTHENTICATION IS DISABLED (auth.enabled is false): every request is accepted "
    f"without an API key, with admin rights, as tenant '{DEV_TENANT}'. Set auth.enabled "
    "(TUNESERVE_AUTH__ENABLED=true) before anyone but you can reach this gateway."
)


def log_dev_mode_warning(logger: logging.Logger = log) -> None:
    """The gateway calls this at start-up when auth is disabled."""
    logger.warning(DEV_MODE_WARNING)


def _bearer_token(header: str | None) -> str:
    parts = (header or "").split()
    if not parts or (len(parts) == 1 and parts[0].lower() == "bearer"):
        raise Unauthorized(MISSING_KEY_MESSAGE)
    # Bearer tokens are ASCII (RFC 6750); refusing others here also keeps odd
    # characters away from hashing and the database.
    if len(parts) != 2 or parts[0].lower() != "bearer" or not parts[1].isascii():
        raise Unauthorized()
    return parts[1]


class Authenticator:
    def __init__(self, config: AuthConfig, tenants: TenantStore) -> None:
        self.enabled = config.enabled
        self._tenants = tenants
        # Compare SHA-256 digests: equal lengths, so compare_digest is constant-time
        # and does not even reveal the admin key's length.
        self._admin_digest = hash_key(config.admin_key) if config.admin_key else None

    async def authenticate(self, authorization_header: str | None) -> Principal:
        """The caller behind an `Authorization: Bearer KEY` header; raises Unauthorized."""
        if not self.enabled:
            return DEV_PRINCIPAL
        key = _bearer_token(authorization_header)
        if self._admin_digest is not None and hmac.compare_digest(
            hash_key(key), self._admin_digest
        ):
            return ADMIN_PRINCIPAL
        try:
            tenant = await self._tenants.verify(key)
        except StoreError as exc:
            log.warning("cannot check an API key: %s", exc)
            raise StoreUnavailable("The key database cannot be reached right now. Retry later.") from exc
        if tenant is None:
            raise Unauthorized()
        return Principal(tenant=tenant, is_admin=False)
