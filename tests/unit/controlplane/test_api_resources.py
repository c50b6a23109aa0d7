"""Pre-boot resources: each PUT/PATCH/GET's success path, its checks, and GET /vm/config."""

from __future__ import annotations

import pytest

from tests.support.api_client import assert_no_content, fault


def rootfs(files, **extra):
    return {
        "drive_id": "rootfs",
        "path_on_host": files["rootfs"],
        "is_root_device": True,
        "is_read_only": False,
        **extra,
    }


def test_instance_info_and_version_before_boot(api):
    info = api.client.get("/").json()
    assert {k: info[k] for k in ("id", "state", "app_name")} == {
        "id": "anonymous-instance",
        "state": "Not started",
        "app_name": "Firecracker",
    }
    assert info["vmm_version"] == api.client.get("/version").json()["firecracker_version"]
    assert set(info) == {"id", "state", "vmm_version", "app_name"}  # exactly Firecracker's InstanceInfo
    assert api.client.get("/embervm").json()["workers"] == []


def test_boot_source_checks_the_kernel_and_initrd(api, files):
    assert_no_content(api.client.put("/boot-source", json={"kernel_image_path": files["vmlinux"]}))
    assert fault(api.client.put("/boot-source", json={"kernel_image_path": "/no/such/kernel"})) == (
        "Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)"
    )
    bad_initrd = {"kernel_image_path": files["vmlinux"], "initrd_path": "/no/initrd"}
    assert "The initrd file cannot be opened" in fault(api.client.put("/boot-source", json=bad_initrd))
    full = {"kernel_image_path": files["vmlinux"], "initrd_path": files["initrd"], "boot_args": "console=ttyS0"}
    assert_no_content(api.client.put("/boot-source", json=full))
    assert api.client.get("/vm/config").json()["boot-source"] == full


def test_machine_config_defaults_put_and_patch(api):
    assert api.client.get("/machine-config").json() == {
        "vcpu_count": 1,
        "mem_size_mib": 128,
        "smt": False,
        "track_dirty_pages": False,
        "huge_pages": "None",
    }
    assert_no_content(api.client.put("/machine-config", json={"vcpu_count": 2, "mem_size_mib": 256, "smt": True}))
    assert_no_content(api.client.patch("/machine-config", json={"mem_size_mib": 512}))
    got = api.client.get("/machine-config").json()
    assert (got["vcpu_count"], got["mem_size_mib"], got["smt"]) == (2, 512, True)
    # PUT resets the optional fields to their defaults.
    assert_no_content(api.client.put("/machine-config", json={"vcpu_count": 4, "mem_size_mib": 256}))
    assert api.client.get("/machine-config").json()["smt"] is False


def test_machine_config_rejects_bad_values_and_keeps_the_old_ones(api):
    vcpu_msg = (
        "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 "
        "or an even number if SMT is enabled."
    )
    for body in ({"vcpu_count": 0, "mem_size_mib": 128}, {"vcpu_count": 33, "mem_size_mib": 128}):
        assert fault(api.client.put("/machine-config", json=body)) == vcpu_msg
    assert fault(api.client.put("/machine-config", json={"vcpu_count": 3, "mem_size_mib": 8, "smt": True})) == vcpu_msg
    mem_msg = "Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size."
    assert fault(api.client.patch("/machine-config", json={"mem_size_mib": 0})) == mem_msg
    assert fault(api.client.patch("/machine-config", json={"mem_size_mib": 129, "huge_pages": "2M"})) == mem_msg
    assert "static CPU template `T2`" in fault(api.client.patch("/machine-config", json={"cpu_template": "T2"}))
    assert api.client.get("/machine-config").json()["vcpu_count"] == 1


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"huge_pages": "2M"}, "not supported: huge_pages `2M`"),
        ({"huge_pages": "Transparent"}, "not supported: huge_pages `Transparent`"),
    ],
)
def test_machine_config_embervm_cannot_honour_is_refused_not_ignored(api, body, needle):
    assert needle in fault(api.client.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 128, **body}))
    assert needle in fault(api.client.patch("/machine-config", json=body))
    config = api.client.get("/machine-config").json()
    assert (config["huge_pages"], config["track_dirty_pages"]) == ("None", False)


def test_track_dirty_pages_is_accepted_for_diff_snapshots(api):
    body = {"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": True}
    assert api.client.put("/machine-config", json=body).status_code == 204
    assert api.client.get("/machine-config").json()["track_dirty_pages"] is True


def test_async_io_engine_is_refused_not_ignored(api, files):
    drive = {"drive_id": "rootfs", "path_on_host": files["rootfs"], "is_root_device": True, "io_engine": "Async"}
    assert fault(api.client.put("/drives/rootfs", json=drive)) == (
        "The requested operation is not supported: io_engine `Async` (io_uring): embervm's block worker does "
        "synchronous I/O (preadv/pwritev); use `Sync`."
    )
    assert_no_content(api.client.put("/drives/rootfs", json={**drive, "io_engine": "Sync"}))


def test_cpu_config_cannot_remove_a_capability_embervm_needs(api):
    from shared.kvm import REQUIRED_CAPS

    irqfd = REQUIRED_CAPS["KVM_CAP_IRQFD"]
    assert "cannot be removed: embervm requires it" in fault(
        api.client.put("/cpu-config", json={"kvm_capabilities": [f"!{irqfd}"]})
    )
    assert_no_content(api.client.put("/cpu-config", json={"kvm_capabilities": ["!9999", "9998"]}))


def test_deprecated_cpu_template_field_sets_the_deprecation_header(api):
    response = api.client.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "None"})
    assert_no_content(response)
    assert response.headers["deprecation"] == "true"
    assert "deprecation" not in api.client.patch("/machine-config", json={"vcpu_count": 2}).headers
    assert api.metrics.snapshot()["deprecated_api"]["deprecated_http_api_calls"] == 1


def test_cpu_config_is_validated_and_stored(api):
    template = {
        "kvm_capabilities": ["!56"],
        "cpuid_modifiers": [
            {
                "leaf": "0x1",
                "subleaf": "0x0",
                "flags": 0,
                "modifiers": [{"register": "ecx", "bitmap": "0b" + "x" * 31 + "0"}],
            }
        ],
        "msr_modifiers": [{"addr": "0x10a", "bitmap": "0b" + "0" * 64}],
    }
    assert_no_content(api.client.put("/cpu-config", json=template))
    assert api.client.get("/vm/config").json()["cpu-config"] == template
    bad = {"msr_modifiers": [{"addr": "0x10a", "bitmap": "0b101"}]}
    assert "invalid bitmap `0b101`" in fault(api.client.put("/cpu-config", json=bad))
    assert "unknown field `reg_modifiers`" in fault(api.client.put("/cpu-config", json={"reg_modifiers": []}))


def test_drives_put_update_and_single_root(api, files):
    assert_no_content(
        api.client.put(
            "/drives/scratch",
            json={
                "drive_id": "scratch",
                "path_on_host": files["scratch"],
                "is_root_device": False,
                "is_read_only": True,
                "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}},
            },
        )
    )
    assert_no_content(api.client.put("/drives/rootfs", json=rootfs(files, partuuid="1234-01")))
    other_root = {**rootfs(files), "drive_id": "scratch"}
    assert fault(api.client.put("/drives/scratch", json=other_root)) == (
        "Drive config error: A root block device already exists!"
    )
    drives = api.client.get("/vm/config").json()["drives"]
    assert [d["drive_id"] for d in drives] == ["rootfs", "scratch"]  # the root device first
    assert drives[0]["partuuid"] == "1234-01"
    assert drives[1]["rate_limiter"]["bandwidth"] == {"size": 1000, "refill_time": 100, "one_time_burst": None}


def test_drive_backing_file_must_open(api, files):
    message = fault(api.client.put("/drives/rootfs", json={**rootfs(files), "path_on_host": "/no/disk"}))
    assert message == (
        "Drive config error: Unable to create the virtio block device: Virtio backend error: "
        "Error manipulating the backing file: No such file or directory (os error 2) /no/disk"
    )
    missing = {"drive_id": "rootfs", "is_root_device": True}
    assert "`path_on_host` is required" in fault(api.client.put("/drives/rootfs", json=missing))
    vhost = {"drive_id": "rootfs", "is_root_device": True, "socket": "/run/vhost.sock"}
    assert "vhost-user" in fault(api.client.put("/drives/rootfs", json=vhost))


def test_network_interfaces_unique_mac_and_tap(api):
    eth0 = {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"}
    assert_no_content(api.client.put("/network-interfaces/eth0", json=eth0))
    eth1 = {"iface_id": "eth1", "host_dev_name": "tap1", "guest_mac": "06:00:00:00:00:01"}
    assert fault(api.client.put("/network-interfaces/eth1", json=eth1)) == (
        "Network config error: The MAC address is already in use: 06:00:00:00:00:01"
    )
    eth1 = {"iface_id": "eth1", "host_dev_name": "tap0"}
    assert fault(api.client.put("/network-interfaces/eth1", json=eth1)) == (  # the kernel's EBUSY, as Firecracker
        "Network config error: Could not create the network device: Open tap device failed: Error while creating "
        "ifreq structure: Device or resource busy (os error 16). Invalid TUN/TAP Backend provided by tap0. Check our "
        "documentation on setting up the network devices."
    )
    assert_no_content(
        api.client.put("/network-interfaces/eth1", json={"iface_id": "eth1", "host_dev_name": "tap1", "mtu": 9000})
    )
    # Replacing an interface with its own MAC is an update, not a conflict.
    assert_no_content(api.client.put("/network-interfaces/eth0", json={**eth0, "host_dev_name": "tap9"}))
    assert "invalid MAC address" in fault(
        api.client.put(
            "/network-interfaces/eth2",
            json={"iface_id": "eth2", "host_dev_name": "tap2", "guest_mac": "06:00:00:00:00"},
        )
    )
    assert "expected an integer >= 68" in fault(
        api.client.put("/network-interfaces/eth2", json={"iface_id": "eth2", "host_dev_name": "tap2", "mtu": 10})
    )
    ifaces = api.client.get("/vm/config").json()["network-interfaces"]
    assert [(i["iface_id"], i["host_dev_name"], i["mtu"]) for i in ifaces] == [
        ("eth0", "tap9", None),
        ("eth1", "tap1", 9000),
    ]


def test_vsock_and_entropy(api):
    assert_no_content(api.client.put("/vsock", json={"guest_cid": 3, "uds_path": "/tmp/v.sock"}))
    response = api.client.put("/vsock", json={"guest_cid": 4, "uds_path": "/tmp/v.sock", "vsock_id": "vsock0"})
    assert_no_content(response)
    assert response.headers["deprecation"] == "true"
    assert_no_content(api.client.put("/entropy", json={"rate_limiter": {"ops": {"size": 10, "refill_time": 1000}}}))
    config = api.client.get("/vm/config").json()
    assert config["vsock"] == {"guest_cid": 4, "uds_path": "/tmp/v.sock"}
    assert config["entropy"]["rate_limiter"]["ops"]["size"] == 10


def test_mmds_config_needs_existing_interfaces_and_a_link_local_address(api):
    body = {"network_interfaces": ["eth0"], "version": "V2"}
    assert "does not correspond to any existing network interface" in fault(api.client.put("/mmds/config", json=body))
    assert_no_content(api.client.put("/network-interfaces/eth0", json={"iface_id": "eth0", "host_dev_name": "tap0"}))
    assert "is empty" in fault(api.client.put("/mmds/config", json={"network_interfaces": []}))
    not_local = {"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}
    assert (
        fault(api.client.put("/mmds/config", json=not_local))
        == "MMDS config error: The MMDS IPv4 address is not link local."
    )
    assert_no_content(api.client.put("/mmds/config", json={**body, "ipv4_address": "169.254.170.2"}))
    assert api.client.get("/vm/config").json()["mmds-config"] == {
        "network_interfaces": ["eth0"],
        "version": "V2",
        "ipv4_address": "169.254.170.2",
        "imds_compat": False,
    }


def test_full_config_lists_every_section(api):
    config = api.client.get("/vm/config").json()
    assert set(config) == {
        "balloon",
        "drives",
        "boot-source",
        "cpu-config",
        "logger",
        "machine-config",
        "metrics",
        "mmds-config",
        "network-interfaces",
        "vsock",
        "entropy",
    }
    assert config["drives"] == [] and config["boot-source"] is None and config["vsock"] is None
