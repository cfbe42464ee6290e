"""The API edge: one table maps domain errors to HTTP, every body has OpenAI's shape,
and fallback reasons stay a closed set."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from serving.api.app import create_app
from serving.api.error_map import DOMAIN_ERRORS, GENERATION_ERRORS, api_error, error_statuses
from serving.api.error_schema import ErrorDetail, OpenAIError
from serving.api.status_routes import EnginesNotReady, EngineState
from serving.errors import FALLBACK_REASONS, ApiError, BodyTimeout, EngineUnavailable, ServerBusy, retry_after
from tests.support.servers import ROOT
from tuneserve.adapters.registry import AdapterNotFound
from tuneserve.adapters.validation import AdapterRejected
from tuneserve.config import load_settings
from tuneserve.tenants.store import TenantNotFound


def _subclasses(cls: type) -> list[type]:
    return [cls, *(s for sub in cls.__subclasses__() for s in _subclasses(sub))]


@pytest.mark.parametrize(
    ("error", "subject", "status", "param", "code", "message"),
    [
        (AdapterRejected("too_large", "big"), None, 413, "file", "too_large", "adapter rejected (too_large): big"),
        (AdapterRejected("invalid_name", "x"), None, 400, "name", "invalid_name", "adapter rejected (invalid_name): x"),
        (AdapterRejected("not_lora", "no"), None, 400, "file", "not_lora", "adapter rejected (not_lora): no"),
        (AdapterNotFound("gone"), "acme/x", 404, "model", "not_found", "Adapter 'acme/x' does not exist."),
        (AdapterNotFound("gone"), None, 404, "model", "not_found", "gone"),
        (TenantNotFound("no tenant named 'x'"), "x", 404, "tenant", "not_found", "Tenant 'x' does not exist."),
    ],
)
def test_domain_errors_map_to_openai_errors(
    error: Exception, subject: str | None, status: int, param: str, code: str, message: str
) -> None:
    api = api_error(error, subject)
    assert (api.status_code, api.param, api.code, api.message) == (status, param, code, message)
    assert api.error_type == "invalid_request_error"


def test_the_table_covers_subclasses_and_refuses_the_unknown() -> None:
    class Narrower(TenantNotFound):
        pass

    assert api_error(Narrower("n"), "n").status_code == 404
    with pytest.raises(TypeError, match="no HTTP mapping"):
        api_error(ValueError("x"))


def test_an_uncaught_domain_error_is_answered_from_the_table(tmp_path: Path) -> None:
    app = create_app(load_settings(environ={"TUNESERVE_DATA_DIR": str(tmp_path)}), engines=[])

    @app.get("/raise/{kind}")
    async def boom(kind: str) -> None:
        raise {"rejected": AdapterRejected("too_large", "big"), "tenant": TenantNotFound("t")}[kind]

    client = TestClient(app)
    rejected = client.get("/raise/rejected")
    assert rejected.status_code == 413
    assert rejected.json() == {
        "error": {
            "message": "adapter rejected (too_large): big",
            "type": "invalid_request_error",
            "param": "file",
            "code": "too_large",
        }
    }
    assert client.get("/raise/tenant").json()["error"]["param"] == "tenant"
    assert set(DOMAIN_ERRORS) <= set(app.exception_handlers)


def test_error_bodies_are_the_documented_shape() -> None:
    body = ApiError("m", param="p", code="c").body()
    assert set(body) == set(OpenAIError.model_fields)
    assert set(body["error"]) == set(ErrorDetail.model_fields)
    OpenAIError.model_validate(body)
    # Subclasses set status, type and code, not the shape; /ready's 503 adds its engines.
    assert {c for c in _subclasses(ApiError) if "body" in vars(c)} == {ApiError, EnginesNotReady}


def test_not_ready_body_is_an_error_with_engines() -> None:
    state = EngineState(name="llamacpp", ready=False, detail="loading", extra={"workers": 0})
    body = EnginesNotReady({"llamacpp": state}).body()
    assert body["error"]["code"] == "engine_unavailable"
    shown = {"name": "llamacpp", "ready": False, "detail": "loading", "extra": {"workers": 0}}
    assert body["engines"] == {"llamacpp": shown}


def test_generation_error_statuses_come_from_the_error_classes() -> None:
    statuses = error_statuses(GENERATION_ERRORS)
    assert list(statuses) == ["400", "401", "404", "408", "413", "429", "502", "503", "504"]


def test_openapi_documents_what_the_generation_routes_answer(tmp_path: Path) -> None:
    """Every status the generation routes answer with, each in the OpenAI error shape."""
    app = create_app(load_settings(environ={"TUNESERVE_DATA_DIR": str(tmp_path)}), engines=[])
    schema = TestClient(app).get("/openapi.json").json()
    components = schema["components"]["schemas"]
    assert set(components["ErrorDetail"]["properties"]) == set(ErrorDetail.model_fields)
    assert components["OpenAIError"]["properties"]["error"] == {"$ref": "#/components/schemas/ErrorDetail"}
    documented = error_statuses(GENERATION_ERRORS)
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = schema["paths"][path]["post"]["responses"]
        errors = {status: doc for status, doc in responses.items() if status != "200"}
        # The 408 and 503 of the body gate, the 413 of the size limit, the engines' 429/502/503/504...
        assert set(errors) == {"400", "401", "404", "408", "413", "429", "502", "503", "504"} == set(documented)
        for doc in errors.values():
            assert doc["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OpenAIError"}
    assert str(BodyTimeout.status_code) in documented and "server_busy" in documented[str(ServerBusy.status_code)]


@pytest.mark.parametrize(
    ("estimate", "header"),
    [(0.0, "1"), (-3.0, "1"), (0.2, "1"), (2.1, "3"), (59.5, "60"), (3600.0, "60"), (float("inf"), "60"), (float("nan"), "60")],
)
def test_retry_after_is_whole_seconds_within_a_minute(estimate: float, header: str) -> None:
    assert retry_after(estimate) == {"Retry-After": header}


def _reason_literals() -> list[tuple[str, str]]:
    """(where, reason) for every literal reason given to EngineUnavailable or the router."""
    found = []
    for path in sorted((ROOT / "serving").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            positions = {EngineUnavailable.__name__: slice(0, 1), "_fell_back": slice(1, 2)}
            args = node.args[positions[name]] if name in positions else []
            for arg in args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    found.append((f"{path.relative_to(ROOT)}:{node.lineno}", arg.value))
    return found


def test_fallback_reasons_are_a_closed_set() -> None:
    literals = _reason_literals()
    assert len(literals) >= 10  # the scan sees the engines' raises
    assert [(where, reason) for where, reason in literals if reason not in FALLBACK_REASONS] == []
    assert set(FALLBACK_REASONS) == {reason for _, reason in literals}, "a reason nobody raises"
