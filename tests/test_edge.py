"""What the owner API and the ops dashboard share at their HTTP edge: statuses and bodies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pydantic import BaseModel

from dashboard.middleware import error_middleware as dashboard_errors
from dashboard.middleware import read_json as dashboard_body
from notifier.api.middleware import edge_middleware as api_edge
from notifier.edge import ERROR_STATUS, MAX_BODY_BYTES, error_status
from notifier.errors import (
    ConflictError,
    ExpiredLinkError,
    ForbiddenError,
    InvalidLinkError,
    UnsafeAddressError,
)

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[[web.Application], Awaitable[Client]]


def test_each_error_has_its_status_and_subclasses_come_first() -> None:
    assert error_status(ExpiredLinkError("x")) == (410, "link_expired")
    assert error_status(InvalidLinkError("x")) == (403, "invalid_link")
    assert error_status(ForbiddenError("x")) == (403, "forbidden")
    assert error_status(UnsafeAddressError("x")) == (422, "unsafe_target")
    assert error_status(ConflictError("x")) == (409, "conflict")
    assert error_status(ValueError("x")) is None
    kinds = [kind for kind, _status, _code in ERROR_STATUS]
    for index, kind in enumerate(kinds):
        # no row is shadowed by a more general one above it
        assert not any(issubclass(kind, earlier) for earlier in kinds[:index])


def _raising(exc: Exception) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        raise exc

    return handler


@pytest.mark.parametrize(("kind", "status", "code"), ERROR_STATUS)
async def test_the_owner_api_and_the_dashboard_answer_an_error_alike(
    aiohttp_client: ClientFactory, kind: type[Exception], status: int, code: str
) -> None:
    statuses = []
    for middleware in (api_edge, dashboard_errors):
        app = web.Application(middlewares=[middleware])
        app.router.add_get("/api/v1/x", _raising(kind("went wrong")))
        client = await aiohttp_client(app)
        resp = await client.get("/api/v1/x")
        statuses.append(resp.status)
        assert "went wrong" in await resp.text()
    assert statuses == [status, status]


class _Note(BaseModel):
    text: str = "none"


@pytest.fixture
async def dashboard(aiohttp_client: ClientFactory) -> Client:
    async def note(request: web.Request) -> web.Response:
        body: _Note = await dashboard_body(request, _Note)
        return web.json_response({"text": body.text})

    app = web.Application(middlewares=[dashboard_errors], client_max_size=256 * 1024)
    app.router.add_post("/note", note)
    return await aiohttp_client(app)


async def _post(client: Client, **kwargs: Any) -> tuple[int, Any]:
    resp = await client.post("/note", **kwargs)
    return resp.status, await resp.json()


async def test_the_dashboard_reads_its_bodies_with_the_shared_reader(dashboard: Client) -> None:
    assert await _post(dashboard, json={"text": "hi"}) == (200, {"text": "hi"})
    assert await _post(dashboard) == (200, {"text": "none"})  # no body: {}
    status, error = await _post(dashboard, json={"text": 5})
    assert status == 422
    assert error["error"].startswith("invalid request: text: ")
    status, error = await _post(dashboard, data=b"{", headers={"Content-Type": "application/json"})
    assert (status, error) == (422, {"error": "invalid request: the body is not valid JSON"})
    status, _ = await _post(dashboard, data=b"text=hi", headers={"Content-Type": "text/plain"})
    assert status == 422


async def test_a_body_too_large_is_refused_however_it_is_sent(dashboard: Client) -> None:
    big = b'{"text": "' + b"x" * MAX_BODY_BYTES + b'"}'
    json_type = {"Content-Type": "application/json"}
    assert (await _post(dashboard, data=big, headers=json_type))[0] == 422

    async def chunks() -> Any:  # no Content-Length: only the bytes read can tell
        yield big

    assert (await _post(dashboard, data=chunks(), headers=json_type))[0] == 422
