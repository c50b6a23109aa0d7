"""virtio-blk end to end over the mock driver: real file I/O, every guest error answered."""

from __future__ import annotations

from pathlib import Path

import pytest

from devices.block.backend import FileBackend, MemoryBackend
from devices.block.device import VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, BlockDevice, CacheType
from devices.block.request import RequestType, Status
from shared.memory import GuestMemory
from shared.ratelimit import BucketConfig, RateLimiter
from shared.virtio import constants as c
from shared.virtio.queue import Queue
from shared.virtio.testing import FakeInterrupt, MockDriver
from tests.unit.block.conftest import SECTORS, add_read, add_write, header, sector_pattern, status_of


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def irq() -> FakeInterrupt:
    return FakeInterrupt()


def activate(device: BlockDevice, mem: GuestMemory, queue: Queue, irq: FakeInterrupt) -> BlockDevice:
    device.activate(mem, [queue], irq, device.avail_features)
    return device


@pytest.fixture
def blk(file_backend: FileBackend, mem: GuestMemory, queue: Queue, irq: FakeInterrupt) -> BlockDevice:
    return activate(BlockDevice(file_backend, drive_id="rootfs"), mem, queue, irq)


# --- reads, writes, flush, id ---------------------------------------------------------------


def test_read_returns_disk_content(blk: BlockDevice, driver: MockDriver) -> None:
    head = add_read(driver, 3, 1024)

    blk.process_queue(0)

    assert driver.written(head)[0] == sector_pattern(3) + sector_pattern(4)


def test_read_status_is_ok(blk: BlockDevice, driver: MockDriver) -> None:
    head = add_read(driver, 3, 512)

    blk.process_queue(0)

    assert status_of(driver, head) == Status.OK


def test_read_used_len_covers_data_and_status(blk: BlockDevice, driver: MockDriver) -> None:
    head = add_read(driver, 0, 512)

    blk.process_queue(0)

    assert driver.used() == [(head, 513)]


def test_read_through_indirect_chain(mem: GuestMemory, file_backend: FileBackend, irq: FakeInterrupt) -> None:
    driver = MockDriver(mem, size=64, indirect=True)
    blk = activate(BlockDevice(file_backend, drive_id="d"), mem, driver.queue(), irq)
    head = add_read(driver, 9, 512, indirect=True)

    blk.process_queue(0)

    assert driver.written(head)[0] == sector_pattern(9)


def test_write_reaches_the_file(blk: BlockDevice, driver: MockDriver, disk: Path) -> None:
    add_write(driver, 10, b"\xab" * 1024)

    blk.process_queue(0)

    assert disk.read_bytes()[10 * 512 : 12 * 512] == b"\xab" * 1024


def test_write_status_is_ok(blk: BlockDevice, driver: MockDriver) -> None:
    head = add_write(driver, 10, b"\xab" * 512)

    blk.process_queue(0)

    assert status_of(driver, head) == Status.OK


def test_flush_with_writeback_flushes_backend(mem: GuestMemory, queue: Queue, driver: MockDriver) -> None:
    backend = MemoryBackend(bytes(4096))
    blk = activate(BlockDevice(backend, drive_id="d", cache_type=CacheType.WRITEBACK), mem, queue, FakeInterrupt())
    driver.add_chain([header(RequestType.FLUSH)], [1])

    blk.process_queue(0)

    assert backend.flushes == 1


def test_flush_with_unsafe_cache_is_a_no_op(mem: GuestMemory, queue: Queue, driver: MockDriver) -> None:
    backend = MemoryBackend(bytes(4096))
    blk = activate(BlockDevice(backend, drive_id="d"), mem, queue, FakeInterrupt())
    head = driver.add_chain([header(RequestType.FLUSH)], [1])

    blk.process_queue(0)

    assert (backend.flushes, status_of(driver, head)) == (0, Status.OK)


def test_get_id_returns_padded_drive_id(blk: BlockDevice, driver: MockDriver) -> None:
    head = driver.add_chain([header(RequestType.GET_ID)], [20, 1])

    blk.process_queue(0)

    assert driver.written(head)[0] == b"rootfs".ljust(20, b"\0")


def test_get_id_of_20_char_id_has_no_nul(mem: GuestMemory, queue: Queue, driver: MockDriver) -> None:
    blk = activate(BlockDevice(MemoryBackend(b""), drive_id="x" * 25), mem, queue, FakeInterrupt())
    head = driver.add_chain([header(RequestType.GET_ID)], [20, 1])

    blk.process_queue(0)

    assert driver.written(head)[0] == b"x" * 20


# --- requests the device refuses --------------------------------------------------------------


@pytest.fixture
def ro_blk(file_backend: FileBackend, mem: GuestMemory, queue: Queue, irq: FakeInterrupt) -> BlockDevice:
    return activate(BlockDevice(file_backend, drive_id="ro", read_only=True), mem, queue, irq)


def test_read_only_drive_rejects_writes(ro_blk: BlockDevice, driver: MockDriver) -> None:
    head = add_write(driver, 1, b"\xff" * 512)

    ro_blk.process_queue(0)

    assert status_of(driver, head) == Status.IOERR


def test_read_only_drive_leaves_file_unchanged(ro_blk: BlockDevice, driver: MockDriver, disk: Path) -> None:
    add_write(driver, 1, b"\xff" * 512)

    ro_blk.process_queue(0)

    assert disk.read_bytes()[512:1024] == sector_pattern(1)


def test_read_only_drive_offers_ro_feature(ro_blk: BlockDevice) -> None:
    assert ro_blk.avail_features & c.feature(VIRTIO_BLK_F_RO)


def test_read_past_the_end_is_ioerr(blk: BlockDevice, driver: MockDriver) -> None:
    head = add_read(driver, SECTORS, 512)

    blk.process_queue(0)

    assert status_of(driver, head) == Status.IOERR


def test_read_straddling_the_end_is_ioerr(blk: BlockDevice, driver: MockDriver) -> None:
    head = add_read(driver, SECTORS - 1, 1024)

    blk.process_queue(0)

    assert status_of(driver, head) == Status.IOERR


def test_huge_sector_is_ioerr(blk: BlockDevice, driver: MockDriver) -> None:
    head = add_read(driver, 2**64 - 1, 512)

    blk.process_queue(0)

    assert status_of(driver, head) == Status.IOERR


def test_unknown_type_is_unsupp(blk: BlockDevice, driver: MockDriver) -> None:
    head = driver.add_chain([header(77)], [1])

    blk.process_queue(0)

    assert status_of(driver, head) == Status.UNSUPP


def test_unaligned_data_length_is_ioerr(blk: BlockDevice, driver: MockDriver) -> None:
    head = add_read(driver, 0, 100)

    blk.process_queue(0)

    assert status_of(driver, head) == Status.IOERR


def test_request_without_status_byte_is_returned_empty(blk: BlockDevice, driver: MockDriver) -> None:
    head = driver.add_chain([header(RequestType.OUT) + bytes(512)], [])

    blk.process_queue(0)

    assert driver.used() == [(head, 0)]


def test_invalid_requests_are_counted(blk: BlockDevice, driver: MockDriver) -> None:
    driver.add_chain([b"short"], [1])

    blk.process_queue(0)

    assert blk.metrics["invalid_reqs_count"] == 1


def test_backend_failure_is_ioerr(mem: GuestMemory, queue: Queue, driver: MockDriver) -> None:
    backend = MemoryBackend(bytes(4096))
    backend.fail = True
    blk = activate(BlockDevice(backend, drive_id="d"), mem, queue, FakeInterrupt())
    head = add_read(driver, 0, 512)

    blk.process_queue(0)

    assert (status_of(driver, head), blk.metrics["io_errors"]) == (Status.IOERR, 1)


# --- malicious rings ----------------------------------------------------------------------------


def test_looping_chain_is_returned_with_zero_length(blk: BlockDevice, driver: MockDriver) -> None:
    driver.write_descriptor(60, driver.alloc(16), 16, c.VIRTQ_DESC_F_NEXT, 60)
    driver.publish(60)

    blk.process_queue(0)

    assert driver.used() == [(60, 0)]


def test_device_keeps_serving_after_malformed_chain(blk: BlockDevice, driver: MockDriver) -> None:
    driver.write_descriptor(60, 1 << 60, 16)
    driver.publish(60)
    head = add_read(driver, 5, 512)

    blk.process_queue(0)

    assert driver.written(head)[0] == sector_pattern(5)


def test_runaway_avail_index_asks_for_reset(blk: BlockDevice, driver: MockDriver, irq: FakeInterrupt) -> None:
    driver.set_avail_idx(1000)

    blk.process_queue(0)

    assert len(irq.needs_reset) == 1


def test_out_of_range_head_asks_for_reset(
    blk: BlockDevice, driver: MockDriver, mem: GuestMemory, irq: FakeInterrupt
) -> None:
    mem.write_u16(driver.avail_addr + 4, 0xFFFF)
    driver.set_avail_idx(1)

    blk.process_queue(0)

    assert "head index" in irq.needs_reset[0]


# --- interrupts and notifications ------------------------------------------------------------------


def test_completion_signals_used_queue(blk: BlockDevice, driver: MockDriver, irq: FakeInterrupt) -> None:
    add_read(driver, 0, 512)

    blk.process_queue(0)

    assert irq.used_queue == 1


def test_batch_of_requests_signals_once(blk: BlockDevice, driver: MockDriver, irq: FakeInterrupt) -> None:
    for sector in range(5):
        add_read(driver, sector, 512)

    blk.process_queue(0)

    assert (len(driver.used()), irq.used_queue) == (5, 1)


def test_no_interrupt_flag_suppresses_signal(blk: BlockDevice, driver: MockDriver, irq: FakeInterrupt) -> None:
    driver.set_avail_flags(c.VIRTQ_AVAIL_F_NO_INTERRUPT)
    add_read(driver, 0, 512)

    blk.process_queue(0)

    assert irq.used_queue == 0


def test_event_idx_publishes_avail_event(mem: GuestMemory, file_backend: FileBackend) -> None:
    driver = MockDriver(mem, size=64, event_idx=True)
    blk = activate(BlockDevice(file_backend, drive_id="d"), mem, driver.queue(), FakeInterrupt())
    add_read(driver, 0, 512)
    add_read(driver, 1, 512)

    blk.process_queue(0)

    assert driver.avail_event() == 2


def test_empty_queue_signals_nothing(blk: BlockDevice, irq: FakeInterrupt) -> None:
    blk.process_queue(0)

    assert irq.used_queue == 0


def test_process_after_reset_does_nothing(blk: BlockDevice, driver: MockDriver) -> None:
    add_read(driver, 0, 512)
    blk.reset()

    blk.process_queue(0)

    assert driver.used_idx == 0


# --- configuration -----------------------------------------------------------------------------------


def test_config_capacity_in_sectors(blk: BlockDevice) -> None:
    assert int.from_bytes(blk.read_config(0, 8), "little") == SECTORS


def test_config_seg_max_leaves_room_for_header_and_status(blk: BlockDevice) -> None:
    assert int.from_bytes(blk.read_config(12, 4), "little") == 254


def test_config_blk_size(blk: BlockDevice) -> None:
    assert int.from_bytes(blk.read_config(20, 4), "little") == 512


def test_flush_feature_only_with_writeback(blk: BlockDevice) -> None:
    assert not blk.avail_features & c.feature(VIRTIO_BLK_F_FLUSH)


def test_set_backend_updates_capacity(blk: BlockDevice) -> None:
    blk.set_backend(MemoryBackend(bytes(512 * 1000)))

    assert blk.capacity == 1000


def test_set_backend_signals_config_change(blk: BlockDevice, irq: FakeInterrupt) -> None:
    blk.set_backend(MemoryBackend(bytes(512)))

    assert irq.config_change == 1


def test_set_backend_before_activation_signals_nothing(file_backend: FileBackend) -> None:
    blk = BlockDevice(file_backend, drive_id="d")

    blk.set_backend(MemoryBackend(bytes(512)))

    assert blk.capacity == 1


# --- metrics and rate limiting ----------------------------------------------------------------------


def test_read_metrics(blk: BlockDevice, driver: MockDriver) -> None:
    add_read(driver, 0, 1024)

    blk.process_queue(0)

    assert (blk.metrics["read_bytes"], blk.metrics["read_count"]) == (1024, 1)


def test_write_metrics(blk: BlockDevice, driver: MockDriver) -> None:
    add_write(driver, 0, bytes(512))

    blk.process_queue(0)

    assert (blk.metrics["write_bytes"], blk.metrics["write_count"]) == (512, 1)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limited(
    file_backend: FileBackend, mem: GuestMemory, queue: Queue, irq: FakeInterrupt, clock: FakeClock
) -> BlockDevice:
    limiter = RateLimiter(bandwidth=BucketConfig(1024), clock=clock)  # 1 KiB per second
    return activate(BlockDevice(file_backend, drive_id="d", rate_limiter=limiter), mem, queue, irq)


def test_throttled_request_stays_in_the_ring(limited: BlockDevice, driver: MockDriver) -> None:
    add_read(driver, 0, 1024)
    add_read(driver, 2, 512)

    limited.process_queue(0)

    assert (len(driver.used()), limited.metrics["rate_limiter_throttled"]) == (1, 1)


def test_throttle_delay_says_when_to_retry(limited: BlockDevice, driver: MockDriver) -> None:
    add_read(driver, 0, 1024)
    add_read(driver, 2, 512)

    limited.process_queue(0)

    assert limited.throttle_delay() == pytest.approx(0.5)


def test_throttled_request_is_served_later(limited: BlockDevice, driver: MockDriver, clock: FakeClock) -> None:
    add_read(driver, 0, 1024)
    head = add_read(driver, 2, 512)
    limited.process_queue(0)
    clock.now += 0.5

    limited.process_queue(0)

    assert driver.written(head)[0] == sector_pattern(2)


def test_unthrottled_device_has_no_delay(blk: BlockDevice) -> None:
    assert blk.throttle_delay() is None
