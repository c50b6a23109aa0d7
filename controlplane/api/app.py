"""The FastAPI application: resource routers, Firecracker-style errors, the request guard."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect

import fastapi.routing
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute

from controlplane.api import (
    actions,
    balloon,
    boot_source,
    cpu_config,
    drives,
    embervm,
    entropy,
    faults,
    instance,
    logger,
    machine_config,
    metrics,
    mmds,
    network,
    restart_policy,
    snapshot,
    unsupported,
    vsock,
)
from controlplane.api.common import log
from controlplane.api.guard import DEFAULT_MAX_PAYLOAD, FirecrackerGuard, first_token
from controlplane.state import ApiError, Vmm

_ROUTERS = (
    instance,
    actions,
    boot_source,
    machine_config,
    cpu_config,
    drives,
    network,
    vsock,
    entropy,
    balloon,
    logger,
    metrics,
    mmds,
    faults,
    restart_policy,
    embervm,
    snapshot,
    unsupported,
)


_REASONS = {400: "Bad Request", 413: "Payload too large"}


def fault(message: str, status: int = 400) -> JSONResponse:
    """Firecracker's error answer, and its log line."""
    log.error("Received Error. Status code: %d %s. Message: %s", status, _REASONS.get(status, ""), message)
    return JSONResponse({"fault_message": message}, status_code=status)


@functools.cache
def _routes() -> tuple[BaseRoute, ...]:
    """Every resource's routes, built once per process and shared by its apps (a route does
    not refer to its app: the Vmm comes from `request.app`). FastAPI analyses each endpoint's
    signature as a route is added; the fork server does it once for every VMM it forks."""
    router = APIRouter()
    for module in _ROUTERS:
        router.include_router(module.router)
    return tuple(router.routes)


def warm_routes() -> None:
    """Do once, for every route, what FastAPI does at a route's first request: it reads the
    endpoint's source lines for its error messages (inspect.getsourcelines, whose tokenizer
    compiles its regular expressions at first use: ~15 ms) and keeps them per function. For
    the fork server, whose VMMs then answer their first request without it."""
    extract = getattr(fastapi.routing, "_extract_endpoint_context", None)  # FastAPI's own cache
    for route in _routes():
        endpoint = getattr(route, "endpoint", None)
        if endpoint is None:
            continue
        with contextlib.suppress(OSError, TypeError):
            if extract is not None:
                extract(endpoint)
            else:
                inspect.getsourcelines(endpoint)
    _route_a_request_no_route_takes()


def _route_a_request_no_route_takes() -> None:
    """FastAPI (0.16x) builds each included router's matching state, every route's dependant
    among it, the first time it routes a request, and keeps it in the router: per process,
    ~10-30 ms that a VMM's first request paid (a snapshot load's, measured). A request for a
    path no route has walks them all; a bare app (no guard, no handler of ours) answers it 404
    without logging or a worker thread, so the fork server stays safe to fork."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.router.routes.extend(_routes())
    route_one_request(app, "PUT", "/-")


def route_one_request(app: FastAPI, method: str, path: str) -> int:
    """Run one request without a body through `app`, in an event loop of its own that is
    closed afterwards; its status."""
    scope: dict[str, object] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
        "server": None,
        "client": None,
    }
    statuses: list[int] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(int(message["status"]))  # type: ignore[call-overload]

    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    return statuses[0]


def create_app(vmm: Vmm, max_payload: int = DEFAULT_MAX_PAYLOAD) -> FastAPI:
    """The API for one Vmm; `max_payload` is --http-api-max-payload-size."""
    app = FastAPI(
        title="embervm (Firecracker-compatible API)",
        redirect_slashes=False,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.vmm = vmm
    app.router.routes.extend(_routes())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return fault(err.message, err.status)

    @app.exception_handler(StarletteHTTPException)
    async def routing_error(request: Request, _: StarletteHTTPException) -> JSONResponse:
        token = first_token(request.url.path)
        return fault(f"Invalid request method and/or path: {request.method} {token}.")

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {"msg": "invalid request"}
        return fault(f"Invalid request: {first.get('msg')}.")

    app.add_middleware(FirecrackerGuard, max_payload=max_payload)
    return app
