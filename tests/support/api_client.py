"""A Firecracker API client over the Unix socket, for tests (httpx with a UDS transport)."""

from __future__ import annotations

from typing import Any

import httpx


class ApiClient:
    """Thin wrapper: `put("/drives/x", json=...)` etc., and `fault(response)` for errors."""

    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        # Plain HTTP over a Unix socket: no TLS, so no certificate store to load (httpx's
        # default verify=True loads one per client: 35-70 ms here).
        self.http = httpx.Client(
            transport=httpx.HTTPTransport(uds=socket_path, verify=False), base_url="http://localhost", timeout=timeout
        )

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.get(path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.put(path, **kwargs)

    def patch(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.patch(path, **kwargs)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.request(method, path, **kwargs)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fault(response: httpx.Response) -> str:
    """The fault_message of a 4xx answer (asserting the Firecracker error shape)."""
    assert response.status_code >= 400, f"expected an error, got {response.status_code}: {response.text}"
    body = response.json()
    assert set(body) == {"fault_message"}, body
    message = body["fault_message"]
    assert isinstance(message, str)
    return message


def assert_no_content(response: httpx.Response) -> None:
    assert response.status_code == 204, f"{response.status_code}: {response.text}"
    assert response.content == b""
