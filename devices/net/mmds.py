"""MMDS, the guest-facing side: HTTP/1.1 requests in, Firecracker's answers out.

The store itself lives in the supervisor (`controlplane.mmds_store`); each net worker
whose interface is listed in `PUT /mmds/config` holds a *snapshot* of it, which the
supervisor pushes at start-up and after every `PUT`/`PATCH /mmds` (`MmdsData` over the
control channel). Why snapshots rather than forwarding each guest request to the
supervisor: a guest request is then answered inside the worker's own trust zone with no
round trip, the supervisor never parses anything the guest wrote and the guest cannot make
it do work (a flood of MMDS requests costs only the worker's CPU), and the worker needs no
channel back into the control plane. The store is bounded by --mmds-size-limit, so a
snapshot is small, and it is replaced whole, so a guest sees the old or the new version,
never a mix (as in Firecracker).

Semantics are Firecracker's (docs/mmds/mmds-user-guide.md): V1 answers GET without a token;
V2 needs `X-metadata-token` (or `X-aws-ec2-metadata-token`) from `PUT /latest/api/token`
with `X-metadata-token-ttl-seconds` (or the `X-aws-ec2-` alias) in 1..21600; 401 for a
missing, expired or bad token; `Accept: application/json` gives JSON, anything else the IMDS
listing (501 for a value IMDS cannot show); 404 for a missing path; 405 for other methods.
`imds_compat` always answers in IMDS format as `text/plain`.

Tokens are stateless, as in Firecracker: `<expiry>.<nonce>.<HMAC-SHA256(key, expiry.nonce)>`
with a key drawn at start-up, so the worker keeps no table a guest could fill.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_REQUEST_BYTES = 8192  # a request (head + body) larger than this resets the connection
MIN_TTL, MAX_TTL = 1, 21600
U32_DIGITS = 10  # a number in a request is read as Firecracker's u32: at most 10 digits
TOKEN_PATH = "/latest/api/token"
_TTL_HEADER_NAMES = {h.lower(): h for h in ("X-metadata-token-ttl-seconds", "X-aws-ec2-metadata-token-ttl-seconds")}
_TTL_HEADERS = tuple(_TTL_HEADER_NAMES)
_TOKEN_HEADERS = ("x-metadata-token", "x-aws-ec2-metadata-token")
NO_TOKEN = "No MMDS token provided. Use `X-metadata-token` header to specify the session token."
NO_TTL = (
    "Token time to live value not found. Use `X-metadata-token-ttl-seconds` header to specify the token's lifetime."
)
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    501: "Not Implemented",
}


class HttpError(Exception):
    """A request that cannot be parsed; answered with `status` and the connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class HttpRequest:
    method: str
    path: str
    version: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @property
    def keep_alive(self) -> bool:
        connection = self.headers.get("connection", "").lower()
        return connection != "close" if self.version == "HTTP/1.1" else connection == "keep-alive"


def parse_request(buffer: bytes) -> tuple[HttpRequest, int] | None:
    """The first complete request in `buffer` and its length, or None if more is needed."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_REQUEST_BYTES:
            raise HttpError(413, "Request too large")
        return None
    try:
        head = buffer[:end].decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "Request head is not ASCII") from None
    line, *header_lines = head.split("\r\n")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/"):
        raise HttpError(400, "Invalid request line")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(400, f"Unsupported HTTP version: {version}")
    headers: dict[str, str] = {}
    for header in header_lines:
        name, sep, value = header.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, "Invalid header")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise HttpError(501, "Transfer-Encoding is not supported")
    length = parse_u32(headers.get("content-length", "0"))
    if length is None:
        raise HttpError(400, "Invalid Content-Length")
    total = end + 4 + length
    if total > MAX_REQUEST_BYTES:
        raise HttpError(413, "Request too large")
    if len(buffer) < total:
        return None
    if not target.startswith("/"):
        raise HttpError(400, "Invalid URI")
    path = target.split("?", 1)[0]
    return HttpRequest(method, path, version, headers, buffer[end + 4 : total]), total


def parse_u32(text: str) -> int | None:
    """`text` as Rust's `u32::from_str` reads it (an optional `+`, decimal digits, leading zeros
    allowed), or None. The digits are counted before `int()` sees them: a guest's 5000-digit
    number is refused, it does not make `int()` raise."""
    digits = text[1:] if text.startswith("+") else text
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    significant = digits.lstrip("0") or "0"
    if len(significant) > U32_DIGITS:
        return None
    value = int(significant)
    return value if value <= 0xFFFFFFFF else None


def parse_index(text: str) -> int | None:
    """A JSON-pointer array index as serde_json reads it (no sign, no leading zero), or None."""
    if not text.isascii() or not text.isdigit() or (text.startswith("0") and text != "0"):
        return None
    return parse_u32(text)


def response(status: int, body: bytes | str = b"", content_type: str = "text/plain", extra: str = "") -> bytes:
    data = body.encode() if isinstance(body, str) else body
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
        f"Server: Firecracker API\r\nConnection: keep-alive\r\n{extra}"
        f"Content-Type: {content_type}\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


class TokenAuthority:
    """Makes and checks V2 session tokens (stateless: expiry and an HMAC in the token)."""

    def __init__(self, key: bytes | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._key = key or os.urandom(32)
        self._clock = clock
        self._count = 0

    def issue(self, ttl: int) -> str:
        self._count += 1
        body = f"{int((self._clock() + ttl) * 1000)}.{self._count}"
        mac = hmac.new(self._key, body.encode(), hashlib.sha256).digest()
        return f"{body}.{base64.urlsafe_b64encode(mac).decode().rstrip('=')}"

    def valid(self, token: str) -> bool:
        body, _, mac = token.rpartition(".")
        expiry = body.split(".", 1)[0]
        if not body or not expiry.isascii() or not expiry.isdigit() or len(expiry) > 20:
            return False
        expected = base64.urlsafe_b64encode(hmac.new(self._key, body.encode(), hashlib.sha256).digest()).decode()
        return hmac.compare_digest(expected.rstrip("="), mac) and int(expiry) > self._clock() * 1000


class MmdsService:
    """Answers one parsed request from the current snapshot of the store."""

    def __init__(self, version: str = "V1", imds_compat: bool = False, tokens: TokenAuthority | None = None) -> None:
        self.version = version
        self.imds_compat = imds_compat
        self.tokens = tokens or TokenAuthority()
        self.data: dict[str, Any] | None = None
        self.metrics = {"rx_invalid_token": 0, "rx_no_token": 0, "rx_accepted": 0, "rx_accepted_err": 0}

    def set_data(self, document: bytes) -> None:
        """A new snapshot: JSON bytes of the whole store (`null` = not initialised)."""
        self.data = json.loads(document) if document else None

    def handle(self, request: HttpRequest) -> bytes:
        self.metrics["rx_accepted"] += 1
        answer = self._handle(request)
        if not answer.startswith(b"HTTP/1.1 200"):
            self.metrics["rx_accepted_err"] += 1
        return answer

    def _handle(self, request: HttpRequest) -> bytes:
        if request.method == "PUT":
            return self._put(request)
        if request.method != "GET":
            return response(405, "Not allowed HTTP method.", extra="Allow: GET, PUT\r\n")
        if self.version == "V2":
            if self._ttl_header_invalid(request):
                return self._bad_ttl_header(request)
            token = next((request.headers[h] for h in _TOKEN_HEADERS if h in request.headers), None)
            if token is None:
                self.metrics["rx_no_token"] += 1
                return response(401, NO_TOKEN)
            if not self.tokens.valid(token):
                self.metrics["rx_invalid_token"] += 1
                return response(401, "MMDS token not valid.")
        return self._get(request)

    def _put(self, request: HttpRequest) -> bytes:
        if request.path.rstrip("/") != TOKEN_PATH:
            return response(404, f"Resource not found: {request.path}.")
        if "x-forwarded-for" in request.headers:
            return response(400, "Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For")
        ttl_text = next((request.headers[h] for h in _TTL_HEADERS if h in request.headers), None)
        if ttl_text is None:
            return response(400, NO_TTL)
        ttl = parse_u32(ttl_text)
        if ttl is None:
            return self._bad_ttl_header(request)
        if not MIN_TTL <= ttl <= MAX_TTL:
            return response(
                400,
                f"Invalid time to live value provided for token: {ttl_text}. "
                f"Please provide a value between {MIN_TTL} and {MAX_TTL}.",
            )
        return response(200, self.tokens.issue(ttl))

    @staticmethod
    def _ttl_header_invalid(request: HttpRequest) -> bool:
        """V2 reads the TTL header of every request as a u32, as Firecracker's TokenHeaders does."""
        return any(h in request.headers and parse_u32(request.headers[h]) is None for h in _TTL_HEADERS)

    @staticmethod
    def _bad_ttl_header(request: HttpRequest) -> bytes:
        """Firecracker's answer to a TTL header that is not a u32 (micro_http's InvalidValue)."""
        name = next(h for h in _TTL_HEADERS if h in request.headers)
        key = _TTL_HEADER_NAMES[name]
        return response(400, f"Invalid header. Reason: Invalid value. Key:{key}; Value:{request.headers[name]}")

    def _get(self, request: HttpRequest) -> bytes:
        value = self._lookup(request.path)
        if value is None:
            return response(404, f"Resource not found: {request.path}.")
        wants_json = request.headers.get("accept", "").lower() == "application/json"
        if wants_json and not self.imds_compat:
            return response(200, json.dumps(value), "application/json")
        if isinstance(value, str):
            return response(200, value)
        if isinstance(value, dict):
            keys = [f"{k}/" if isinstance(v, dict) else k for k, v in value.items()]
            return response(200, "\n".join(keys))
        return response(501, "Cannot retrieve value. The value has an unsupported type.")

    def _lookup(self, path: str) -> Any:
        """The value at JSON-pointer `path` (a trailing `/` ignored), None when absent."""
        if self.data is None:
            return None
        node: Any = self.data
        for part in [p for p in path.split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and (index := parse_index(part)) is not None and index < len(node):
                node = node[index]
            else:
                return None
        return node
