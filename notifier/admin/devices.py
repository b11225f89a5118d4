"""The device registry over the owner API, for the ops role (notifier; ops -> here -> registry).

Part of :mod:`notifier.admin`: ``/api/v1/admin/product-lines`` (a product model with a
product file) and ``/api/v1/admin/devices`` (add one, list a page, get, retire) and
``/api/v1/admin/device-imports`` (in bulk, from a JSON list or a CSV body, with a report
per row). Device broker logins are issued and revoked through the onboarding's
:class:`~notifier.registry.BrokerAccounts`, when one is given. :data:`ROUTES` is this
module's part of the route table.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Final, cast

from aiohttp import web

from notifier.admin.bodies import (
    MAX_IMPORT_ROWS,
    MODEL_PATTERN,
    DeviceRequest,
    ImportRequest,
    ProductLineRequest,
)
from notifier.admin.onboarding import (
    NO_CLAIM_KEY,
    Onboarding,
    claim_key_of,
    onboarding_of,
    ops_actor,
)
from notifier.admin.views import (
    ImportReport,
    ProductLineList,
    ProductLineView,
    RegistryDeviceList,
    RegistryDeviceView,
    RowError,
    RowReport,
)
from notifier.api.middleware import Route, api_path
from notifier.edge import MAX_BODY_BYTES, ApiError, ErrorView, json_response, path_id, read_body
from notifier.errors import InvalidRequestError
from notifier.keys import CLOCK_KEY
from notifier.openapi import Operation, QueryParam, Reply
from notifier.registry import (
    DEVICE_COLUMNS,
    DeviceState,
    NewDevice,
    ParsedRow,
    ProductLine,
    RegisteredDevice,
    device_from_fields,
    read_device_csv,
)
from wire.errors import FixloopError

__all__ = ["ROUTES"]

_LOG = logging.getLogger(__name__)

_ID: Final = "{id}"


def _device_view(device: RegisteredDevice, claim_code: str | None = None) -> RegistryDeviceView:
    return RegistryDeviceView(
        device_id=device.device_id,
        model=device.model,
        serial=device.serial,
        region=device.region,
        firmware=device.firmware,
        batch=device.batch,
        state=device.state,
        owner_id=device.owner_id,
        registered_at=device.registered_at,
        retired_at=device.retired_at,
        claim_code=claim_code,
    )


def _line_view(line: ProductLine, models: frozenset[str]) -> ProductLineView:
    return ProductLineView(
        model=line.model,
        name=line.name,
        created_at=line.created_at,
        devices=line.devices,
        product_file=line.model in models,
    )


async def _issue_logins(onboarding: Onboarding, device_ids: Sequence[str]) -> list[str]:
    """Issue broker logins; return the devices whose login could not be issued."""
    if onboarding.accounts is None:
        return []
    if not device_ids:
        return []
    try:
        await onboarding.accounts.issue(device_ids)
    except FixloopError as exc:
        _LOG.warning("broker logins of %d devices not issued: %s", len(device_ids), exc)
        return list(device_ids)
    return []


async def _list_lines(request: web.Request) -> web.Response:
    await ops_actor(request)
    onboarding = onboarding_of(request)
    lines = await onboarding.registry.product_lines()
    return json_response(
        ProductLineList(product_lines=[_line_view(x, onboarding.models) for x in lines])
    )


async def _add_line(request: web.Request) -> web.Response:
    actor = await ops_actor(request)
    body = await read_body(request, ProductLineRequest)
    onboarding = onboarding_of(request)
    if body.model not in onboarding.models:
        message = (
            f"model: no product file describes {body.model!r} here (known: "
            f"{', '.join(sorted(onboarding.models))}); add it to the products folder and "
            "check it with `fixloop products check`"
        )
        raise ApiError(422, "unknown_model", message, "model")
    now = request.app[CLOCK_KEY]()
    line = await onboarding.registry.put_product_line(
        ProductLine(body.model, body.name or body.model, now)
    )
    _LOG.info("product line %s registered by %s", line.model, actor)
    return json_response(_line_view(line, onboarding.models), 201)


def _report(
    rows: Sequence[ParsedRow], outcomes: dict[int, tuple[str | None, list[RowError]]]
) -> ImportReport:
    reports: list[RowReport] = []
    for row in rows:
        code, errors = outcomes.get(row.line, (None, []))
        all_errors = [RowError(column=c, message=m) for c, m in row.errors] + errors
        reports.append(
            RowReport(
                row=row.line,
                device_id=None if row.device is None else row.device.device_id,
                status="failed" if all_errors else "added",
                claim_code=None if all_errors else code,
                errors=all_errors,
            )
        )
    added = sum(1 for r in reports if r.status == "added")
    return ImportReport(added=added, failed=len(reports) - added, rows=reports)


async def _register(
    request: web.Request, rows: Sequence[ParsedRow], actor: str
) -> tuple[dict[int, tuple[str | None, list[RowError]]], list[str]]:
    """Register the rows that could be read; their outcomes by row, devices left without login."""
    onboarding = onboarding_of(request)
    key = claim_key_of(onboarding)
    ready = [row for row in rows if row.device is not None]
    devices: list[NewDevice] = [row.device for row in ready if row.device is not None]
    outcomes = await onboarding.registry.register(
        devices, key=key, now=request.app[CLOCK_KEY](), actor=actor
    )
    by_row: dict[int, tuple[str | None, list[RowError]]] = {}
    for row, outcome in zip(ready, outcomes, strict=True):
        by_row[row.line] = (
            outcome.claim_code,
            [RowError(column=c, message=m) for c, m in outcome.errors],
        )
    failed = await _issue_logins(onboarding, [o.device_id for o in outcomes if o.ok])
    if failed:
        # registered all the same; `fixloop devices credentials issue` gives them one
        _LOG.warning("%d devices registered without a broker login", len(failed))
    return by_row, failed


#: Columns whose error on a well-formed row means the value is taken.
_TAKEN: Final = frozenset(("device_id", "serial", "claim_code"))


async def _add_device(request: web.Request) -> web.Response:
    actor = await ops_actor(request)
    body = await read_body(request, DeviceRequest)
    row = device_from_fields(1, body.model_dump(exclude_none=True))
    outcomes, _ = await _register(request, [row], actor)
    report = _report([row], outcomes)
    only = report.rows[0]
    if only.status == "failed":
        first = only.errors[0]
        taken = row.device is not None and first.column in _TAKEN
        status, code = (409, "conflict") if taken else (422, "invalid_request")
        raise ApiError(status, code, f"{first.column}: {first.message}", first.column or None)
    assert row.device is not None
    device = await onboarding_of(request).registry.get(row.device.device_id)
    if device is None:  # pragma: no cover - it was registered in this request
        raise ApiError(503, "unavailable", "please try again in a moment")
    return json_response(_device_view(device, only.claim_code), 201)


def _parse_csv_body(raw: bytes) -> list[ParsedRow]:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ApiError(400, "invalid_body", "the CSV body must be UTF-8") from exc
    try:
        rows = list(read_device_csv(text.splitlines()))
    except InvalidRequestError as exc:
        raise ApiError(400, "invalid_body", str(exc)) from exc
    if len(rows) > MAX_IMPORT_ROWS:
        raise ApiError(
            400, "invalid_body", f"at most {MAX_IMPORT_ROWS} rows a request (use the command)"
        )
    if not rows:
        raise ApiError(400, "invalid_body", "the CSV body has no device rows")
    return rows


async def _import_devices(request: web.Request) -> web.Response:
    actor = await ops_actor(request)
    if request.content_type == "text/csv":
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(
                max_size=MAX_BODY_BYTES, actual_size=request.content_length
            )
        rows = _parse_csv_body(await request.read())
    else:
        body = await read_body(request, ImportRequest)
        rows = [device_from_fields(i + 1, fields) for i, fields in enumerate(body.devices)]
    outcomes, without_login = await _register(request, rows, actor)
    report = _report(rows, outcomes)
    return json_response(report.model_copy(update={"without_broker_login": without_login}))


_STATES: Final = ("unclaimed", "claimed", "retired")


async def _list_registry(request: web.Request) -> web.Response:
    await ops_actor(request)
    query = request.query
    model = query.get("model")
    if model is not None and not re.fullmatch(MODEL_PATTERN, model):
        raise ApiError(400, "invalid_query", "model: is not a product model name", "model")
    state = query.get("state")
    if state is not None and state not in _STATES:
        raise ApiError(
            400, "invalid_query", "state: must be unclaimed, claimed or retired", "state"
        )
    after = query.get("after")
    if after is not None and not 1 <= len(after) <= 64:
        raise ApiError(400, "invalid_query", "after: must be a device id", "after")
    text = query.get("limit", "100")
    if not re.fullmatch(r"[1-9][0-9]{0,2}|1000", text):
        raise ApiError(400, "invalid_query", "limit: must be 1 to 1000", "limit")
    limit = int(text)
    found = await onboarding_of(request).registry.list(
        model=model,
        state=cast(DeviceState | None, state),
        after=after,
        limit=limit + 1,
    )
    page = found[:limit]
    return json_response(
        RegistryDeviceList(
            devices=[_device_view(d) for d in page],
            next=page[-1].device_id if len(found) > limit else None,
        )
    )


async def _get_registered(request: web.Request) -> web.Response:
    await ops_actor(request)
    device_id = path_id(request)
    device = await onboarding_of(request).registry.get(device_id)
    if device is None:
        raise ApiError(404, "not_found", f"there is no registered device {device_id}")
    return json_response(_device_view(device))


async def _retire(request: web.Request) -> web.Response:
    actor = await ops_actor(request)
    device_id = path_id(request)
    onboarding = onboarding_of(request)
    if await onboarding.registry.get(device_id) is None:
        raise ApiError(404, "not_found", f"there is no registered device {device_id}")
    if onboarding.accounts is not None:
        # first: should the broker be away, nothing has changed and a retry finishes it
        await onboarding.accounts.revoke(device_id)
    device = await onboarding.registry.retire(device_id, now=request.app[CLOCK_KEY](), actor=actor)
    return json_response(_device_view(device))


# -- routes ---------------------------------------------------------------------------------

ROUTES: Final[tuple[Route, ...]] = (
    (
        Operation(
            "GET",
            api_path("/admin/product-lines"),
            "listProductLines",
            "The product lines and how many devices each has",
            "admin",
            "ops",
            replies=(Reply(200, "The product lines, by model.", ProductLineList),),
        ),
        _list_lines,
    ),
    (
        Operation(
            "POST",
            api_path("/admin/product-lines"),
            "addProductLine",
            "Register a product line (a product model with a product file)",
            "admin",
            "ops",
            body=ProductLineRequest,
            replies=(
                Reply(201, "Registered (an existing one takes the new name).", ProductLineView),
                Reply(422, "No product file describes the model here.", ErrorView),
            ),
        ),
        _add_line,
    ),
    (
        Operation(
            "GET",
            api_path("/admin/devices"),
            "listRegisteredDevices",
            "Registered devices, a page at a time",
            "admin",
            "ops",
            query=(
                QueryParam(
                    "model", "only this product line", {"type": "string", "pattern": MODEL_PATTERN}
                ),
                QueryParam(
                    "state",
                    "only devices in this state",
                    {"type": "string", "enum": list(_STATES)},
                ),
                QueryParam(
                    "after",
                    "the page after this device id (the previous page's `next`)",
                    {"type": "string", "minLength": 1, "maxLength": 64},
                ),
                QueryParam(
                    "limit",
                    "devices a page (1 to 1000, default 100)",
                    {"type": "string", "pattern": "^([1-9][0-9]{0,2}|1000)$"},
                ),
            ),
            replies=(Reply(200, "A page of devices, by id.", RegistryDeviceList),),
        ),
        _list_registry,
    ),
    (
        Operation(
            "POST",
            api_path("/admin/devices"),
            "addDevice",
            "Register one device; its claim code is answered once",
            "admin",
            "ops",
            body=DeviceRequest,
            replies=(
                Reply(201, "Registered, with its claim code.", RegistryDeviceView),
                Reply(
                    409,
                    "The device id, the serial (in its product line) or the claim code is taken.",
                    ErrorView,
                ),
                Reply(
                    422, "The product line is not registered, or a value breaks a rule.", ErrorView
                ),
                NO_CLAIM_KEY,
            ),
        ),
        _add_device,
    ),
    (
        Operation(
            "POST",
            api_path("/admin/device-imports"),
            "importDevices",
            "Register devices in bulk, with a report per row",
            "admin",
            "ops",
            body=ImportRequest,
            replies=(
                Reply(
                    200,
                    "One report a row: added ones with their claim codes (shown once), "
                    "failed ones with each column that is wrong.",
                    ImportReport,
                ),
                NO_CLAIM_KEY,
            ),
            description=(
                "Each row is checked and registered on its own; a bad row does not stop "
                "the others. The body is a JSON object with a `devices` list, or a CSV "
                f"file (`Content-Type: text/csv`, columns {', '.join(DEVICE_COLUMNS)}; "
                f"`model` and `serial` required) of at most {MAX_IMPORT_ROWS} rows and "
                f"{MAX_BODY_BYTES // 1024} KiB; larger files: `fixloop devices import`."
            ),
        ),
        _import_devices,
    ),
    (
        Operation(
            "GET",
            api_path(f"/admin/devices/{_ID}"),
            "getRegisteredDevice",
            "One registered device",
            "admin",
            "ops",
            replies=(Reply(200, "The device.", RegistryDeviceView),),
        ),
        _get_registered,
    ),
    (
        Operation(
            "POST",
            api_path(f"/admin/devices/{_ID}/retire"),
            "retireDevice",
            "Take a device out of service (its claim code and broker login stop working)",
            "admin",
            "ops",
            replies=(
                Reply(200, "Retired.", RegistryDeviceView),
                Reply(409, "It is retired already.", ErrorView),
            ),
        ),
        _retire,
    ),
)
