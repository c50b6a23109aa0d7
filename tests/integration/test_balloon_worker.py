"""The balloon worker as a real, confined process driven from the host: inflating makes the
guest-memory memfd's allocated blocks drop, deflating and touching the pages again brings
them back as zeros, hostile PFNs are refused, statistics arrive at the polling interval."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from devices.balloon.pages import MIB_PAGES
from devices.balloon.stats import ENTRY
from devices.balloon.testing import BalloonWorkerHarness, allocated_bytes
from shared.layout import MiB
from shared.virtio import constants as c

MEM = 64 * MiB
FIRST = 16 * MiB >> 12  # the pages we balloon: 16 MiB .. 48 MiB, clear of the mock rings
PAGES = 32 * MIB_PAGES


@pytest.fixture
def worker(launcher) -> Iterator[BalloonWorkerHarness]:
    with BalloonWorkerHarness(launcher.zygote, launcher.run_dir, amount_mib=32, mem_size=MEM) as harness:
        assert harness.setup() & c.STATUS_DRIVER_OK
        yield harness


def touch(worker: BalloonWorkerHarness, first_pfn: int, pages: int, byte: int = 0xAB) -> None:
    for pfn in range(first_pfn, first_pfn + pages):
        worker.mem.write((pfn << 12) + 100, bytes([byte]))


def test_inflate_releases_memory_and_deflated_pages_come_back_as_zeros(worker: BalloonWorkerHarness) -> None:
    assert worker.num_pages() == 32 * MIB_PAGES  # the target, in the config space
    touch(worker, FIRST, PAGES)
    before = allocated_bytes(worker.memfd)
    assert before >= 32 * MiB

    worker.send_pfns(0, list(range(FIRST, FIRST + PAGES)))
    worker.set_actual(PAGES)

    after = allocated_bytes(worker.memfd)
    assert before - after >= 32 * MiB - 64 * 1024, (before, after)
    assert worker.mem.read((FIRST << 12) + 100, 1) == b"\0"  # gone for this process too
    metrics = worker.metrics()
    assert metrics["inflated_pages"] == PAGES and metrics["released_bytes"] == 32 * MiB
    assert metrics["inflate_count"] >= 1
    worker.wait_status(lambda status: status.actual_pages == PAGES)  # told to the supervisor

    worker.send_pfns(1, list(range(FIRST, FIRST + PAGES)))
    worker.set_actual(0)
    assert worker.metrics()["deflated_pages"] == PAGES
    assert worker.mem.read(FIRST << 12, 4096) == bytes(4096)  # a reused page reads as zeros
    touch(worker, FIRST, PAGES, 0x5A)  # and works
    assert worker.mem.read((FIRST << 12) + 100, 1) == b"\x5a"
    assert allocated_bytes(worker.memfd) >= after + 32 * MiB - 64 * 1024


def test_hostile_pfns_are_refused_counted_and_never_punched(worker: BalloonWorkerHarness) -> None:
    touch(worker, FIRST, 16)
    before = allocated_bytes(worker.memfd)
    hostile = [MEM >> 12, 0xD0000, 0xFEE00, 0xFFFFFFFF, 0xA0, 0xE0]  # past RAM, MMIO gap, LAPIC, max, holes
    worker.send_pfns(0, hostile)
    assert worker.metrics()["invalid_pfns"] == len(hostile)
    assert allocated_bytes(worker.memfd) >= before  # only the mock ring and PFN buffer pages were added
    assert worker.alive()


def test_patch_target_raises_a_config_interrupt(worker: BalloonWorkerHarness) -> None:
    result = worker.update_target(8 * MIB_PAGES)
    assert result.ok, result.error
    assert worker.num_pages() == 8 * MIB_PAGES
    assert worker.wait_interrupt(5.0)
    assert worker.mmio.read(c.MMIO_INTERRUPT_STATUS, 4) & 2  # VIRTIO_MMIO_INT_CONFIG


def test_target_update_is_refused_before_the_driver_is_ready(launcher) -> None:
    with BalloonWorkerHarness(launcher.zygote, launcher.run_dir, mem_size=MEM) as harness:
        result = harness.update_target(1)
        assert not result.ok and "Device is inactive" in result.error


def test_statistics_arrive_at_the_polling_interval(launcher) -> None:
    with BalloonWorkerHarness(launcher.zygote, launcher.run_dir, stats_polling_interval_s=1, mem_size=MEM) as w:
        assert w.setup() & c.STATUS_DRIVER_OK
        stats_q = w.drivers[2]
        head = stats_q.add_chain([ENTRY.pack(4, 1000) + ENTRY.pack(5, MEM)])
        w.kick(2)
        status = w.wait_status(lambda status: bool(status.stats))
        assert status.stats == {"free_memory": 1000, "total_memory": MEM}
        start = time.monotonic()
        used = w.wait_used(2, 1, timeout=5.0)  # the poll gives the buffer back
        waited = time.monotonic() - start
        assert used == [(head, 0)] and waited <= 2.5
        assert not w.update_stats_interval(0).ok  # cannot be turned off
        assert w.update_stats_interval(2).ok
