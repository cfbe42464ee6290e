"""Who is asking and what they may address: auth, model resolution, limits, audit.

A request's `model` is the base, one of the caller's own adapters, or (admin only)
`tenant/adapter`. Another tenant's adapter is answered exactly like a missing one,
so its existence never leaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.auth import Authenticator, Principal
from serving.engines.base import AdapterRef
from serving.errors import ModelNotFound
from serving.limits import Limits
from serving.limits_backend import build_limits
from tuneserve.adapters.registry import AdapterRecord, AdapterRegistry
from tuneserve.audit import AuditLog, audit_path
from tuneserve.config import Settings
from tuneserve.db import open_store
from tuneserve.tenants.store import TenantStore

ADMIN_LABEL = "admin"


def actor(principal: Principal) -> str:
    return f"tenant:{principal.tenant}" if principal.tenant and not principal.is_admin else ADMIN_LABEL


def to_ref(record: AdapterRecord) -> AdapterRef:
    return AdapterRef(
        engine_name=record.engine_name,
        peft_path=record.path,
        gguf_path=record.gguf_path,
        tenant=record.tenant,
        name=record.name,
    )


@dataclass
class Tenancy:
    settings: Settings
    authenticator: Authenticator
    tenants: TenantStore
    registry: AdapterRegistry
    limiter: Limits
    audit: AuditLog

    @classmethod
    def from_settings(cls, settings: Settings) -> "Tenancy":
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        tenants = TenantStore(open_store(settings))
        return cls(
            settings=settings,
            authenticator=Authenticator(settings.auth, tenants),
            tenants=tenants,
            registry=AdapterRegistry(settings),
            limiter=build_limits(settings.limits),
            audit=AuditLog(audit_path(settings.data_dir)),
        )

    async def aclose(self) -> None:
        await self.limiter.aclose()
        await self.tenants.aclose()

    def resolve_model(self, principal: Principal, model: str) -> AdapterRecord | None:
        """None for the base model; the adapter record otherwise; 404 if not addressable."""
        if model == self.settings.model.name:
            return None
        tenant, _, name = model.rpartition("/")
        if tenant:
            if not principal.is_admin and tenant != principal.tenant:
                raise ModelNotFound(model)
        else:
            tenant = principal.tenant or ""
        record = self._lookup(tenant, name)
        if record is None:
            raise ModelNotFound(model)
        return record

    def _lookup(self, tenant: str, name: str) -> AdapterRecord | None:
        # Malformed names find nothing (registry.get returns None): a 404, not a 400.
        return self.registry.get(tenant, name) if tenant and name else None

    def visible_adapters(self, principal: Principal) -> list[AdapterRecord]:
        if principal.tenant is None:
            return self.registry.list() if principal.is_admin else []
        return self.registry.list(principal.tenant)
