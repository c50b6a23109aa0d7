"""The VM state machine: InstanceStart, pre-boot-only and post-boot-only calls, device hooks."""

from __future__ import annotations

import pytest

from controlplane.state import NOT_SUPPORTED_POST_BOOT, NOT_SUPPORTED_PRE_BOOT
from controlplane.vm_spec import DriveSpec
from tests.support.api_client import assert_no_content, fault


def configure(api, files) -> None:
    assert_no_content(
        api.client.put("/boot-source", json={"kernel_image_path": files["vmlinux"], "boot_args": "quiet"})
    )
    assert_no_content(api.client.put("/machine-config", json={"vcpu_count": 2, "mem_size_mib": 64}))
    assert_no_content(
        api.client.put(
            "/drives/rootfs",
            json={
                "drive_id": "rootfs",
                "path_on_host": files["rootfs"],
                "is_root_device": True,
                "is_read_only": True,
                "partuuid": "abcd-01",
                "io_engine": "Sync",
            },
        )
    )
    assert_no_content(api.client.put("/network-interfaces/eth0", json={"iface_id": "eth0", "host_dev_name": "tap0"}))


def start(api) -> None:
    assert_no_content(api.client.put("/actions", json={"action_type": "InstanceStart"}))


def test_instance_start_without_kernel_is_a_clear_400(api):
    assert fault(api.client.put("/actions", json={"action_type": "InstanceStart"})) == (
        "Start microvm error: Cannot start microvm without kernel configuration."
    )
    assert api.launcher.vms == []
    assert api.client.get("/").json()["state"] == "Not started"


def test_instance_start_hands_the_launcher_a_vmspec(api, files):
    configure(api, files)
    start(api)
    spec = api.vm.spec
    assert (spec.kernel_image_path, spec.boot_args, spec.vcpu_count, spec.mem_size_mib) == (
        files["vmlinux"],
        "quiet",
        2,
        64,
    )
    assert spec.drives == [DriveSpec("rootfs", files["rootfs"], True, True, "abcd-01", "Unsafe", None)]
    assert spec.vm_id == "anonymous-instance"
    info = api.client.get("/").json()
    assert info["state"] == "Running"
    assert api.client.get("/embervm").json()["workers"] == [
        {"name": "vcpu", "pid": 4242, "alive": True, "exit_reason": None}
    ]


def test_launcher_failure_is_a_400_and_the_vm_stays_configurable(api, files):
    configure(api, files)
    api.launcher.fail_with = "KVM_CREATE_VM failed: Permission denied"
    assert fault(api.client.put("/actions", json={"action_type": "InstanceStart"})) == (
        "Start microvm error: KVM_CREATE_VM failed: Permission denied"
    )
    assert api.client.get("/").json()["state"] == "Not started"
    assert_no_content(api.client.patch("/machine-config", json={"vcpu_count": 1}))
    api.launcher.fail_with = None
    start(api)
    assert api.vm.spec.vcpu_count == 1


PRE_BOOT_ONLY = [
    ("PUT", "/boot-source", {"kernel_image_path": "/k"}),
    ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
    ("PATCH", "/machine-config", {"vcpu_count": 1}),
    ("PUT", "/cpu-config", {}),
    ("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/x", "is_root_device": True}),
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0", "host_dev_name": "tap0"}),
    ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v"}),
    ("PUT", "/entropy", {}),
    ("PUT", "/logger", {"level": "Info"}),
    ("PUT", "/metrics", {"metrics_path": "/tmp/m"}),
    ("PUT", "/mmds/config", {"network_interfaces": ["eth0"]}),
    ("PUT", "/actions", {"action_type": "InstanceStart"}),
]
POST_BOOT_ONLY = [
    ("PATCH", "/vm", {"state": "Paused"}),
    ("PATCH", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/x"}),
    ("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0"}),
    ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
]


@pytest.mark.parametrize(("method", "path", "body"), POST_BOOT_ONLY)
def test_post_boot_calls_are_refused_before_boot(api, method, path, body):
    assert fault(api.client.request(method, path, json=body)) == NOT_SUPPORTED_PRE_BOOT


@pytest.mark.parametrize(("method", "path", "body"), PRE_BOOT_ONLY)
def test_pre_boot_calls_are_refused_after_boot(api, files, method, path, body):
    configure(api, files)
    start(api)
    assert fault(api.client.request(method, path, json=body)) == NOT_SUPPORTED_POST_BOOT
    assert len(api.launcher.vms) == 1


def test_calls_allowed_in_both_states(api, files):
    for _ in range(2):
        assert api.client.get("/").status_code == 200
        assert api.client.get("/machine-config").status_code == 200
        assert api.client.get("/vm/config").status_code == 200
        assert api.client.get("/version").status_code == 200
        assert_no_content(api.client.put("/mmds", json={"a": 1}))
        assert_no_content(api.client.patch("/mmds", json={"b": 2}))
        if not api.launcher.vms:
            configure(api, files)
            start(api)


def test_pause_resume_and_ctrl_alt_del_reach_the_microvm(api, files):
    configure(api, files)
    start(api)
    assert_no_content(api.client.patch("/vm", json={"state": "Paused"}))
    assert api.client.get("/").json()["state"] == "Paused"
    assert_no_content(api.client.patch("/vm", json={"state": "Resumed"}))
    assert api.client.get("/").json()["state"] == "Running"
    assert_no_content(api.client.put("/actions", json={"action_type": "SendCtrlAltDel"}))
    assert api.vm.calls == ["pause", "resume", "ctrl_alt_del"]
    assert "unknown variant `Running`" in fault(api.client.patch("/vm", json={"state": "Running"}))
    latencies = api.metrics.snapshot()["latencies_us"]
    assert latencies["pause_vm"] > 0 and latencies["resume_vm"] > 0


def test_post_boot_drive_patch_is_validated_stored_and_forwarded(api, files):
    configure(api, files)
    start(api)
    forwarded = api.vm.updates
    new = {
        "drive_id": "rootfs",
        "path_on_host": files["scratch"],
        "rate_limiter": {"ops": {"size": 5, "refill_time": 10}},
    }
    assert_no_content(api.client.patch("/drives/rootfs", json=new))
    assert forwarded == [
        ("drive", "rootfs", {"path_on_host": files["scratch"], "rate_limiter": {"ops": {"size": 5, "refill_time": 10}}})
    ]  # MicroVm.update_drive, typed
    assert api.client.get("/vm/config").json()["drives"][0]["path_on_host"] == files["scratch"]
    assert "unknown field `is_read_only`" in fault(
        api.client.patch("/drives/rootfs", json={**new, "is_read_only": True})
    )
    assert "backing file: No such file" in fault(
        api.client.patch("/drives/rootfs", json={"drive_id": "rootfs", "path_on_host": "/nope"})
    )
    assert "nothing to update" in fault(api.client.patch("/drives/rootfs", json={"drive_id": "rootfs"}))
    assert "Invalid block device ID" in fault(
        api.client.patch("/drives/data", json={"drive_id": "data", "path_on_host": files["scratch"]})
    )
    assert len(forwarded) == 1


def test_post_boot_net_patch_forwards_and_a_worker_refusal_is_a_400(api, files):
    configure(api, files)
    start(api)
    api.vm.refuse_updates = "rate limiter busy"
    body = {"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}
    assert fault(api.client.patch("/network-interfaces/eth0", json=body)) == (
        "Device update error: network-interface eth0: rate limiter busy"
    )
    api.vm.refuse_updates = None
    assert_no_content(api.client.patch("/network-interfaces/eth0", json=body))
    assert "Invalid network interface ID" in fault(
        api.client.patch("/network-interfaces/eth9", json={"iface_id": "eth9"})
    )


def test_net_patch_calls_microvm_update_net_with_the_given_limiters(api, files):
    configure(api, files)
    start(api)
    assert_no_content(api.client.patch("/network-interfaces/eth0", json={"iface_id": "eth0", "tx_rate_limiter": {}}))
    assert api.vm.updates == [("net", "eth0", {"rx_rate_limiter": None, "tx_rate_limiter": {}})]


def test_guest_exit_is_reported_and_post_boot_calls_then_fail(api, files):
    configure(api, files)
    start(api)
    api.vm.finish(0, "guest reset")
    assert api.exits == [(0, "guest reset")]
    assert api.vmm.exit_code == 0
    assert fault(api.client.patch("/vm", json={"state": "Paused"})) == "The microVM has already stopped."
