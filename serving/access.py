"""Who is asking and what they may address: auth, model resolution, limits, audit.

A request's `model` is the base, one of the caller's own adapters, or (admin only)
`tenant/adapter`. Another tenant's adapter is answered exactly like a missing one,
so its existence never leaks.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from serving.auth import Authenticator, Principal
from serving.engines.base import AdapterRef
from serving.errors import ModelNotFound, StoreUnavailable
from serving.limits import Limits
from serving.limits_backend import build_limits
from tuneserve.adapters.object_store import ObjectStoreError
from tuneserve.adapters.registry import AdapterRecord, AdapterRegistry
from tuneserve.audit import AuditLog, open_audit_log
from tuneserve.config import Settings
from tuneserve.db import open_store
from tuneserve.db.base import StoreError
from tuneserve.tenants.store import TenantStore

ADMIN_LABEL = "admin"
log = logging.getLogger(__name__)


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
        # One database for keys, the adapter index and the audit trail (on PostgreSQL;
        # the embedded default keeps the latter two in files).
        store = open_store(settings)
        tenants = TenantStore(store)
        return cls(
            settings=settings,
            authenticator=Authenticator(settings.auth, tenants),
            tenants=tenants,
            registry=AdapterRegistry(settings, store),
            limiter=build_limits(settings.limits),
            audit=open_audit_log(settings, store),
        )

    async def aclose(self) -> None:
        await self.limiter.aclose()
        await self.tenants.aclose()

    async def resolve_model(self, principal: Principal, model: str) -> AdapterRecord | None:
        """None for the base model; the adapter record otherwise; 404 if not addressable."""
        if model == self.settings.model.name:
            return None
        tenant, _, name = model.rpartition("/")
        if tenant:
            if not principal.is_admin and tenant != principal.tenant:
                raise ModelNotFound(model)
        else:
            tenant = principal.tenant or ""
        # Malformed names find nothing (registry.aget returns None): a 404, not a 400.
        try:
            record = await self.registry.aget(tenant, name) if tenant and name else None
        except StoreError as exc:
            log.warning("cannot look up adapter %r: %s", model, exc)
            raise StoreUnavailable("The adapter database cannot be reached right now. Retry later.") from exc
        if record is None:
            raise ModelNotFound(model)
        if self.registry.object_store is not None and not record.path.is_dir():
            # Published through a gateway on another machine: the llama.cpp fallback
            # needs its files here (vLLM replicas fetch their own through the resolver).
            try:
                await asyncio.to_thread(self.registry.fetch_local, record)
            except ObjectStoreError as exc:
                log.warning("cannot fetch adapter %s from the object store: %s", record.engine_name, exc)
        return record

    def visible_adapters(self, principal: Principal) -> list[AdapterRecord]:
        if principal.tenant is None:
            return self.registry.list() if principal.is_admin else []
        return self.registry.list(principal.tenant)
