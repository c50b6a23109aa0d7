"""The MMDS data store (PUT replaces, PATCH merges per RFC 7396, size limit) and its API."""

from __future__ import annotations

from pathlib import Path

import pytest

from controlplane.mmds_store import MmdsError, MmdsStore, merge_patch
from tests.support.api_client import assert_no_content, fault
from tests.unit.controlplane.conftest import make_harness


def test_merge_patch_rfc7396_examples():
    target = {"a": "b", "c": {"d": "e", "f": "g"}}
    assert merge_patch(target, {"a": "z", "c": {"f": None}}) == {"a": "z", "c": {"d": "e"}}
    assert merge_patch({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}
    assert merge_patch({"a": "b"}, {"a": {"x": 1}}) == {"a": {"x": 1}}


def test_store_rules():
    store = MmdsStore(size_limit=40)
    assert store.get() == {}
    with pytest.raises(MmdsError, match="not initialized"):
        store.patch({"a": 1})
    store.put({"a": {"b": 1}})
    store.patch({"a": {"c": 2}})
    assert store.get() == {"a": {"b": 1, "c": 2}}
    with pytest.raises(MmdsError) as err:
        store.patch({"big": "x" * 100})
    assert err.value.status == 413
    assert store.get() == {"a": {"b": 1, "c": 2}}, "a refused patch leaves the store as it was"
    with pytest.raises(MmdsError, match="JSON object"):
        store.put([1, 2])


def test_get_returns_a_copy():
    store = MmdsStore()
    store.put({"a": {"b": 1}})
    store.get()["a"]["b"] = 2
    assert store.get() == {"a": {"b": 1}}


def test_mmds_api(api):
    assert api.client.get("/mmds").json() == {}
    assert fault(api.client.patch("/mmds", json={"a": 1})) == "MMDS error: The MMDS data store is not initialized."
    assert_no_content(api.client.put("/mmds", json={"latest": {"meta-data": {"ami-id": "ami-1"}}}))
    assert_no_content(api.client.patch("/mmds", json={"latest": {"meta-data": {"hostname": "vm"}}}))
    assert api.client.get("/mmds").json() == {"latest": {"meta-data": {"ami-id": "ami-1", "hostname": "vm"}}}
    assert "JSON object" in fault(api.client.put("/mmds", json="text"))
    counted = api.metrics.snapshot()
    assert counted["put_api_requests"]["mmds_count"] == 2
    assert counted["patch_api_requests"]["mmds_fails"] == 1


def test_mmds_size_limit_answers_413(tmp_path: Path):
    for harness in make_harness(tmp_path, mmds_limit=32):
        response = harness.client.put("/mmds", json={"k": "v" * 64})
        assert response.status_code == 413
        assert fault(response) == "MMDS limit exceeded error: The MMDS patch request doesn't fit."
