"""The device-kind table and the spawn contract: what every reader of them relies on."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.faults import fault_kinds, restartable
from controlplane.worker_handle import WorkerHandle, merge_metrics
from controlplane.worker_trust import may_send
from controlplane.zygote import WORKER_ENTRIES
from devices.vsock.messages import VsockConnect, VsockConnected
from shared import protocol as p
from shared.device_kinds import BLOCK, DEVICE_KINDS, NET, VSOCK, device_kind
from shared.spawn import DeviceSpawn, VcpuDevice, VcpuSpawn


def test_kinds_are_in_firecrackers_device_order():
    assert list(DEVICE_KINDS) == ["block", "net", "vsock", "balloon", "entropy"]


@pytest.mark.parametrize("kind", DEVICE_KINDS.values(), ids=lambda k: k.name)
def test_each_kinds_entry_point_is_what_the_zygote_forks_and_is_callable(kind):
    assert WORKER_ENTRIES[kind.name] == kind.entry
    module, _, func = kind.entry.partition(":")
    assert callable(getattr(importlib.import_module(module), func))


def test_worker_names_come_from_the_table():
    assert BLOCK.worker_name("rootfs") == "block_rootfs"
    assert NET.worker_name("eth0") == "net_eth0"
    assert VSOCK.worker_name("anything") == "vsock"  # one per microVM
    assert BLOCK.describe("rootfs") == "block worker for drive rootfs"


def test_metric_groups_a_worker_may_report():
    assert BLOCK.metric_groups("rootfs") == {"block_rootfs"}
    assert NET.metric_groups("eth0", {"mmds": None}) == {"net_eth0"}
    assert NET.metric_groups("eth0", {"mmds": {"version": "V2"}}) == {"net_eth0", "mmds"}
    assert VSOCK.metric_groups("vsock") == {"vsock"}


def test_per_device_metrics_are_summed_under_the_kind():
    a = WorkerHandle("block_a", "block", 1, -1, device_id="a", metrics={"block_a": {"read_count": 2}})
    b = WorkerHandle("block_b", "block", 2, -1, device_id="b", metrics={"block_b": {"read_count": 3}})
    merged = merge_metrics([a, b])
    assert merged["block"]["read_count"] == 5
    assert merged["block_a"]["worker_alive"] == 1


def test_fault_api_reads_restartable_and_fault_kinds_from_the_table():
    assert restartable("block") and restartable("net") and restartable("vsock")
    assert not restartable("vcpu")
    assert set(fault_kinds("block")) == {"crash", "crash_completed", "hang", "delay", "io_error", "drop"}
    assert set(fault_kinds("net")) == {"crash", "hang", "delay"}


def test_only_the_vsock_worker_may_send_its_connect_request():
    connect = VsockConnect(1024, 5000)
    assert may_send("vsock", connect)
    assert not may_send("block", connect)
    assert not may_send("vcpu", connect)
    assert not may_send("vsock", VsockConnected(1024, 5000, True))  # the supervisor's answer
    assert may_send("block", p.Ready(1))


def test_every_extra_message_type_names_a_registered_message():
    for kind in DEVICE_KINDS.values():
        for type_name in kind.sends:
            assert p.message_class(type_name) is not None, (kind.name, type_name)


def test_vcpu_is_no_device_kind():
    assert device_kind("vcpu") is None


def test_shared_table_and_contract_import_neither_controlplane_nor_devices():
    code = (
        "import sys, shared.device_kinds, shared.spawn;"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('controlplane', 'devices')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _spawn(kind, state_fd=-1, **kw):
    queues = [10 + i for i in range(kind.num_queues)]
    backends = [20 + i for i in range(len(kind.backends))]
    return DeviceSpawn(kind, 3, 4, queues, backends, 30, 31, {"name": f"{kind.name}_x", "mem_size": 1}, state_fd, **kw)


@pytest.mark.parametrize("kind", DEVICE_KINDS.values(), ids=lambda k: k.name)
def test_spawn_contract_orders_fds_by_role_and_parses_them_back(kind):
    args, fds = _spawn(kind).to_zygote()
    assert fds == [3, 4, *range(10, 10 + kind.num_queues), *range(20, 20 + len(kind.backends)), 30, 31]
    assert "state_fd" not in args
    back = DeviceSpawn.from_zygote(kind, args, fds)
    assert back == _spawn(kind)
    assert back.name == f"{kind.name}_x"


def test_spawn_contract_appends_the_state_area_with_the_restart_flags():
    args, fds = _spawn(BLOCK, state_fd=40, restore=True, needs_reset=True).to_zygote()
    assert fds[-1] == 40 and args["state_fd"] is True and args["restore"] and args["needs_reset"]
    back = DeviceSpawn.from_zygote(BLOCK, args, fds)
    assert (back.state_fd, back.restore, back.needs_reset, back.mmio_channel) == (40, True, True, 31)


def test_a_worker_given_the_wrong_fds_refuses_naming_their_roles():
    args, fds = _spawn(NET).to_zygote()
    with pytest.raises(ValueError, match=r"takes 7 fds \(memfd, irqfd, rx_notify, tx_notify, tap, fd_channel, mmio"):
        DeviceSpawn.from_zygote(NET, args, fds[:-1])
    with pytest.raises(ValueError, match="state"):
        DeviceSpawn.from_zygote(NET, {**args, "state_fd": True}, fds)


def test_the_supervisor_side_refuses_a_plan_with_the_wrong_queue_count():
    spawn = _spawn(VSOCK)
    spawn.queue_fds = spawn.queue_fds[:1]
    with pytest.raises(ValueError, match="3 queue"):
        spawn.to_zygote()


@pytest.mark.parametrize("kind", DEVICE_KINDS.values(), ids=lambda k: k.name)
def test_each_device_folder_has_the_same_shape(kind):
    folder_name = kind.entry.split(".")[1]  # the entropy kind lives in devices/rng (virtio-rng)
    folder = Path(__file__).resolve().parents[2] / "devices" / folder_name
    assert {"device.py", "backend.py", "worker.py", "policy.py", "testing.py"} <= {f.name for f in folder.iterdir()}
    assert kind.entry == f"devices.{folder_name}.worker:run"


def test_metric_group_names():
    assert BLOCK.metric_group("rootfs") == "block_rootfs"
    assert NET.metric_group("eth0") == "net_eth0"
    assert VSOCK.metric_group("vsock") == "vsock"


def test_vcpu_spawn_contract_indexes_each_devices_fds_and_parses_them_back():
    devices = [
        VcpuDevice("block_rootfs", 0xD000_0000, 5, 10, [11], 12),
        VcpuDevice("vsock", 0xD000_1000, 6, 20, [21, 22, 23], 24),
    ]
    spawn = VcpuSpawn(3, 4, 5, 6, devices, {"mem_size": 1})
    args, fds = spawn.to_zygote()
    assert fds == [3, 4, 5, 6, 10, 11, 12, 20, 21, 22, 23, 24]
    assert args["virtio_devices"][1] == {
        "name": "vsock",
        "base": 0xD000_1000,
        "gsi": 6,
        "mmio_fd": 7,
        "queue_fds": [8, 9, 10],
        "irqfd": 11,
    }
    assert VcpuSpawn.from_zygote(args, fds) == VcpuSpawn(3, 4, 5, 6, devices, args)


def test_vcpu_spawn_refuses_an_index_outside_its_device_fds():
    args, fds = VcpuSpawn(3, 4, 5, 6, [VcpuDevice("vsock", 0, 5, 10, [11], 12)]).to_zygote()
    args["virtio_devices"][0]["irqfd"] = 0  # /dev/kvm is no irqfd
    with pytest.raises(ValueError, match="fd index 0"):
        VcpuSpawn.from_zygote(args, fds)
    with pytest.raises(ValueError, match="at least 4 fds"):
        VcpuSpawn.from_zygote({}, fds[:3])
