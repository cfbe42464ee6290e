"""`/v1/adapters`: upload, list and delete tenants' LoRA adapters.

Uploads are multipart (`name`, `file` = .tar.gz or .zip of a PEFT adapter dir); an
admin may name the `tenant` and give a server-side `path` instead of a file. The body
is counted as it arrives (upload_form.py) and uploads in progress are bounded
(upload_slots.py). The registry validates everything before it stores anything; a
rejection is a 4xx that says what to fix (error_map.py says which). Every request
after authentication is audited, refusals included (audited.py). Deleting (or
replacing) an adapter also unloads it from the engines.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from serving.access import Tenancy, actor
from serving.api.adapter_docs import UPLOAD_DOCS, error_responses
from serving.api.audited import AuditScope, audited
from serving.api.body_gate import close_connection
from serving.api.error_map import api_error
from serving.api.upload_form import UploadForm, read_upload_form
from serving.api.upload_slots import UploadSlots
from serving.auth import Principal
from serving.engines.base import Engine
from serving.errors import ApiError, Forbidden, InvalidRequest, ModelNotFound, Unauthorized
from tuneserve.adapters.registry import AdapterNotFound, AdapterRecord
from tuneserve.tenants.store import TenantNotFound


def adapter_json(record: AdapterRecord, base: str) -> dict[str, Any]:
    return {
        "id": record.name,
        "object": "adapter",
        "tenant": record.tenant,
        "version": record.version,
        "parent": base,
        "rank": record.rank,
        "alpha": record.alpha,
        "target_modules": record.target_modules,
        "sha256": record.sha256,
        "size_bytes": record.size_bytes,
        "created_at": int(record.created_at.timestamp()),
    }


def _target_tenant(tenancy: Tenancy, principal: Principal, requested: str | None) -> str:
    tenant = requested or principal.tenant
    if tenant is None:
        raise InvalidRequest("An admin must name the adapter's 'tenant'.", param="tenant")
    if tenant != principal.tenant and not principal.is_admin:
        raise Forbidden("Only an admin can manage another tenant's adapters.", param="tenant")
    _owner_check(tenancy, tenant)()
    return tenant


def _owner_check(tenancy: Tenancy, tenant: str) -> Callable[[], object]:
    """What the registry calls under its lock before publishing: with auth on, the
    tenant must still exist (a tenant deleted during the upload gets nothing stored)."""
    if not tenancy.settings.auth.enabled:
        return lambda: None

    def check() -> None:
        try:
            tenancy.tenants.get(tenant)
        except TenantNotFound as exc:
            raise api_error(exc, tenant) from None

    return check


def register_adapter_routes(app: FastAPI, tenancy: Tenancy, engines: Sequence[Engine]) -> None:
    base = tenancy.settings.model.name
    limits = tenancy.settings.adapters
    uploads_dir = tenancy.settings.data_dir / "tmp"
    slots = UploadSlots(limits.max_concurrent_uploads, limits.max_concurrent_uploads_per_tenant)

    async def unload_everywhere(engine_name: str) -> None:
        for engine in engines:
            await engine.unload_adapter(engine_name)

    @app.post("/v1/adapters", status_code=201, **UPLOAD_DOCS)
    async def upload_adapter(request: Request) -> JSONResponse:
        try:
            principal = await tenancy.authenticator.authenticate(request.headers.get("authorization"))
        except ApiError as exc:  # answered before the body is read
            raise close_connection(exc) from None
        async with audited(tenancy.audit, principal, "adapter.add", f"{principal.tenant or ''}/") as scope:
            form = UploadForm()
            try:
                with slots.uploader(actor(principal)):
                    async with read_upload_form(
                        request, form, max_file_bytes=limits.max_bytes, spool_dir=uploads_dir,
                        timeout_s=limits.upload_timeout_s,
                    ), slots.processing():
                        record = await _upload(tenancy, principal, form, scope, unload_everywhere)
            finally:
                scope.target = _upload_target(principal, form)
        return JSONResponse(adapter_json(record, base), status_code=201)

    @app.get("/v1/adapters", responses=error_responses(Unauthorized))
    async def list_adapters(request: Request) -> dict[str, Any]:
        principal = await tenancy.authenticator.authenticate(request.headers.get("authorization"))
        records = await asyncio.to_thread(tenancy.visible_adapters, principal)
        return {"object": "list", "data": [adapter_json(r, base) for r in records]}

    @app.delete(
        "/v1/adapters/{model:path}",
        responses={200: {"description": "The adapter and all its versions are gone"},
                   **error_responses(InvalidRequest, Unauthorized, ModelNotFound)},
    )
    async def delete_adapter(request: Request) -> dict[str, Any]:
        # Read from the path, not declared as a parameter: FastAPI would then document a
        # 422 this route never answers.
        model: str = request.path_params["model"]
        principal = await tenancy.authenticator.authenticate(request.headers.get("authorization"))
        async with audited(tenancy.audit, principal, "adapter.delete", model) as scope:
            # Same addressing as `model` in a completion: another tenant's adapter is a 404.
            record = await tenancy.resolve_model(principal, model)
            if record is None:
                raise InvalidRequest("The base model cannot be deleted.", param="model")
            scope.target = f"{record.tenant}/{record.name}"
            try:
                removed = await asyncio.to_thread(tenancy.registry.remove, record.tenant, record.name)
            except AdapterNotFound as exc:  # removed meanwhile
                raise api_error(exc, model) from None
            scope.details["version"] = removed.version
        await unload_everywhere(removed.engine_name)
        return {"id": removed.name, "object": "adapter", "tenant": removed.tenant, "deleted": True}


def _upload_target(principal: Principal, form: UploadForm) -> str:
    return f"{form.fields.get('tenant') or principal.tenant or ''}/{form.fields.get('name', '')}"


async def _upload(
    tenancy: Tenancy, principal: Principal, form: UploadForm, scope: AuditScope, unload: Callable[[str], Awaitable[None]]
) -> AdapterRecord:
    name = form.fields.get("name", "")
    requested_tenant = form.fields.get("tenant") or None
    if not name:
        raise InvalidRequest("Missing required field 'name'.", param="name")
    tenant = _target_tenant(tenancy, principal, requested_tenant)
    server_path = form.fields.get("path")
    if server_path:
        if not principal.is_admin:
            raise Forbidden("Only an admin may register an adapter from a server path.", param="path")
        source = Path(server_path)
        scope.details["source"] = "path"
    elif form.file is not None:
        source = form.file
        scope.details["upload_bytes"] = form.file_bytes
    else:
        raise InvalidRequest("Missing required field 'file' (a .tar.gz or .zip of a PEFT adapter dir).", param="file")
    # A rejection (AdapterRejected) reaches the client through the edge's error table.
    added = await asyncio.to_thread(
        tenancy.registry.add_version, tenant, name, source, _owner_check(tenancy, tenant)
    )
    scope.details["version"] = added.record.version
    if added.replaced is not None:
        # Read under the registry's lock: the version this upload really made
        # unaddressable, even when another upload of the same name ran alongside.
        await unload(added.replaced.engine_name)
    return added.record
