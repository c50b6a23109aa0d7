"""Request-level rules: payload limit, bodies, paths, IDs, errors shape, concurrency."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.support.api_client import ApiClient, fault
from tests.unit.controlplane.conftest import make_harness


def test_payload_over_the_limit_is_refused_with_its_size(tmp_path: Path):
    for harness in make_harness(tmp_path, max_payload=100):
        body = json.dumps({"kernel_image_path": "x" * 200})
        response = harness.client.put("/boot-source", content=body)
        assert response.status_code == 400
        # micro_http's body, byte for byte (Firecracker's test_config_start_with_limit)
        assert (
            response.content
            == (
                f'{{ "error": "Request payload with size {len(body)} is larger than the limit of 100 allowed by '
                'server.\nAll previous unanswered requests will be dropped." }'
            ).encode()
        )
        assert response.headers["server"] == "Firecracker API"
        # A body at the limit goes through to the resource (which then checks the kernel path).
        small = json.dumps({"kernel_image_path": "/nonexistent/k"})
        assert "kernel file" in fault(harness.client.put("/boot-source", content=small))


def test_chunked_body_over_the_limit_is_refused(tmp_path: Path):
    for harness in make_harness(tmp_path, max_payload=64):
        chunks = iter([b'{"kernel_image_path": "', b"y" * 100, b'"}'])
        response = harness.client.put("/boot-source", content=chunks)
        assert response.status_code == 400
        assert b"is larger than the limit of 64 allowed by server." in response.content


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("GET", "/", b"{}", "GET request cannot have a body."),
        ("GET", "/machine-config", b"x", "GET request cannot have a body."),
        ("PUT", "/boot-source", b"", "Empty PUT request."),
        ("PUT", "/nowhere", b"", "Empty PUT request."),
        ("PATCH", "/machine-config", b"", "Empty PATCH request."),
        ("PATCH", "/vm", b"", "Empty PATCH request."),
        ("PUT", "/nowhere", b"{}", "Invalid request method and/or path: PUT nowhere."),
        ("GET", "/boot-source", b"", "Invalid request method and/or path: GET boot-source."),
        ("PATCH", "/boot-source", b"{}", "Invalid request method and/or path: PATCH boot-source."),
        ("PATCH", "/logger", b"{}", "Invalid request method and/or path: PATCH logger."),
        ("DELETE", "/drives/rootfs", b"", "Invalid request method and/or path: DELETE drives."),
        ("POST", "/actions", b"{}", "Invalid request method and/or path: POST actions."),
        ("PUT", "/drives", b"{}", "The ID cannot be empty."),
        ("PUT", "/drives/", b"{}", "The ID cannot be empty."),
        ("PATCH", "/network-interfaces", b"{}", "The ID cannot be empty."),
    ],
)
def test_request_shape_errors_use_firecrackers_messages(api, method, path, body, message):
    response = api.client.request(method, path, content=body)
    assert response.status_code == 400
    assert fault(response) == message


@pytest.mark.parametrize("bad_id", ["root-fs", "root.fs", "r%20fs", "%C3%A9t%C3%A9"])
@pytest.mark.parametrize("resource", ["drives", "network-interfaces"])
def test_ids_allow_only_ascii_alphanumerics_and_underscore(api, resource, bad_id):
    response = api.client.put(f"/{resource}/{bad_id}", json={})
    assert fault(response) == "API Resource IDs can only contain alphanumeric characters and underscores."


def test_path_and_body_ids_must_match(api, files):
    drive = {"drive_id": "other", "path_on_host": files["rootfs"], "is_root_device": True, "is_read_only": False}
    assert fault(api.client.put("/drives/rootfs", json=drive)) == (
        "The id from the path does not match the id from the body!"
    )
    iface = {"iface_id": "eth1", "host_dev_name": "tap0"}
    assert fault(api.client.put("/network-interfaces/eth0", json=iface)) == (
        "The id from the path [eth0] does not match the id from the body [eth1]!"
    )
    update = {"iface_id": "eth1"}
    assert fault(api.client.patch("/network-interfaces/eth0", json=update)) == (
        "The id from the path [eth0] does not match the id from the body [eth1]!"
    )


def test_trailing_slash_is_ignored_like_firecracker(api):
    response = api.client.get("/machine-config/")
    assert response.status_code == 200
    assert response.json()["vcpu_count"] == 1


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/machine-config", {"vcpu_count": "2", "mem_size_mib": 128}, 'invalid type: string "2", expected an integer'),
        ("/machine-config", {"mem_size_mib": 128}, "missing field `vcpu_count`"),
        ("/machine-config", {"vcpu_count": -2, "mem_size_mib": 128}, "invalid value: integer `-2`"),
        ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 2**64}, "invalid value: integer"),
        ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 1, "smt": "yes"}, "expected a boolean"),
        ("/machine-config", {"vcpu_count": 1, "mem_size_mib": 1, "cpu_template": "X9"}, "unknown variant `X9`"),
        ("/boot-source", {"kernel_image_path": "/k", "foo": 1}, "unknown field `foo`, expected one of"),
        ("/actions", {"action_type": "Reboot"}, "unknown variant `Reboot`"),
        ("/actions", [], "invalid type: a sequence, expected a map"),
        ("/vsock", {"guest_cid": 2, "uds_path": "/v"}, "expected an integer >= 3"),
    ],
)
def test_wrong_bodies_are_400_with_a_deserialisation_message(api, path, body, needle):
    response = api.client.put(path, json=body)
    assert response.status_code == 400
    message = fault(response)
    assert message.startswith("An error occurred when deserializing the json body of a request: ")
    assert needle in message


def test_malformed_json_is_400_never_422(api):
    for body in (b"{", b"not json", b'{"a":}', b"\xff\xfe", b"null"):
        for path in ("/boot-source", "/machine-config", "/drives/x", "/mmds", "/actions"):
            response = api.client.put(path, content=body)
            assert response.status_code == 400, (path, body, response.text)
            assert fault(response)


def test_unexpected_exceptions_become_400_not_500(api):
    def explode() -> dict:
        raise RuntimeError("boom")

    api.vmm.full_config = explode  # type: ignore[method-assign]
    response = api.client.get("/vm/config")
    assert response.status_code == 400
    assert fault(response) == "Internal error: RuntimeError: boom"


def test_unimplemented_firecracker_resources_say_so(api):
    for method, path in (
        ("PUT", "/balloon/hinting/start"),
        ("GET", "/balloon/hinting/status"),
        ("PUT", "/pmem/x"),
    ):
        response = api.client.request(method, path, content=b"{}" if method != "GET" else b"")
        assert fault(response).startswith("The requested operation is not supported: ")


def test_twelve_concurrent_clients_are_all_served(api):
    """At least ten clients at once: each gets its own connection and a correct answer."""

    def worker(index: int) -> tuple[int, int]:
        with ApiClient(api.client.socket_path) as client:
            put = client.patch("/mmds", json={f"k{index}": index})
            got = client.get("/")
            return put.status_code, got.status_code

    api.client.put("/mmds", json={})
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(worker, range(12)))
    assert results == [(204, 200)] * 12
    assert api.client.get("/mmds").json() == {f"k{i}": i for i in range(12)}


def test_keep_alive_connection_serves_many_requests(api):
    with httpx.Client(transport=httpx.HTTPTransport(uds=api.client.socket_path), base_url="http://x") as http:
        statuses = {http.get("/version").status_code for _ in range(50)}
    assert statuses == {200}
