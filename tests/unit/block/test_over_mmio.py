"""The block device behind the virtio-mmio transport, driven as Linux drives it."""

from __future__ import annotations

import pytest

from devices.block.backend import FileBackend
from devices.block.device import BlockDevice
from shared.memory import GuestMemory
from shared.virtio import constants as c
from shared.virtio.mmio import MmioTransport
from shared.virtio.testing import MockDriver, mmio_setup
from tests.unit.block.conftest import add_read, sector_pattern

FEATURES = c.feature(c.VIRTIO_F_VERSION_1) | c.feature(c.VIRTIO_F_EVENT_IDX) | c.feature(c.VIRTIO_F_INDIRECT_DESC)


class Irqfd:
    def __init__(self) -> None:
        self.writes = 0

    def __call__(self) -> None:
        self.writes += 1


@pytest.fixture
def irqfd() -> Irqfd:
    return Irqfd()


@pytest.fixture
def ev_driver(mem: GuestMemory) -> MockDriver:
    return MockDriver(mem, size=256, event_idx=True, indirect=True)


@pytest.fixture
def transport(file_backend: FileBackend, mem: GuestMemory, irqfd: Irqfd, ev_driver: MockDriver) -> MmioTransport:
    transport = MmioTransport(BlockDevice(file_backend, drive_id="vda"), mem, irqfd)
    assert mmio_setup(transport, [ev_driver], FEATURES) & c.STATUS_DRIVER_OK
    return transport


def test_queue_notify_serves_read(transport: MmioTransport, ev_driver: MockDriver) -> None:
    head = add_read(ev_driver, 7, 512, indirect=True)

    transport.write(c.MMIO_QUEUE_NOTIFY, 4, 0)

    assert ev_driver.written(head)[0] == sector_pattern(7)


def test_completion_raises_used_ring_interrupt(transport: MmioTransport, ev_driver: MockDriver, irqfd: Irqfd) -> None:
    add_read(ev_driver, 7, 512)

    transport.notify_queue(0)

    assert (transport.read(c.MMIO_INTERRUPT_STATUS, 4), irqfd.writes) == (c.INTERRUPT_USED_RING, 1)


def test_config_space_shows_capacity(transport: MmioTransport) -> None:
    assert transport.read(c.MMIO_CONFIG, 4) == 128


def test_corrupt_ring_sets_needs_reset(transport: MmioTransport, ev_driver: MockDriver) -> None:
    ev_driver.set_avail_idx(5000)

    transport.notify_queue(0)

    assert transport.read(c.MMIO_STATUS, 4) & c.STATUS_DEVICE_NEEDS_RESET


def test_restarted_worker_serves_pending_request(
    transport: MmioTransport, ev_driver: MockDriver, file_backend: FileBackend, mem: GuestMemory
) -> None:
    state = transport.snapshot()
    head = add_read(ev_driver, 9, 512)  # kicked while no worker ran
    restarted = MmioTransport(BlockDevice(file_backend, drive_id="vda"), mem)
    restarted.restore(state, resync=True)

    restarted.kick_all()

    assert ev_driver.written(head)[0] == sector_pattern(9)
