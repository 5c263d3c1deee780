"""The protocol registry of the app: the three registered protocols and their routes (the app itself serves only
/health and /metrics), and a toy fourth protocol registered in a test app, which gets the API-key check, the
JSON body reader, its own error shape for every error raised before a response starts (RequestError, bad JSON,
404 under its prefix, 405, an unexpected exception) and its own metrics label, while the existing protocols keep
theirs. In process (no model, no server): every request here fails or returns before reaching a backend."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import APIRouter, Request
from fastapi.testclient import TestClient

from dsv4.serve.app import PROTOCOLS, Registry, create_app
from dsv4.serve.context import ServeConfig, ServeContext
from dsv4.serve.plumbing import read_json
from dsv4.serve.protocols import WireProtocol
from dsv4.serve.request import RequestError

KEY = "sk-registry"


def context() -> ServeContext:
    return ServeContext(backend=None, config=ServeConfig(served_model_names=["m"], api_keys=[KEY]))


def routes_of(registry: Registry, name: str) -> set[tuple[str, str, bool]]:
    return {(route.path, method, route.include_in_schema) for route in registry.routes[name]
            for method in route.methods}


def test_registry_lists_the_three_protocols_with_their_routes():
    app = create_app(context())
    registry = app.state.protocols
    assert [p.name for p in registry.protocols] == ["openai-chat", "openai-completions", "anthropic"]
    assert [p.family for p in registry.protocols] == ["openai", "openai", "anthropic"]
    assert routes_of(registry, "openai-chat") == {
        ("/v1/chat/completions", "POST", True), ("/chat/completions", "POST", True),
        ("/v1/models", "GET", True), ("/models", "GET", True),
        ("/v1/models/{name:path}", "GET", True), ("/models/{name:path}", "GET", True)}
    assert routes_of(registry, "openai-completions") == {("/v1/completions", "POST", True),
                                                         ("/completions", "POST", True)}
    assert routes_of(registry, "anthropic") == {
        ("/v1/messages", "POST", True), ("/v1/messages/count_tokens", "POST", True),
        ("/anthropic/v1/messages", "POST", False), ("/anthropic/v1/messages/count_tokens", "POST", False)}
    protocol_paths = {route.path_format for routes in registry.routes.values() for route in routes}
    assert set(app.openapi()["paths"]) - protocol_paths == {"/health", "/metrics"}  # the app's own routes
    for proto in registry.protocols:
        for route in registry.routes[proto.name]:
            assert registry.owner({"route": route, "path": route.path}) is proto


def test_registry_needs_unique_names():
    with pytest.raises(ValueError):
        Registry([PROTOCOLS[0], PROTOCOLS[0]])
    with pytest.raises(ValueError):
        Registry([])


# ------------------------------------------------------------------------------------------------ a toy protocol
def toy_error(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"toy_error": {"status": status, "message": message, "param": param}}


def toy_router(ctx: ServeContext) -> APIRouter:
    api = APIRouter()

    @api.post("/toy/echo")
    async def echo(request: Request) -> dict[str, Any]:
        body = await read_json(request)
        if not isinstance(body, dict) or "say" not in body:
            raise RequestError(400, "say what?", param="say")
        if body["say"] == "crash":
            raise RuntimeError("the toy broke")
        return {"said": body["say"], "models": ctx.config.served_model_names}

    return api


TOY = WireProtocol(name="toy", family="toy", prefixes=("/toy/",), error_body=toy_error, router=toy_router)


@pytest.fixture(scope="module")
def toy_client():
    app = create_app(context(), protocols=(*PROTOCOLS, TOY))
    with TestClient(app, raise_server_exceptions=False, headers={"x-api-key": KEY}) as client:
        yield client


def assert_toy(r, status: int, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"toy_error"} and body["toy_error"]["status"] == status
    assert body["toy_error"]["param"] == param and body["toy_error"]["message"]


def test_toy_protocol_routes_and_error_shape(toy_client):
    r = toy_client.post("/toy/echo", json={"say": "hi"})
    assert r.status_code == 200 and r.json() == {"said": "hi", "models": ["m"]}
    assert_toy(toy_client.post("/toy/echo", json={"x": 1}), 400, "say")  # a RequestError raised in its route
    assert_toy(toy_client.post("/toy/echo", content=b"{nope"), 400)  # the app's one JSON body reader
    assert_toy(toy_client.post("/toy/echo", json={}, headers={"x-api-key": "wrong"}), 401)  # the app's key check
    assert_toy(toy_client.get("/toy/echo"), 405)  # the route matched, the method did not
    assert_toy(toy_client.post("/toy/nothing", json={}), 404)  # no route: its prefix claims the path
    assert_toy(toy_client.post("/toy/echo", json={"say": "crash"}), 500)  # an unexpected exception


def test_existing_protocols_keep_their_error_shapes_next_to_the_toy(toy_client):
    for path in ("/v1/chat/completions", "/v1/completions", "/nothing"):  # /nothing: the default shape
        r = toy_client.post(path, json={})
        assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = toy_client.post("/anthropic/v1/messages", json={})
    assert r.status_code == 400 and r.json()["type"] == "error" and set(r.json()["error"]) == {"type", "message"}
    r = toy_client.get("/models", headers={"x-api-key": "wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_metrics_count_requests_by_protocol_family(toy_client):
    toy_client.post("/toy/echo", json={"say": "hi"})
    toy_client.get("/v1/models")
    toy_client.get("/models")
    toy_client.post("/v1/messages/count_tokens", json={})
    toy_client.get("/nothing")
    text = toy_client.get("/metrics").text
    for line in ('{protocol="toy",status="200"}', '{protocol="openai",status="200"}',
                 '{protocol="anthropic",status="400"}', '{protocol="other",status="404"}'):
        assert "dsv4_requests_total" + line in text, line


def test_no_page_of_the_server_loads_from_outside(toy_client):
    """FastAPI's /docs and /redoc fetch their scripts from a CDN, which an offline machine cannot reach: they are
    off (404 in the OpenAI error shape), the schema stays served, and nothing the server sends names a CDN."""
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        r = toy_client.get(path)
        assert r.status_code == 404 and "error" in r.json(), path
    schema = toy_client.get("/openapi.json")
    assert schema.status_code == 200 and "/v1/chat/completions" in schema.json()["paths"]
    for r in (schema, toy_client.get("/")):
        assert "cdn." not in r.text and "jsdelivr" not in r.text and "unpkg" not in r.text


def test_head_on_the_root_is_answered(toy_client):
    """Claude Code probes its base URL with `HEAD /` before the first request: 200 with no body, not a 405."""
    r = toy_client.head("/")
    assert r.status_code == 200 and r.content == b""
