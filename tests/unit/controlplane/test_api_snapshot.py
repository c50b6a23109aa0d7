"""PUT /snapshot/create and /snapshot/load: Firecracker's body rules and state checks
(the work itself is tested with real processes in tests/integration/test_snapshot.py)."""

from __future__ import annotations

from tests.support.api_client import fault

LOAD = "/snapshot/load"


def test_create_before_boot_is_refused(api):
    body = {"snapshot_type": "Full", "snapshot_path": "s", "mem_file_path": "m"}
    assert "not supported before starting" in fault(api.client.put("/snapshot/create", json=body))


def test_create_body_is_checked(api):
    assert "missing field `mem_file_path`" in fault(api.client.put("/snapshot/create", json={"snapshot_path": "s"}))
    body = {"snapshot_type": "Half", "snapshot_path": "s", "mem_file_path": "m"}
    assert "snapshot_type" in fault(api.client.put("/snapshot/create", json=body))


def test_load_needs_exactly_one_memory_source(api, tmp_path):
    assert fault(api.client.put(LOAD, json={"snapshot_path": "s"})) == (
        "missing field: either `mem_backend` or `mem_file_path` is required."
    )
    both = {"snapshot_path": "s", "mem_file_path": "m", "mem_backend": {"backend_type": "File", "backend_path": "m"}}
    assert fault(api.client.put(LOAD, json=both)) == (
        "too many fields: either `mem_backend` or `mem_file_path` exclusively is required."
    )


def test_load_of_a_missing_snapshot_says_so_and_starts_nothing(api, tmp_path):
    body = {"snapshot_path": str(tmp_path / "none"), "mem_file_path": str(tmp_path / "mem")}

    message = fault(api.client.put(LOAD, json=body))

    assert message.startswith("Load snapshot error: cannot read the snapshot file")
    assert api.client.get("/").json()["state"] == "Not started"


def test_load_after_configuration_is_refused(api):
    api.client.put("/machine-config", json={"vcpu_count": 2, "mem_size_mib": 256})
    body = {"snapshot_path": "s", "mem_file_path": "m"}
    assert fault(api.client.put(LOAD, json=body)) == (
        "Loading a microVM snapshot not allowed after configuring boot-specific resources."
    )
