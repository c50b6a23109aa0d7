"""What every resource module needs: the Vmm from the app, body parsing, IDs, responses."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TypeVar

from fastapi import Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from controlplane import logger as fclog
from controlplane.models import BodyError, parse_body
from controlplane.state import ApiError, Vmm

M = TypeVar("M", bound=BaseModel)
log = fclog.get("api")

_ID = re.compile(r"^[A-Za-z0-9_]+$")
ID_MISMATCH = "The id from the path does not match the id from the body!"


def vmm(request: Request) -> Vmm:
    """The Vmm the app was created for."""
    return request.app.state.vmm  # type: ignore[no-any-return]


async def raw_body(request: Request) -> bytes:
    """The request body (already size-checked and buffered by the guard middleware)."""
    return await request.body()


def parse(model: type[M], body: bytes) -> M:
    try:
        return parse_body(model, body)
    except BodyError as err:
        raise ApiError(str(err)) from None


def checked_id(resource_id: str) -> str:
    """Firecracker's resource ID rule: not empty, only ASCII letters, digits and '_'."""
    if not resource_id:
        raise ApiError("The ID cannot be empty.")
    if not _ID.match(resource_id):
        raise ApiError("API Resource IDs can only contain alphanumeric characters and underscores.")
    return resource_id


def same_id(path_id: str, body_id: str) -> None:
    if path_id != body_id:
        raise ApiError(ID_MISMATCH)


def no_content(deprecated: bool = False) -> Response:
    response = Response(status_code=204)
    if deprecated:
        response.headers["Deprecation"] = "true"
    return response


def ok(payload: object) -> JSONResponse:
    return JSONResponse(payload, status_code=200)


@contextmanager
def counted(request: Request, group: str, name: str) -> Iterator[None]:
    """Count a request in Firecracker's <group>.<name>_count, and its failure in _fails."""
    metrics = vmm(request).metrics
    metrics.inc(group, f"{name}_count")
    try:
        yield
    except ApiError:
        if group != "get_api_requests":
            metrics.inc(group, f"{name}_fails")
        raise


def deprecated(request: Request, what: str) -> None:
    """Record the use of a deprecated field, as Firecracker does (log + metric + header)."""
    vmm(request).metrics.inc("deprecated_api", "deprecated_http_api_calls")
    log.warning("%s %s: %s is deprecated.", request.method, request.url.path, what)
