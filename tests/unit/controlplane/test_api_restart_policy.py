"""PUT /restart-policy (embervm extension): validated, pre-boot only, handed to the VmSpec."""

from __future__ import annotations

from controlplane.faults import RestartPolicy
from tests.support.api_client import assert_no_content, fault


def boot(api, files) -> None:
    assert_no_content(api.client.put("/boot-source", json={"kernel_image_path": files["vmlinux"]}))
    assert_no_content(api.client.put("/actions", json={"action_type": "InstanceStart"}))


def test_restart_policy_reaches_the_spec_with_per_device_overrides(api, files):
    body = {"max_restarts": 2, "window_s": 30, "devices": {"rootfs": {"max_restarts": 9}}}

    assert_no_content(api.client.put("/restart-policy", json=body))
    boot(api, files)

    policy = api.vm.spec.restart_policy
    assert RestartPolicy.from_dict(policy).max_restarts == 2
    assert RestartPolicy.from_dict(policy, "rootfs").max_restarts == 9
    assert RestartPolicy.from_dict(policy, "rootfs").window_s == 30.0


def test_restart_policy_shows_in_vm_config_only_when_set(api):
    assert "restart-policy" not in api.client.get("/vm/config").json()

    assert_no_content(api.client.put("/restart-policy", json={"hang_timeout_s": 2.5}))

    assert api.client.get("/vm/config").json()["restart-policy"] == {"hang_timeout_s": 2.5, "devices": {}}


def test_unknown_and_out_of_range_fields_are_400(api):
    assert "unknown field" in fault(api.client.put("/restart-policy", json={"max_retries": 1})).lower()
    assert fault(api.client.put("/restart-policy", json={"window_s": 0}))


def test_a_device_id_named_like_a_field_is_refused(api):
    message = fault(api.client.put("/restart-policy", json={"devices": {"window_s": {"max_restarts": 1}}}))

    assert "clashes with a policy field" in message


def test_restart_policy_is_pre_boot_only(api, files):
    boot(api, files)

    assert fault(api.client.put("/restart-policy", json={"max_restarts": 1}))
