"""/faults (embervm extension): refused unless --enable-fault-injection, strict bodies,
forwarded to the MicroVm after boot; a failed microVM is reported by GET /."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.faults import NOT_ENABLED
from tests.support.api_client import assert_no_content, fault


def boot(api, files) -> None:
    assert_no_content(api.client.put("/boot-source", json={"kernel_image_path": files["vmlinux"]}))
    assert_no_content(api.client.put("/actions", json={"action_type": "InstanceStart"}))


def give_faults(vm) -> list[tuple[str, str, Any]]:
    calls: list[tuple[str, str, Any]] = []
    vm.inject_fault = lambda device_id, spec: calls.append(("put", device_id, spec))
    vm.clear_fault = lambda device_id: calls.append(("delete", device_id, None)) or True
    vm.faults = lambda: [{"device_id": "rootfs", "kind": "crash"}]
    return calls


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("GET", "/faults", None), ("PUT", "/faults/rootfs", {"kind": "crash"}), ("DELETE", "/faults/rootfs", None)],
)
def test_faults_answer_400_saying_how_to_enable_them(api, method, path, body):
    response = api.client.request(method, path, json=body)

    assert response.status_code == 400
    assert fault(response) == NOT_ENABLED and "--enable-fault-injection" in NOT_ENABLED


def test_enabled_faults_are_forwarded_to_the_microvm_after_boot(api, files):
    api.vmm.options.enable_fault_injection = True
    assert api.client.get("/faults").json() == []
    assert "before starting" in fault(api.client.put("/faults/rootfs", json={"kind": "crash"}))
    boot(api, files)
    calls = give_faults(api.vm)

    assert_no_content(api.client.put("/faults/rootfs", json={"kind": "delay", "delay_ms": 20, "count": 0}))
    assert_no_content(api.client.request("DELETE", "/faults/rootfs"))

    assert [(c[0], c[1]) for c in calls] == [("put", "rootfs"), ("delete", "rootfs")]
    assert (calls[0][2].kind, calls[0][2].delay_ms, calls[0][2].count) == ("delay", 20, 0)
    assert api.client.get("/faults").json() == [{"device_id": "rootfs", "kind": "crash"}]


def test_bad_fault_bodies_and_refusals_are_400(api, files):
    api.vmm.options.enable_fault_injection = True
    boot(api, files)
    api.vm.inject_fault = lambda device_id, spec: (_ for _ in ()).throw(ValueError(f"no device {device_id!r}"))

    assert api.client.put("/faults/rootfs", json={"kind": "explode"}).status_code == 400
    assert "unknown field" in fault(api.client.put("/faults/rootfs", json={"kind": "crash", "when": 1}))
    assert "no device 'nope'" in fault(api.client.put("/faults/nope", json={"kind": "crash"}))


def test_a_failed_microvm_is_reported_and_the_api_stays_usable(api, files):
    boot(api, files)
    api.vm.failed = True
    api.vm.exit_reason = "vCPU worker killed by signal SIGKILL"

    api.vm.finish(1, "vCPU worker killed by signal SIGKILL")

    assert api.client.get("/").json()["state"] == "Paused"
    info = api.client.get("/embervm").json()
    assert info["vm_state"] == "Failed"
    assert info["exit_reason"] == "vCPU worker killed by signal SIGKILL"
    assert "already stopped" in fault(api.client.put("/actions", json={"action_type": "SendCtrlAltDel"}))
