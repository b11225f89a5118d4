"""The OpenAPI 3.1 description of the owner REST API (notifier; served by :mod:`notifier.api`).

The API's route table is a list of :class:`Operation` records; the app registers its
routes from that table and :func:`build_document` describes the same table, so a route
and its description cannot drift apart. Request and response bodies are the pydantic
models of the edge: their JSON Schema (draft 2020-12, OpenAPI 3.1's dialect) goes into
``components.schemas`` as is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from notifier.store import PrincipalKind
from wire.errors import ConfigError

__all__ = ["OPENAPI_VERSION", "Operation", "QueryParam", "Reply", "build_document"]

#: The OpenAPI version the document follows.
OPENAPI_VERSION: Final = "3.1.0"

_REF_TEMPLATE: Final = "#/components/schemas/{model}"
_PATH_PARAM: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WHO: Final[dict[str, str]] = {
    "owner": "a device owner's token",
    "technician": "a technician's token",
    "ops": "an operations token",
}


@dataclass(frozen=True, slots=True)
class QueryParam:
    """A query string parameter of an operation.

    Attributes:
        name: the parameter's name.
        description: plain words on what it does.
        schema: its JSON Schema.
        required: whether it must be given.
    """

    name: str
    description: str
    schema: dict[str, Any]
    required: bool = False


@dataclass(frozen=True, slots=True)
class Reply:
    """One documented response of an operation.

    Attributes:
        status: HTTP status code.
        description: plain words on when it comes.
        model: the body's model (``None``: no body, or ``schema`` describes it).
        schema: a JSON Schema for a body that has no model.
        media_type: the body's media type.
        headers: response headers worth naming: name -> description.
    """

    status: int
    description: str
    model: type[BaseModel] | None = None
    schema: dict[str, Any] | None = None
    media_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Operation:
    """One route of the API and what it means.

    Attributes:
        method: HTTP method (upper case).
        path: the full path, with ``{name}`` placeholders.
        operation_id: unique name of the operation (also the aiohttp route name).
        summary: one line on what it does.
        tag: the group it is listed under.
        principal: who may call it (``None``: anyone, no token).
        body: the request body's model, if it takes one.
        query: its query parameters.
        replies: its responses; the usual errors are added by :func:`build_document`
            unless given here in its own words.
        description: longer plain words, if useful.
    """

    method: Literal["GET", "POST", "PATCH", "DELETE", "PUT"]
    path: str
    operation_id: str
    summary: str
    tag: str
    principal: PrincipalKind | None
    body: type[BaseModel] | None = None
    query: tuple[QueryParam, ...] = ()
    replies: tuple[Reply, ...] = ()
    description: str = ""


def _models(
    operations: Sequence[Operation], error_model: type[BaseModel]
) -> list[tuple[type[BaseModel], JsonSchemaMode]]:
    """Every model the operations name, once each, in a stable order."""
    seen: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {
        (error_model, "serialization"): None
    }
    for op in operations:
        if op.body is not None:
            seen[(op.body, "validation")] = None
        for reply in op.replies:
            if reply.model is not None:
                seen[(reply.model, "serialization")] = None
    return list(seen)


def _content(schema: dict[str, Any], media_type: str = "application/json") -> dict[str, Any]:
    return {media_type: {"schema": schema}}


def _error_replies(op: Operation, error_ref: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The error responses every operation of its kind may give."""
    errors: dict[int, str] = {}
    if op.principal is not None:
        errors[401] = "No token, or a token that is not (or no longer) valid."
        errors[403] = f"The token is not {_WHO[op.principal]}."
    if _PATH_PARAM.search(op.path):
        errors[404] = "No such thing, or not the caller's."
    if op.body is not None:
        errors[400] = "The body is not JSON, or breaks the schema (the field is named)."
        errors[409] = "The request clashes with the current state (a case moved on, a slot taken)."
        errors[413] = "The body is too large."
        errors[415] = "The body is not JSON."
        errors[422] = "The request is well-formed but cannot be carried out."
    elif op.query:
        errors[400] = "A query parameter is not valid (the parameter is named)."
    errors[500] = "Something went wrong on our side; the request id header identifies it."
    errors[503] = "A store is briefly unavailable: try again shortly."
    out: dict[str, dict[str, Any]] = {}
    for status in sorted(errors):
        reply: dict[str, Any] = {"description": errors[status], "content": _content(error_ref)}
        if status == 401:
            reply["headers"] = {
                "WWW-Authenticate": {
                    "description": "`Bearer` (RFC 6750).",
                    "schema": {"type": "string"},
                }
            }
        out[str(status)] = reply
    return out


def _operation(
    op: Operation,
    refs: Mapping[tuple[Any, JsonSchemaMode], dict[str, Any]],
    error_ref: dict[str, Any],
    request_id_header: str,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "tags": [op.tag],
    }
    if op.description:
        doc["description"] = op.description
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "maxLength": 128},
        }
        for name in _PATH_PARAM.findall(op.path)
    ]
    parameters.extend(
        {
            "name": param.name,
            "in": "query",
            "required": param.required,
            "description": param.description,
            "schema": param.schema,
        }
        for param in op.query
    )
    if parameters:
        doc["parameters"] = parameters
    if op.body is not None:
        doc["requestBody"] = {
            "required": True,
            "content": _content(refs[(op.body, "validation")]),
        }
    responses: dict[str, Any] = {}
    for reply in op.replies:
        entry: dict[str, Any] = {"description": reply.description}
        if reply.model is not None:
            entry["content"] = _content(refs[(reply.model, "serialization")], reply.media_type)
        elif reply.schema is not None:
            entry["content"] = _content(reply.schema, reply.media_type)
        headers = {
            request_id_header: {
                "description": "Identifies the request in the server's log.",
                "schema": {"type": "string"},
            }
        }
        headers.update(
            (name, {"description": text, "schema": {"type": "string"}})
            for name, text in reply.headers
        )
        entry["headers"] = headers
        responses[str(reply.status)] = entry
    # an operation that describes one of the usual errors in its own words keeps them
    for status, error in _error_replies(op, error_ref).items():
        responses.setdefault(status, error)
    doc["responses"] = responses
    doc["security"] = [] if op.principal is None else [{"bearer": []}]
    return doc


def build_document(
    operations: Sequence[Operation],
    *,
    title: str,
    version: str,
    description: str,
    error_model: type[BaseModel],
    server_url: str | None = None,
    request_id_header: str = "X-Request-Id",
) -> dict[str, Any]:
    """Describe the operations as an OpenAPI 3.1 document.

    Args:
        operations: the API's route table.
        title: the API's name.
        version: the API's version.
        description: plain words on the API.
        error_model: the model of every error body.
        server_url: where the API is reached (``None``: relative to the document).
        request_id_header: the header that names each request.

    Returns:
        The document, as JSON-serialisable data.

    Raises:
        ConfigError: two operations share a method and path, or an operation id.
    """
    models = _models(operations, error_model)
    refs, defs = models_json_schema(models, ref_template=_REF_TEMPLATE)
    error_ref = refs[(error_model, "serialization")]
    paths: dict[str, dict[str, Any]] = {}
    ids: set[str] = set()
    for op in operations:
        method = op.method.lower()
        if method in paths.get(op.path, {}) or op.operation_id in ids:
            # a programming error in the route table, caught by the API's tests
            raise ConfigError(f"{op.method} {op.path} ({op.operation_id}) is described twice")
        ids.add(op.operation_id)
        paths.setdefault(op.path, {})[method] = _operation(op, refs, error_ref, request_id_header)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": title, "version": version, "description": description},
        "servers": [{"url": server_url or "/"}],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": (
                        "An API token: a device owner's, a technician's or ops'. Where the "
                        "install accepts them, an owner may instead send an OpenID Connect "
                        "access token (JWT) of the manufacturer's identity provider."
                    ),
                }
            },
        },
        "tags": [{"name": tag} for tag in sorted({op.tag for op in operations})],
    }
