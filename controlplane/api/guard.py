"""ASGI middleware that applies Firecracker's request-level rules before any routing.

micro_http and Firecracker's request parser reject, with a 400 and a fault_message:
bodies over the payload limit, GET requests with a body, PUT/PATCH requests without one.
This layer also turns any unexpected exception into a 400 (never a 500) and logs each
request as Firecracker does.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controlplane import logger as fclog

log = fclog.get("api")
DEFAULT_MAX_PAYLOAD = 51200
_QUIET_BODIES = ("/mmds", "/cpu-config")


async def send_fault(send: Send, message: str, status: int = 400) -> None:
    await send_body(send, json.dumps({"fault_message": message}).encode(), status)


async def send_body(send: Send, body: bytes, status: int = 400) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def first_token(path: str) -> str:
    return path.strip("/").split("/")[0]


class FirecrackerGuard:
    """Payload limit, body presence rules and a last-resort 400 for unexpected errors."""

    def __init__(self, app: ASGIApp, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.app = app
        self.max_payload = max_payload

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if path != "/" and path.endswith("/"):  # Firecracker ignores a trailing slash
            path = path.rstrip("/") or "/"
            scope = {**scope, "path": path, "raw_path": path.encode()}
        declared = _content_length(scope)
        if declared is not None and declared > self.max_payload:
            await send_body(send, self._too_large(declared))
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_payload:
                await send_body(send, self._too_large(len(body)))
                return
        problem = _body_rule(method, body)
        if problem is not None:
            log.error("Received Error. Status code: 400 Bad Request. Message: %s", problem)
            await send_fault(send, problem)
            return
        _describe(method, path, body)
        await self._call(scope, body, send)

    def _too_large(self, size: int) -> bytes:
        """micro_http's answer, byte for byte: an `error` field (not `fault_message`), with a raw
        newline inside the string, as Firecracker's test_config_start_with_limit expects."""
        log.error(
            "Request payload with size %d is larger than the limit of %d allowed by server.", size, self.max_payload
        )
        return (
            f'{{ "error": "Request payload with size {size} is larger than the limit of {self.max_payload} '
            'allowed by server.\nAll previous unanswered requests will be dropped." }'
        ).encode()

    async def _call(self, scope: Scope, body: bytes, send: Send) -> None:
        replayed = False
        started = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return {"type": "http.disconnect"}
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, replay, tracking_send)
        except Exception as err:  # never a 500: the client gets a fault_message
            log.exception("Unexpected error serving %s %s", scope["method"], scope["path"])
            if not started:
                await send_fault(send, f"Internal error: {type(err).__name__}: {err}")


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _body_rule(method: str, body: bytes) -> str | None:
    if method == "GET" and body:
        return "GET request cannot have a body."
    if method == "PUT" and not body:
        return "Empty PUT request."
    if method == "PATCH" and not body:
        return "Empty PATCH request."
    return None


def _describe(method: str, path: str, body: bytes) -> None:
    """Firecracker's 'The API server received a ...' line (bodies of /mmds and /cpu-config at Debug)."""
    if not body or path.startswith(_QUIET_BODIES):
        log.info('The API server received a %s request on "%s".', method.capitalize(), path)
        if body:
            log.debug('Body of the %s request on "%s": %r', method.capitalize(), path, _text(body))
        return
    log.info('The API server received a %s request on "%s" with body %r.', method.capitalize(), path, _text(body))


def _text(body: bytes) -> Any:
    try:
        return body.decode()
    except UnicodeDecodeError:
        return "inconvertible to UTF-8"
