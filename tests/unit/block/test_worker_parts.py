"""The block worker's pieces that need no process: metrics names, rate limiter updates,
backing-file replacement, and how the supervisor adds up its workers' metrics."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from controlplane.worker_handle import WorkerHandle, merge_metrics
from devices.block.backend import FileBackend
from devices.block.device import BlockDevice
from devices.block.worker import BlockHooks, firecracker_metrics
from shared import protocol as p
from shared.devworker import rate_limiter_from_api
from shared.memory import GuestMemory
from shared.virtio.mmio import MmioTransport


@pytest.fixture
def hooks(file_backend: FileBackend, mem: GuestMemory) -> BlockHooks:
    device = BlockDevice(FileBackend(os.dup(file_backend.fd)), drive_id="vda")
    return BlockHooks(device, MmioTransport(device, mem))


def test_device_counters_get_firecracker_names() -> None:
    names = firecracker_metrics({"io_errors": 2, "rate_limiter_throttled": 3, "read_count": 4}, {"update_count": 1})

    assert names == {"execute_fails": 2, "rate_limiter_throttled_events": 3, "read_count": 4, "update_count": 1}


def test_api_rate_limiter_becomes_buckets() -> None:
    limiter = rate_limiter_from_api({"bandwidth": {"size": 1000, "refill_time": 100, "one_time_burst": None}})

    assert limiter is not None and limiter.ops is None
    assert limiter.bandwidth is not None and limiter.bandwidth.config.size == 1000


def test_api_rate_limiter_without_buckets_is_no_limiter() -> None:
    assert rate_limiter_from_api({"bandwidth": None, "ops": None}) is None


def test_rate_limiter_update_adds_a_limiter_where_there_was_none(hooks: BlockHooks) -> None:
    result = hooks.handle_control(p.UpdateRateLimiter(3, None, {"size": 10, "refill_time": 1000}))

    assert result == p.UpdateResult(3, True, "")
    assert hooks.device.rate_limiter is not None and hooks.device.rate_limiter.ops is not None


def test_rate_limiter_update_keeps_the_bucket_it_was_not_given(hooks: BlockHooks) -> None:
    hooks.handle_control(p.UpdateRateLimiter(1, {"size": 10, "refill_time": 1000}, None))

    hooks.handle_control(p.UpdateRateLimiter(2, None, {"size": 5, "refill_time": 1000}))

    limiter = hooks.device.rate_limiter
    assert limiter is not None and limiter.bandwidth is not None and limiter.ops is not None


def test_invalid_rate_limiter_is_refused_and_counted(hooks: BlockHooks) -> None:
    result = hooks.handle_control(p.UpdateRateLimiter(4, {"size": -1, "refill_time": 1000}, None))

    assert isinstance(result, p.UpdateResult) and not result.ok
    assert hooks.metrics()["block_vda"]["update_fails"] == 1


def test_replacement_backing_file_is_adopted_and_the_old_one_closed(hooks: BlockHooks, tmp_path: Path) -> None:
    old_fd = hooks.device.backend.fd  # type: ignore[attr-defined]
    new = tmp_path / "new.img"
    new.write_bytes(bytes(1024))

    result = hooks.handle_fds(p.ReplaceBackingFile(7), [os.open(new, os.O_RDWR)])

    assert result == p.UpdateResult(7, True, "")
    assert hooks.device.capacity == 2
    with pytest.raises(OSError):
        os.fstat(old_fd)


def test_fd_message_with_two_fds_closes_both_and_fails(hooks: BlockHooks, disk: Path) -> None:
    fds = [os.open(disk, os.O_RDONLY), os.open(disk, os.O_RDONLY)]

    result = hooks.handle_fds(p.ReplaceBackingFile(8), fds)

    assert isinstance(result, p.UpdateResult) and not result.ok
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def handle(name: str, kind: str, alive: bool, groups: dict[str, dict[str, int]]) -> WorkerHandle:
    drive = name.removeprefix("block_") if kind == "block" else None
    return WorkerHandle(name, kind, 1, -1, drive_id=drive, alive=alive, metrics=groups)


def test_supervisor_sums_drives_into_block_and_reports_worker_status() -> None:
    workers = [
        handle("vcpu", "vcpu", True, {"vcpu": {"exit_mmio_read": 3}}),
        handle("block_a", "block", True, {"block_a": {"read_count": 2, "read_bytes": 1024}}),
        handle("block_b", "block", False, {"block_b": {"read_count": 5, "read_bytes": 512}}),
    ]

    merged = merge_metrics(workers)

    assert merged["block"] == {"read_count": 7, "read_bytes": 1536, "worker_restarts": 0}
    assert (merged["block_a"]["worker_alive"], merged["block_b"]["worker_alive"]) == (1, 0)
    assert (merged["embervm_workers"]["alive"], merged["embervm_workers"]["dead"]) == (2, 1)
    assert merged["vcpu"] == {"exit_mmio_read": 3}


def test_no_drives_no_block_aggregate() -> None:
    assert "block" not in merge_metrics([handle("vcpu", "vcpu", True, {})])
