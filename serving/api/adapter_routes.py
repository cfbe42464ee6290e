"""`/v1/adapters`: upload, list and delete tenants' LoRA adapters.

Uploads are multipart (`name`, `file` = .tar.gz or .zip of a PEFT adapter dir); an
admin may name the `tenant` and give a server-side `path` instead of a file. The
registry validates everything before it stores anything; a rejection is a 4xx that
says what to fix (error_map.py says which). Deleting (or replacing) an adapter also
unloads it from the engines.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from serving.access import Tenancy, actor
from serving.api.error_map import api_error
from serving.auth import Principal
from serving.engines.base import Engine
from serving.errors import Forbidden, InvalidRequest, PayloadTooLarge
from tuneserve.adapters.registry import AdapterNotFound, AdapterRecord
from tuneserve.tenants.store import TenantNotFound

# Room for the multipart envelope and the form fields around the archive.
_MULTIPART_OVERHEAD = 64 * 1024


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
    if tenancy.settings.auth.enabled:
        try:
            tenancy.tenants.get(tenant)
        except TenantNotFound as exc:
            raise api_error(exc, tenant) from None
    return tenant


def register_adapter_routes(app: FastAPI, tenancy: Tenancy, engines: Sequence[Engine]) -> None:
    base = tenancy.settings.model.name
    max_upload = tenancy.settings.adapters.max_bytes + _MULTIPART_OVERHEAD
    uploads_dir = tenancy.settings.data_dir / "tmp"

    async def unload_everywhere(engine_name: str) -> None:
        for engine in engines:
            await engine.unload_adapter(engine_name)

    @app.post("/v1/adapters", status_code=201)
    async def upload_adapter(request: Request) -> JSONResponse:
        principal = tenancy.authenticator.authenticate(request.headers.get("authorization"))
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_upload:
            raise PayloadTooLarge(f"Upload is {declared} bytes; the limit is {max_upload} bytes.", param="file")
        content_type = request.headers.get("content-type", "")
        # urlencoded carries no file, but is how an admin may send just `path`.
        if not content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise InvalidRequest("Send the adapter as multipart/form-data with fields 'name' and 'file'.")
        async with request.form(max_files=1, max_fields=8) as form:
            name = form.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidRequest("Missing required field 'name'.", param="name")
            requested_tenant = form.get("tenant")
            tenant = _target_tenant(tenancy, principal, requested_tenant if isinstance(requested_tenant, str) else None)
            upload, server_path = form.get("file"), form.get("path")
            if isinstance(server_path, str) and server_path:
                if not principal.is_admin:
                    raise Forbidden("Only an admin may register an adapter from a server path.", param="path")
                record = await _add(tenancy, principal, tenant, name, Path(server_path), unload_everywhere)
            elif isinstance(upload, UploadFile):
                uploads_dir.mkdir(parents=True, exist_ok=True)
                with tempfile.NamedTemporaryFile(dir=uploads_dir, prefix="upload-") as spooled:
                    await asyncio.to_thread(_copy_capped, upload, spooled, max_upload)
                    record = await _add(tenancy, principal, tenant, name, Path(spooled.name), unload_everywhere)
            else:
                raise InvalidRequest("Missing required field 'file' (a .tar.gz or .zip of a PEFT adapter dir).", param="file")
        return JSONResponse(adapter_json(record, base), status_code=201)

    @app.get("/v1/adapters")
    async def list_adapters(request: Request) -> dict[str, Any]:
        principal = tenancy.authenticator.authenticate(request.headers.get("authorization"))
        records = await asyncio.to_thread(tenancy.visible_adapters, principal)
        return {"object": "list", "data": [adapter_json(r, base) for r in records]}

    @app.delete("/v1/adapters/{model:path}")
    async def delete_adapter(model: str, request: Request) -> dict[str, Any]:
        principal = tenancy.authenticator.authenticate(request.headers.get("authorization"))
        # Same addressing as `model` in a completion: another tenant's adapter is a 404.
        record = await asyncio.to_thread(tenancy.resolve_model, principal, model)
        if record is None:
            raise InvalidRequest("The base model cannot be deleted.", param="model")
        with tenancy.audit.recording(actor(principal), "adapter.delete", f"{record.tenant}/{record.name}"):
            try:
                removed = await asyncio.to_thread(tenancy.registry.remove, record.tenant, record.name)
            except AdapterNotFound as exc:  # removed meanwhile
                raise api_error(exc, model) from None
        await unload_everywhere(removed.engine_name)
        return {"id": removed.name, "object": "adapter", "tenant": removed.tenant, "deleted": True}


def _copy_capped(upload: UploadFile, out: Any, limit: int) -> None:
    upload.file.seek(0)
    copied = 0
    while chunk := upload.file.read(1 << 20):
        copied += len(chunk)
        if copied > limit:
            raise PayloadTooLarge(f"Upload exceeds the limit of {limit} bytes.", param="file")
        out.write(chunk)
    out.flush()


async def _add(tenancy: Tenancy, principal: Principal, tenant: str, name: str, source: Path, unload: Any) -> AdapterRecord:
    previous = await asyncio.to_thread(tenancy.registry.get, tenant, name)
    # A rejection (AdapterRejected) reaches the client through the edge's error table.
    with tenancy.audit.recording(actor(principal), "adapter.add", f"{tenant}/{name}"):
        record = await asyncio.to_thread(tenancy.registry.add, tenant, name, source)
    if previous is not None:
        # The old version can never be addressed again; free it on the engines.
        await unload(previous.engine_name)
    return record

