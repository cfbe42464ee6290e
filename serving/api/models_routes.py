"""`/v1/models`: the base model and the adapters the caller may address."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel

from serving.access import Tenancy
from serving.api.error_schema import error_response_doc
from serving.errors import Unauthorized

OWNER = "tuneserve"  # `owned_by` of the base model; adapters are owned by their tenant


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


def models_routes(tenancy: Tenancy) -> APIRouter:
    routes = APIRouter()
    base = tenancy.settings.model.name
    max_model_len = tenancy.settings.model.max_model_len
    # The base model has no registry record: it "appeared" when the gateway started.
    started_at = int(time.time())

    @routes.get("/v1/models", responses=error_response_doc(Unauthorized, "Missing or unknown API key"))
    async def list_models(request: Request) -> ModelList:
        """The base model and the caller's adapters (`parent` = base)."""
        principal = await tenancy.authenticator.authenticate(request.headers.get("authorization"))
        data = [
            ModelCard(
                id=base,
                object="model",
                created=started_at,
                owned_by=OWNER,
                root=base,
                parent=None,
                max_model_len=max_model_len,
            )
        ]
        for record in tenancy.visible_adapters(principal):
            own = record.tenant == principal.tenant
            data.append(
                ModelCard(
                    # Another tenant's adapter (admins only) is addressed as tenant/name.
                    id=record.name if own else f"{record.tenant}/{record.name}",
                    object="model",
                    created=int(record.created_at.timestamp()),
                    owned_by=record.tenant,
                    root=base,
                    parent=base,
                    max_model_len=max_model_len,
                )
            )
        return ModelList(object="list", data=data)

    return routes
